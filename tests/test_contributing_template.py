"""CONTRIBUTING.md's template is a real optimizer: its code block, registered as its registry block
says, matches the paper's algorithm per element at fp64, skips a NaN step, resumes exactly, fails
early on bad arguments and reduces over FSDP2 shards like one process."""

from __future__ import annotations

import copy
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from hf_tuningfree.optim import create_optimizer, get_optimizer_spec, registry

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def _template_module() -> types.ModuleType:
    name = "contributing_template_dowg"
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(BLOCKS[0], "CONTRIBUTING.md:dowg.py", "exec"), module.__dict__)
    return module


@pytest.fixture
def dowg():
    """The template's class, registered under the name its registry block gives (then removed)."""
    module = _template_module()
    scope = {
        "register_optimizer": registry.register_optimizer,
        "OptimizerSpec": registry.OptimizerSpec,
        "DoWG": module.DoWG,
    }
    exec(compile(BLOCKS[1], "CONTRIBUTING.md:registry", "exec"), scope)
    try:
        yield module.DoWG
    finally:
        registry._REGISTRY.pop("dowg", None)


def test_the_file_holds_the_template_and_its_registry_entry():
    assert BLOCKS[0].startswith("# hf_tuningfree/optim/dowg.py\n")
    assert "register_optimizer(" in BLOCKS[1]


# ---------------------------------------------------------------------- the paper, per element
SHAPES = [[(3, 4), (5,)], [(2, 3)]]
STEPS = 25


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in grp] for grp in SHAPES]
    grads = []
    for t in range(STEPS):
        step = []
        for grp in init:
            # the second tensor of the first group has no gradient every fourth step
            step.append([None if (gi_pi == 1 and t % 4 == 2) else
                         torch.randn(p.shape, generator=gen, dtype=torch.float64)
                         for gi_pi, p in enumerate(grp)])  # fmt: skip
        grads.append(step)
    return init, grads


def reference_dowg(init, grads, lrs, reps_rel):
    """Khaled, Mishchenko & Jin (2023), Algorithm 1, in Python floats: rbar_t = max(rbar_{t-1},
    ||x_t - x_0||), v_t = v_{t-1} + rbar_t^2 ||g_t||^2, x_{t+1} = x_t - lr rbar_t^2/sqrt(v_t) g_t;
    rbar_{-1} = reps_rel (1 + ||x_0||); norms over every element of every tensor."""
    x0 = [[p.flatten().tolist() for p in grp] for grp in init]
    x = copy.deepcopy(x0)
    rbar = reps_rel * (1.0 + math.sqrt(sum(e * e for grp in x0 for p in grp for e in p)))
    v = 0.0
    for step in grads:
        dist = math.sqrt(sum((a - b) ** 2 for gx, g0 in zip(x, x0, strict=True)
                             for px, p0 in zip(gx, g0, strict=True)
                             for a, b in zip(px, p0, strict=True)))  # fmt: skip
        rbar = max(rbar, dist)
        g_sq = sum(e * e for grp in step for g in grp if g is not None for e in g.flatten())
        v += rbar * rbar * g_sq
        eta = rbar * rbar / math.sqrt(v)
        for gi, grp in enumerate(step):
            for pi, g in enumerate(grp):
                if g is None:
                    continue
                for e, ge in enumerate(g.flatten().tolist()):
                    x[gi][pi][e] -= lrs[gi] * eta * ge
    return x


@pytest.mark.parametrize("impl", ["loop", "foreach"])
def test_matches_the_paper_per_element_at_fp64(dowg, impl):
    init, grads = _problem()
    lrs, reps_rel = (1.0, 0.5), 1e-3
    params = [[torch.nn.Parameter(p.clone()) for p in grp] for grp in init]
    groups = [{"params": ps, "lr": lr} for ps, lr in zip(params, lrs, strict=True)]
    opt = create_optimizer("dowg", groups, reps_rel=reps_rel, implementation=impl)
    for step in grads:
        for ps, gs in zip(params, step, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = g
        opt.step()
    expected = reference_dowg(init, grads, lrs, reps_rel)
    worst = max(
        abs(a - b) / max(abs(b), 1e-3)
        for ps, es in zip(params, expected, strict=True)
        for p, e in zip(ps, es, strict=True)
        for a, b in zip(p.detach().flatten().tolist(), e, strict=True)
    )
    assert worst < 1e-12, worst  # measured: ~1e-15
    assert opt.stats()["step"] == STEPS
    # the iterates left the start: the test exercises rbar's growth, not only rbar_{-1}
    start = reps_rel * (1.0 + math.sqrt(sum(p.square().sum().item() for g in init for p in g)))
    assert opt.stats()["rbar"] > 2.5 * start


def test_a_nan_step_changes_nothing_and_a_resume_is_exact(dowg):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = create_optimizer("dowg", [p])
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    before = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert torch.equal(p, before[0])
    assert opt.stats()["skipped_steps"] == 1
    saved = before[1]["param_groups"][0]["global_state"]
    assert torch.equal(opt.global_state["rbar"], saved["rbar"])
    assert torch.equal(opt.global_state["v"], saved["v"])

    q = torch.nn.Parameter(p.detach().clone())
    resumed = create_optimizer("dowg", [q])
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad, q.grad = g, g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(p, q)


def test_bad_arguments_fail_when_built(dowg):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="reps_rel"):
        create_optimizer("dowg", [p], reps_rel=0.0)
    with pytest.raises(ValueError, match="implementation"):
        create_optimizer("dowg", [p], implementation="cuda")
    q = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="model-wide initial distance"):
        dowg([{"params": [p]}, {"params": [q], "reps_rel": 1e-2}])


def test_the_step_size_key_it_declares_is_logged(dowg):
    p = torch.nn.Parameter(torch.randn(4))
    opt = create_optimizer("dowg", [p])
    p.grad = torch.randn(4)
    opt.step()
    value = opt.stats()[get_optimizer_spec("dowg").step_size_key]
    assert value == pytest.approx(opt.stats()["rbar"] ** 2 / opt.stats()["v"] ** 0.5, rel=1e-12)


# ---------------------------------------------------------------------- sharded
def _fsdp2_worker(rank, world, port, out):
    from dist_helpers import process_group, shard_fsdp2

    module = _template_module()
    with process_group(rank, world, port):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).double()
        reference = copy.deepcopy(model)
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
        shard_fsdp2(model, mesh)
        opts = [module.DoWG(model.parameters()), module.DoWG(reference.parameters())]
        for t in range(4):
            x = torch.randn(6, 8, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
            for net, opt in zip((model, reference), opts, strict=True):
                opt.zero_grad()
                net(x).square().mean().backward()
                opt.step()
        full = [p.full_tensor() for p in model.parameters()]
        if rank == 0:
            torch.save({"sharded": full, "one": list(reference.parameters())}, out)


def test_fsdp2_shards_step_like_one_process():
    from dist_helpers import spawn_and_collect

    got = spawn_and_collect(_fsdp2_worker)
    for a, b in zip(got["sharded"], got["one"], strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


def test_the_template_is_lint_clean(tmp_path):
    """The block is what a file of the package must be: ruff-clean and formatted (the README's
    ``make lint`` does not read markdown, so this test does)."""
    import subprocess

    ruff = Path(sys.executable).parent / "ruff"
    path = tmp_path / "dowg.py"
    path.write_text(BLOCKS[0], encoding="utf-8")
    config = ["--config", str(ROOT / "pyproject.toml")]
    checks = [[str(ruff), "check", *config, str(path)],
              [str(ruff), "format", "--check", *config, str(path)]]  # fmt: skip
    for argv in checks:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
