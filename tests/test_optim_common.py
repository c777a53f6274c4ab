"""Contract every registered optimizer keeps, whatever its algorithm.

Parametrised over the registry, so a new optimizer is held to it as soon as it is registered:
it trains, it reads nothing from the device on the host inside ``step()``, a step with a NaN/Inf
gradient changes nothing, a checkpoint round trip continues bit-exactly, ``grad=None`` parameters
and empty groups are left alone, bf16 parameters work.
"""

from __future__ import annotations

import io

import pytest
import torch

from hf_tuningfree.optim import available_optimizers, create_optimizer, get_optimizer_spec
from hf_tuningfree.optim.base import TuningFreeOptimizer, _NonfiniteNotice

NAMES = available_optimizers()


def _visible_lr(name: str) -> dict:
    """The registry's ``visible_lr`` where it has one (T-DoG divides DoG's step by its theory's
    taming factor, ~1e5-1e6 on this problem: multiplying it back checks that the rest of the
    machinery trains)."""
    lr = get_optimizer_spec(name).visible_lr
    return {} if lr is None else {"lr": lr}


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).to(dtype)


def _data(n=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    w = torch.randn(6, 3, generator=gen)
    return x, (x @ w).argmax(dim=1)


def _groups(model, weight_decay=0.0):
    """The Trainer's split: weights decay, biases and norms do not."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [
        p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)
    ]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _loss(model, x, y):
    out = model(x.to(next(model.parameters()).dtype))
    return torch.nn.functional.cross_entropy(out.float(), y)


def _train(model, opt, steps, x, y):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _state_snapshot(opt):
    snap = {}
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            snap[(i, k)] = v.clone() if isinstance(v, torch.Tensor) else v
    if isinstance(opt, TuningFreeOptimizer):
        for k, v in opt.global_state.items():
            if k != "skipped_steps":  # the one thing a skipped step does change
                snap[("global", k)] = v.clone()
    return snap


@pytest.mark.parametrize("name", NAMES)
def test_trains_a_small_model(name):
    model = _model()
    x, y = _data()
    extra = _visible_lr(name)
    opt = create_optimizer(name, _groups(model, 0.01), **extra)
    losses = _train(model, opt, 60, x, y)  # 60 steps for every optimizer
    assert losses[-1] < 0.8 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_step_reads_nothing_back_to_the_host(name, monkeypatch):
    """No .item(), float(t), int(t), bool(t) or .tolist() inside step(): on GPUs each one stalls
    the pipeline. (The CPU-only notice of skipped steps reads a host counter; it is stubbed.)"""
    model = _model()
    x, y = _data()
    opt = create_optimizer(name, _groups(model, 0.01))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host read of a tensor inside optimizer.step()")

    monkeypatch.setattr(_NonfiniteNotice, "watch", lambda self, counter: None)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, x, y).backward()
        with monkeypatch.context() as m:
            for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
                m.setattr(torch.Tensor, attr, forbidden)
            opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_skips_the_step_entirely(name):
    model = _model()
    x, y = _data()
    opt = create_optimizer(name, _groups(model, 0.01))
    _train(model, opt, 3, x, y)
    opt.zero_grad()
    _loss(model, x, y).backward()
    params = list(model.parameters())
    params[0].grad[0, 0] = float("nan")
    params[-1].grad[1] = float("inf")
    before_p = [p.detach().clone() for p in params]
    before_s = _state_snapshot(opt)
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before_p, params, strict=True))
    after_s = _state_snapshot(opt)
    assert before_s.keys() == after_s.keys()
    for k, v in before_s.items():
        w = after_s[k]
        same = torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
        assert same, f"{name}: state {k} changed on a skipped step"
    assert opt.stats()["skipped_steps"] == 1.0
    # training goes on afterwards
    losses = _train(model, opt, 2, x, y)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not all(torch.equal(a, p.detach()) for a, p in zip(before_p, params, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_continues_bit_exactly(name):
    x, y = _data()
    model_a = _model()
    opt_a = create_optimizer(name, _groups(model_a, 0.01))
    _train(model_a, opt_a, 6, x, y)

    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_b = _model()
    model_b.load_state_dict(ckpt["model"])
    opt_b = create_optimizer(name, _groups(model_b, 0.01))
    opt_b.load_state_dict(opt_b.state_dict())  # Accelerate round-trips once before any step
    opt_b.load_state_dict(ckpt["opt"])

    losses_a = _train(model_a, opt_a, 6, x, y)
    losses_b = _train(model_b, opt_b, 6, x, y)
    assert losses_a == losses_b
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert opt_a.stats() == opt_b.stats()


@pytest.mark.parametrize("name", NAMES)
def test_grad_none_params_and_empty_groups_are_left_alone(name):
    model = _model()
    frozen = torch.nn.Parameter(torch.randn(4))
    before = frozen.detach().clone()
    x, y = _data()
    groups = [*_groups(model), {"params": [frozen]}, {"params": []}]
    opt = create_optimizer(name, groups)
    _train(model, opt, 3, x, y)  # `frozen` never receives a gradient
    assert frozen.grad is None
    assert len(opt.state[frozen]) == 0
    assert torch.equal(frozen.detach(), before)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_parameters(name):
    model = _model(torch.bfloat16)
    x, y = _data()
    extra = _visible_lr(name)
    opt = create_optimizer(name, _groups(model, 0.01), **extra)
    losses = _train(model, opt, 30, x, y)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(torch.tensor(losses)).all()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_complete(name):
    spec = get_optimizer_spec(name)
    assert spec.lr > 0
    assert len(spec.description) > 10
    assert any(str(year) in spec.paper for year in range(2010, 2030))
    hp = spec.hyperparameters()
    assert hp["lr"] == spec.lr
    opt = spec.build([torch.nn.Parameter(torch.zeros(2))])
    assert opt.param_groups[0]["lr"] == spec.lr
    stats = opt.stats() if hasattr(opt, "stats") else {}
    assert all(isinstance(v, float) for v in stats.values())
