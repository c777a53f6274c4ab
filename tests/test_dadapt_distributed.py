"""The model-wide sums of the D-Adaptation family across processes: 2 CPU processes, gloo.

These tests exercise the shared reduction helper (:mod:`hf_tuningfree.optim.distributed`) that
every optimizer with global statistics uses:

* FSDP2 (raw ``fully_shard`` on ``init_device_mesh("cpu", (2,))``, uneven and empty shards) and
  FSDP1 (``FullyShardedDataParallel`` flat shards): the ``d`` sequence and the parameters after
  10 steps equal a single-process run on the same data, and each step makes exactly one
  collective (every sum of a step is stacked into it, see :mod:`hf_tuningfree.optim.dadapt`);
* DDP: gradients are already averaged, no collective is made, ``d`` agrees across ranks and with
  one process;
* ``global_reduce="world"`` with parameters split between ranks by hand (what DeepSpeed ZeRO
  does, undetectable from the tensors), including steps where one rank has no gradient at all.

Every worker computes the single-process reference itself on the full batch, so the comparison
needs nothing from the parent but the exceptions ``torch.multiprocessing.spawn`` re-raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_helpers import WORLD, CountCollectives, process_group, shard_fsdp2, spawn

from hf_tuningfree.optim import _native, create_optimizer

NAMES = ["dadapt_sgd", "dadapt_adam", "dadapt_adagrad", "prodigy"]
#: the optimizers whose CPU "auto" path runs the C kernels of hf_tuningfree.optim._native
NATIVE_NAMES = set(NAMES)
STEPS = 10
#: fp32 models, sharded against one process: measured d 2.6e-7, parameters 6.2e-7 (relative)
REL = 1e-5
D0 = 1e-3


def _model(out: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    # 16x8, 16, 3x16, 3 (uneven shards), 1x3, 1 (empty on rank 1 under FSDP2)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3), torch.nn.Tanh(),
        torch.nn.Linear(3, out),
    )  # fmt: skip


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=gen)
    y = torch.randn(32, 1, generator=gen)
    return x, y


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _opt_kwargs(name: str) -> dict:
    # Non-default settings that touch every term: weight decay, momentum, bias correction.
    return {
        "dadapt_sgd": {"momentum": 0.9, "weight_decay": 0.01},
        "dadapt_adam": {"weight_decay": 0.01},
        "dadapt_adagrad": {"weight_decay": 0.01},
        "prodigy": {"weight_decay": 0.01, "decoupled_weight_decay": False},
    }[name]


def _reference(name: str):
    """Single process, full batch: (d per step, final parameters)."""
    model = _model()
    init = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    opt = create_optimizer(name, model.parameters(), d0=D0, **_opt_kwargs(name))
    ds = []
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        ds.append(opt.stats()["d"])
    moved = max(
        (p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), init, strict=True)
    )
    assert moved > 5e-3, f"{name}: the parameters moved only {moved:.1e}: nothing to compare"
    return ds, [p.detach().clone() for p in model.parameters()]


def _train(name, model, opt, x, y, collectives: int, label: str) -> list[float]:
    """``STEPS`` steps on ``(x, y)``, each making ``collectives`` all-reduces: ``d`` per step.
    Checks that the C kernels ran (on the rank-local shards): sharded, the two-pass form
    (statistics, the one all-reduce, update); under DDP, where nothing is reduced, the fused
    form (the guard's ``||g||^2``, then statistics and update in one kernel)."""
    ds = []
    calls = []
    real = _native.dadapt_kernel

    def spy(*args, **kwargs):
        calls.append(args[0])
        real(*args, **kwargs)

    _native.dadapt_kernel = spy
    try:
        for _ in range(STEPS):
            opt.zero_grad()
            _loss(model, x, y).backward()
            with CountCollectives() as counter:
                opt.step()
            assert counter.count == collectives, f"{label} {name}: {counter.count} collectives"
            ds.append(opt.stats()["d"])
    finally:
        _native.dadapt_kernel = real
    if name in NATIVE_NAMES and _native.load() is not None:
        kinds = {c.rsplit("_", 1)[1] for c in calls}
        expected = {"stats", "update"} if collectives else {"sq", "fused"}
        assert kinds == expected, f"{label} {name}: C kernels {sorted(set(calls))}"
    return ds


def _check(name, rank, ds, ref_ds, params, ref_params, label):
    d_rel = max(abs(a - b) / b for a, b in zip(ds, ref_ds, strict=True))
    p_rel = max(
        ((p - r).abs().max() / r.abs().max()).item()
        for p, r in zip(params, ref_params, strict=True)
    )
    assert d_rel <= REL, f"{label} {name} rank {rank}: d differs by {d_rel:.1e} (relative)"
    assert p_rel <= REL, f"{label} {name} rank {rank}: params differ by {p_rel:.1e} (relative)"
    assert ds[-1] > 3 * ds[0], f"{label} {name}: d did not grow ({ds[0]:.2g} -> {ds[-1]:.2g})"
    # every rank holds the same d, bit for bit
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, ds)
    assert all(g == ds for g in gathered), f"{label} {name}: d differs between ranks"
    if rank == 0:
        print(f"{label} {name}: d_10={ds[-1]:.3g} d rel {d_rel:.1e} params rel {p_rel:.1e}")


