"""``state_bytes()``: the optimizer-state counter, checked against what the allocator retains.

The independent measure is ``torch.profiler``'s memory events over the first ``step()``: the bytes
allocated and not freed by the step are the state it created (plus, at most, a few one-byte
flags such as the last step's ``ok``), whatever path the step took (C, torch, fused)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hf_tuningfree.optim import available_optimizers, create_optimizer, state_bytes

#: Bytes the first step may retain that are not optimizer state (the last step's ``ok`` flag
#: and the skipped-step counter's handle are 1-8 bytes each).
NON_STATE_SLACK = 64


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (48,), (33, 7), (5,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
    return params


def _retained_by_first_step(opt: torch.optim.Optimizer) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    return sum(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("name", available_optimizers())
def test_counter_matches_what_the_first_step_allocates(name):
    opt = create_optimizer(name, _params())
    opt.step()  # the C library is built/loaded outside the measured step
    opt = create_optimizer(name, _params())
    retained = _retained_by_first_step(opt)
    counted = opt.state_bytes()
    assert counted.total > 0
    assert 0 <= retained - counted.total <= NON_STATE_SLACK, (retained, counted)


def test_adamw_reads_eight_bytes_per_fp32_element():
    params = _params()
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    counted = state_bytes(opt)
    numel = sum(p.numel() for p in params)
    assert counted.elements == numel
    assert counted.by_key["exp_avg"] == counted.by_key["exp_avg_sq"] == 4 * numel
    assert counted.by_key["step"] == 4 * len(params)  # torch keeps a 0-dim fp32 step each
    assert counted.global_state == 0
    assert counted.per_element == pytest.approx(8.0 + 16 / numel, rel=1e-15)


def test_prodigy_default_state_is_four_copies():
    params = _params(torch.float64)
    opt = create_optimizer("prodigy", params)
    opt.step()
    counted = opt.state_bytes()
    numel = sum(p.numel() for p in params)
    assert counted.by_key == {k: 8 * numel for k in ("exp_avg", "exp_avg_sq", "s", "x0")}
    assert counted.per_element == 32.0
    # d, d_max, numerator, s_l1, step, x0_scale, skipped_steps...: 0-dim, a few bytes each
    assert 0 < counted.global_state < 200


def test_a_storage_shared_by_two_state_entries_is_counted_once():
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1)
    buffer = torch.zeros(1000)
    opt.state[params[0]]["a"] = buffer[:10]
    opt.state[params[0]]["b"] = buffer[500:]
    opt.state[params[1]]["c"] = buffer.view(10, 100)
    counted = state_bytes(opt)
    assert counted.per_parameter == 4000  # one allocation of 1000 floats
    assert counted.by_key == {"a": 4000, "b": 0, "c": 0}


def test_empty_optimizer_reads_zero():
    opt = create_optimizer("prodigy", [torch.nn.Parameter(torch.zeros(0))])
    counted = opt.state_bytes()
    assert (counted.total, counted.elements, counted.per_element) == (0, 0, 0.0)


def _fsdp2_worker(rank, world, port, out):
    from dist_helpers import process_group, shard_fsdp2

    with process_group(rank, world, port):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
        full = sum(p.numel() for p in model.parameters())
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
        shard_fsdp2(model, mesh)
        opt = create_optimizer("prodigy", model.parameters())
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        counted = opt.state_bytes()
        local = sum(p.to_local().numel() for p in model.parameters())
        totals = torch.tensor([counted.elements, counted.per_parameter, local], dtype=torch.int64)
        gathered = [torch.zeros_like(totals) for _ in range(world)]
        torch.distributed.all_gather(gathered, totals)
        if rank == 0:
            torch.save({"ranks": torch.stack(gathered), "full": full}, out)


def test_fsdp2_counts_each_ranks_own_shard():
    from dist_helpers import spawn_and_collect

    got = spawn_and_collect(_fsdp2_worker)
    ranks, full = got["ranks"], got["full"]
    assert ranks[:, 0].tolist() == ranks[:, 2].tolist()  # elements: the rank-local shards
    assert int(ranks[:, 0].sum()) == full  # which together are the model
    # Prodigy: four fp32 copies of each rank's own elements, nothing of the other rank's
    assert (ranks[:, 1] == 16 * ranks[:, 0]).all()
