"""DoG and L-DoG under FSDP2 (``fully_shard`` on a 2-process gloo CPU mesh) take the same steps as
one process: the step sizes depend on norms over the whole model (or whole tensors), which the
optimizer forms from the shards with one all-reduce per step."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import process_group, shard_fsdp2, spawn_and_collect

from hf_tuningfree.optim import create_optimizer

STEPS = 8


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10),
        torch.nn.Tanh(),
        torch.nn.Linear(10, 5),  # 5 rows over 2 ranks: uneven shards
        torch.nn.Tanh(),
        torch.nn.Linear(5, 1),  # a 1-row weight and a 1-element bias: one rank holds nothing
    ).double()


def _groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 16, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(STEPS, 16, 1, generator=gen, dtype=torch.float64)
    return x, y


def _etas(opt, name: str) -> list[float]:
    if name == "ldog":
        return [eta for _, eta in opt.etas()]
    return [float(opt.global_state["eta"])]


def _train(model, opt, name, x, y, rank=0, world=1) -> list[list[float]]:
    etas = []
    for t in range(STEPS):
        xb, yb = x[t][rank::world], y[t][rank::world]  # each rank its half of the batch
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xb), yb).backward()
        opt.step()
        etas.append(_etas(opt, name))
    return etas


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with process_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        x, y = _data()
        results = {}
        for name in ("dog", "ldog"):
            model = shard_fsdp2(_model(), mesh)
            opt = create_optimizer(name, _groups(model), reps_rel=1e-3)
            etas = _train(model, opt, name, x, y, rank, world)
            params = [p.full_tensor().detach().clone() for p in model.parameters()]
            results[name] = {"etas": etas, "params": params}
        if rank == 0:
            torch.save(results, out)


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process():
    x, y = _data()
    single = {}
    for name in ("dog", "ldog"):
        model = _model()
        opt = create_optimizer(name, _groups(model), reps_rel=1e-3)
        etas = _train(model, opt, name, x, y)
        single[name] = {"etas": etas, "params": [p.detach().clone() for p in model.parameters()]}
    sharded = spawn_and_collect(_worker)
    for name in ("dog", "ldog"):
        ours, ref = sharded[name], single[name]
        assert len(ours["etas"]) == STEPS
        for t, (a, b) in enumerate(zip(ours["etas"], ref["etas"], strict=True)):
            # fp64; measured: eta 1.9e-15 relative, parameters 1.9e-16 relative, 2.8e-17 absolute
            assert a == pytest.approx(b, rel=1e-13), f"{name} step {t}: eta {a} vs {b}"
        for i, (a, b) in enumerate(zip(ours["params"], ref["params"], strict=True)):
            assert torch.allclose(a, b, rtol=1e-14, atol=1e-15), f"{name} parameter {i}"
        # and training did move the parameters
        assert not torch.allclose(ref["params"][0], _model()[0].weight.detach())