# ---------------------------------------------------------------------- FSDP2 and FSDP1
def _fsdp_worker(rank: int, world: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel

    with process_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        x, y = _data()
        local = slice(rank * 16, (rank + 1) * 16)  # each rank its half of the batch
        for name in NAMES:
            ref_ds, ref_params = _reference(name)

            # FSDP2: DTensor parameters with Shard(0) placements
            model = shard_fsdp2(_model(), mesh)
            opt = create_optimizer(name, model.parameters(), d0=D0, **_opt_kwargs(name))
            # FSDP2 averages the gradients; the optimizer completes its sums in one collective
            ds = _train(name, model, opt, x[local], y[local], 1, "FSDP2")
            params = [p.full_tensor() for p in model.parameters()]
            _check(name, rank, ds, ref_ds, params, ref_params, "FSDP2")

            # FSDP1: the optimizer sees one flat (padded) shard per wrapped module, or with
            # use_orig_params the original parameters as views of it: the last layer's lie
            # wholly on rank 1 and are empty on rank 0.
            for orig in (False, True):
                model = FullyShardedDataParallel(
                    _model(), device_id=torch.device("cpu"), use_orig_params=orig
                )
                opt = create_optimizer(name, model.parameters(), d0=D0, **_opt_kwargs(name))
                assert all(getattr(p, "_fsdp_flattened", False) for p in model.parameters())
                if orig and rank == 0:
                    assert any(p.numel() == 0 for p in model.parameters()), "no empty shard"
                ds = _train(name, model, opt, x[local], y[local], 1, "FSDP1")
                with FullyShardedDataParallel.summon_full_params(model):
                    params = [p.detach().clone() for p in model.module.parameters()]
                label = "FSDP1 use_orig_params" if orig else "FSDP1 flat"
                _check(name, rank, ds, ref_ds, params, ref_params, label)


def test_fsdp2_and_fsdp1_match_one_process():
    spawn(_fsdp_worker)


# ---------------------------------------------------------------------- DDP and explicit world
def _ddp_and_world_worker(rank: int, world: int, port: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with process_group(rank, world, port):
        x, y = _data()
        local = slice(rank * 16, (rank + 1) * 16)
        for name in NAMES:
            ref_ds, ref_params = _reference(name)

            # DDP: gradients arrive averaged and replicated; reducing again would double sums
            model = DistributedDataParallel(_model())
            opt = create_optimizer(name, model.parameters(), d0=D0, **_opt_kwargs(name))
            ds = _train(name, model, opt, x[local], y[local], 0, "DDP")
            params = [p.detach() for p in model.module.parameters()]
            _check(name, rank, ds, ref_ds, params, ref_params, "DDP")

            # global_reduce="world": each rank owns half of the parameters (ZeRO-style), sees
            # the full batch, and broadcasts what it owns after each step. On every third step
            # rank 1's parameters get no gradient at all: it must still join the collective, with
            # statistics of the same dtype (fp64 here) as the other rank's.
            model = _model().double()
            xw, yw = x.double(), y.double()
            params = list(model.parameters())
            owner = [0 if i < 2 else 1 for i in range(len(params))]
            mine = [p for p, o in zip(params, owner, strict=True) if o == rank]
            opt = create_optimizer(name, mine, d0=D0, global_reduce="world", **_opt_kwargs(name))
            ref_model = _model().double()
            ref_opt = create_optimizer(name, ref_model.parameters(), d0=D0, **_opt_kwargs(name))
            ds, ref_ds_gap = [], []
            for t in range(STEPS):
                for m, o in ((model, opt), (ref_model, ref_opt)):
                    o.zero_grad()
                    _loss(m, xw, yw).backward()
                    if t % 3 == 1:
                        for p, ow in zip(m.parameters(), owner, strict=True):
                            if ow == 1:
                                p.grad = None
                with CountCollectives() as counter:
                    opt.step()
                assert counter.count == 1, f"world {name}: {counter.count} collectives per step"
                ref_opt.step()
                for p, o in zip(params, owner, strict=True):
                    dist.broadcast(p.data, src=o)
                ds.append(opt.stats()["d"])
                ref_ds_gap.append(ref_opt.stats()["d"])
            ref_final = [p.detach() for p in ref_model.parameters()]
            _check(name, rank, ds, ref_ds_gap, [p.detach() for p in params], ref_final, "world")

        # The same split for ADOPT, whose only global sum is the non-finite guard's: a rank
        # without gradients used to stack fp32 zeros against fp64 and abort gloo.
        # Its update is elementwise, so it must equal a local run on the same gradients.
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        q = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = create_optimizer("adopt", [p], global_reduce="world")
        ref = create_optimizer("adopt", [q])
        for t in range(4):
            g = None if (rank == 1 and t == 1) else torch.full_like(p, 1.0 + t)
            p.grad, q.grad = g, g
            opt.step()
            ref.step()
        assert torch.equal(p, q) and not torch.equal(p, torch.ones_like(p)), (rank, p, q)


def test_ddp_and_explicit_world_reduce_match_one_process():
    spawn(_ddp_and_world_worker)
