"""``d_groups="group"``: one estimate of ``d`` per named param group (prodigy #3, #16, PR #9, #34;
dadaptation PR #40; prodigy-plus-schedule-free #15, #41).

Each estimate must be exactly the model-wide algorithm run on its groups alone, so it is tested
against separate optimizers, one per name, whose model-wide ``d`` the fp64 references of
test_dadapt.py and test_schedule_free.py pin down; unnamed groups (the Trainer's decay/no-decay
split) share one estimate; resume and FSDP2 on 2 gloo processes as for the model-wide ``d``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_helpers import CountCollectives, process_group, shard_fsdp2, spawn

from hf_tuningfree.optim import (
    DAdaptAdaGrad,
    DAdaptAdam,
    DAdaptSGD,
    Prodigy,
    ProdigyScheduleFree,
    create_optimizer,
)

CLASSES = [DAdaptSGD, DAdaptAdam, DAdaptAdaGrad, Prodigy, ProdigyScheduleFree]
KWARGS = {DAdaptSGD: {"momentum": 0.9}, DAdaptAdaGrad: {"momentum": 0.5}}


def _tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (4, 3), (3,), (2, 7)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    scale = [1.0, 1.0, 30.0, 30.0, 1.0]  # group "b" sees gradients 30x larger
    targets = [torch.randn(s, generator=gen) for s in shapes]
    return init, scale, targets


def _run(cls, layout, impl, steps=15):
    """``layout``: per optimizer, its groups as (tensor indices, group options)."""
    init, scale, targets = _tensors()
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opts = []
    for groups, model_kw in layout:
        pg = [{"params": [params[i] for i in idx], **kw} for idx, kw in groups]
        opts.append(cls(pg, d0=1e-3, implementation=impl, **KWARGS.get(cls, {}), **model_kw))
    for t in range(steps):
        for p, c, tg in zip(params, scale, targets, strict=True):
            p.grad = c * (p.detach() - tg) + 0.1 * torch.cos(torch.full_like(p, t + 1.0))
        for o in opts:
            o.step()
    return params, opts


@pytest.mark.parametrize("impl", ["loop", "auto"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_named_estimate_is_the_algorithm_on_its_groups_alone(cls, impl):
    grouped = [
        (
            [
                ([0, 1], {"name": "a"}),
                ([2, 3], {"name": "b", "weight_decay": 0.01}),
                ([4], {"name": "a", "lr": 0.5}),
            ],
            {"d_groups": "group"},
        )
    ]
    separate = [
        ([([0, 1], {}), ([4], {"lr": 0.5})], {}),
        ([([2, 3], {"weight_decay": 0.01})], {}),
    ]
    pa, (together,) = _run(cls, grouped, impl)
    pb, (alone_a, alone_b) = _run(cls, separate, impl)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    st = together.stats()
    assert st["d/a"] == alone_a.stats()["d"] and st["d/b"] == alone_b.stats()["d"]
    assert st["d"] == st["d/a"]  # no unnamed group: "d" is the first named estimate's
    print(f"{cls.__name__}: d/a {st['d/a']:.3g}, d/b {st['d/b']:.3g}")
    assert st["d/a"] != st["d/b"] and min(st["d/a"], st["d/b"]) > 1e-3  # two, both grown


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unnamed_groups_share_one_estimate(cls):
    """The Trainer's decay/no-decay split has no names: one d, as with d_groups="model"."""
    groups = [([0, 2, 4], {"weight_decay": 0.01}), ([1, 3], {})]
    pa, (a,) = _run(cls, [(groups, {"d_groups": "group"})], "auto")
    pb, (b,) = _run(cls, [(groups, {})], "auto")
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert a.stats() == b.stats() and not any("/" in k for k in a.stats())


def test_resume_with_per_group_estimates_is_bit_identical(tmp_path):
    init, scale, targets = _tensors()

    def run(resume_at=None):
        params = [torch.nn.Parameter(x.clone()) for x in init]

        def build():
            return Prodigy(
                [{"params": params[:2], "name": "a"}, {"params": params[2:], "name": "b"}],
                d0=1e-3,
                d_groups="group",
            )

        opt = build()
        for t in range(12):
            if t == resume_at:
                torch.save(opt.state_dict(), tmp_path / "opt.pt")
                opt = build()
                opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
            for p, c, tg in zip(params, scale, targets, strict=True):
                p.grad = c * (p.detach() - tg)
            opt.step()
        return params, opt.stats()

    (pa, sa), (pb, sb) = run(), run(resume_at=6)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert sa == sb and sa["d/a"] != sa["d/b"]


def test_group_names_are_checked():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"group name 'x@y'.*without '@'"):
        Prodigy([{"params": [p], "name": "x@y"}], d_groups="group")
    with pytest.raises(ValueError, match="d_groups"):
        Prodigy([p], d_groups="tensor")
    q = torch.nn.Parameter(torch.zeros(2))
    opt = Prodigy([p], d_groups="group")
    with pytest.raises(ValueError, match=r"d_groups.*must be the same in every group"):
        opt.add_param_group({"params": [q], "d_groups": "model"})


# ---------------------------------------------------------------------- FSDP2, 2 gloo processes
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3), torch.nn.Tanh(),
        torch.nn.Linear(3, 1),
    )  # fmt: skip


def _groups(model):
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    return [
        {"params": list(layers[0].parameters()), "name": "first"},
        {"params": [p for m in layers[1:] for p in m.parameters()]},
    ]


def _steps(model, opt, x, y, collectives=None):
    ds = []
    for _ in range(8):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        with CountCollectives() as counter:
            opt.step()
        if collectives is not None:
            assert counter.count == collectives
        st = opt.stats()
        ds.append((st["d"], st["d/first"]))
    return ds


def _fsdp2_worker(rank: int, world: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with process_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
        local = slice(rank * 16, (rank + 1) * 16)
        for name in ("prodigy", "dadapt_sgd", "prodigy_sf"):
            ref = _model()
            ref_opt = create_optimizer(name, _groups(ref), d0=1e-3, d_groups="group")
            ref_ds = _steps(ref, ref_opt, x, y)
            model = shard_fsdp2(_model(), mesh)
            opt = create_optimizer(name, _groups(model), d0=1e-3, d_groups="group")
            ds = _steps(model, opt, x[local], y[local], collectives=1)  # both estimates, one
            pairs = zip(ds, ref_ds, strict=True)
            rel = max(abs(a - b) / b for p, r in pairs for a, b in zip(p, r, strict=True))
            params = [p.full_tensor() for p in model.parameters()]
            prel = max(
                ((p - r).abs().max() / r.abs().max()).item()
                for p, r in zip(params, ref.parameters(), strict=True)
            )
            assert rel < 1e-5 and prel < 1e-5, (name, rel, prel)  # fp32: measured 2.6e-7
            assert ds[-1][0] != ds[-1][1]
            gathered = [None] * world
            dist.all_gather_object(gathered, ds)
            assert all(g == ds for g in gathered)
            if rank == 0:
                print(
                    f"{name}: d {ds[-1][0]:.3g} d/first {ds[-1][1]:.3g}, rel {rel:.1e}/{prel:.1e}"
                )


def test_fsdp2_per_group_estimates_match_one_process():
    spawn(_fsdp2_worker)
