"""PolynomialDecayAverager: the closed form, in-place swaps, exact resume, skipped steps,
buffers, frozen parameters and torch.optim.swa_utils."""

from __future__ import annotations

import io

import pytest
import torch

from hf_tuningfree.optim import PolynomialDecayAverager, create_optimizer
from hf_tuningfree.optim.averaging import (
    get_polynomial_decay_avg_fn,
    get_polynomial_decay_multi_avg_fn,
)


def closed_form(iterates: list[torch.Tensor], gamma: float) -> torch.Tensor:
    """sum_t w_t x_t with w_t = (gamma+1)/(t+gamma) * prod_{s>t} (1 - (gamma+1)/(s+gamma))."""
    T = len(iterates)
    total = torch.zeros_like(iterates[0])
    for t in range(1, T + 1):
        w = (gamma + 1) / (t + gamma)
        for s in range(t + 1, T + 1):
            w *= 1 - (gamma + 1) / (s + gamma)
        total += w * iterates[t - 1]
    return total


@pytest.mark.parametrize("gamma", [8.0, 0.0, 2.5])
def test_equals_the_closed_form_weighted_average(gamma):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))
    averager = PolynomialDecayAverager([p], gamma=gamma)
    iterates = []
    for _ in range(40):
        with torch.no_grad():
            p.copy_(torch.randn(7, dtype=torch.float64))
        iterates.append(p.detach().clone())
        averager.update()
    avg = averager.state_dict()["averages"]["0"]
    assert torch.allclose(avg, closed_form(iterates, gamma), rtol=0, atol=1e-12)
    assert averager.num_updates == 40
    weights = closed_form([torch.ones(1, dtype=torch.float64)] * 40, gamma)
    assert weights.item() == pytest.approx(1.0)  # the weights sum to one
    if gamma == 0.0:  # gamma = 0: the uniform average
        assert torch.allclose(avg, torch.stack(iterates).mean(0), atol=1e-12)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )


def _train(model, opt, averager, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        averager.update(skipped=opt.last_step_skipped)


def test_swap_in_and_out_restores_training_weights_bit_exactly():
    model = _net()
    opt = create_optimizer("dog", model.parameters(), reps_rel=1e-3)
    averager = PolynomialDecayAverager(model)
    _train(model, opt, averager, 12)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    averages = {k: v.clone() for k, v in averager.state_dict()["averages"].items()}
    assert set(averages) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "3.weight",
        "3.bias",
    }  # fmt: skip  (num_batches_tracked is an integer buffer: not averaged)
    with averager.swapped():
        assert averager.is_swapped
        live = model.state_dict()
        for name, value in averages.items():
            assert torch.equal(live[name], value), name
        assert torch.equal(live["1.num_batches_tracked"], training["1.num_batches_tracked"])
        # state_dict while swapped still reports the averages
        for name, value in averager.state_dict()["averages"].items():
            assert torch.equal(value, averages[name])
        assert not torch.equal(live["0.weight"], training["0.weight"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, training[name]), name
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    # the average itself survived the round trip
    for name, value in averager.state_dict()["averages"].items():
        assert torch.equal(value, averages[name])


def test_swap_restores_on_exception_and_rejects_misuse():
    model = _net()
    averager = PolynomialDecayAverager(model)
    with torch.no_grad():
        averager.update()
        for p in model.parameters():
            p.add_(1.0)
        averager.update()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError), averager.swapped():
        raise KeyError("evaluation failed")
    assert not averager.is_swapped
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    averager.swap_in()
    with pytest.raises(RuntimeError, match="swap_in"):
        averager.swap_in()
    with pytest.raises(RuntimeError, match="swapped in"):
        averager.update()
    averager.swap_out()
    with pytest.raises(RuntimeError, match="swap_out"):
        averager.swap_out()


def test_swap_with_fp32_average_of_bf16_parameters():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    averager = PolynomialDecayAverager([p], dtype=torch.float32)
    for _ in range(20):
        with torch.no_grad():
            p.add_(torch.randn(64).bfloat16() * 1e-2)
        averager.update()
    training = p.detach().clone()
    avg = averager.state_dict()["averages"]["0"].clone()
    assert avg.dtype == torch.float32
    with averager.swapped():
        assert torch.equal(p.detach(), avg.bfloat16())
    assert torch.equal(p.detach(), training)


def test_frozen_parameters_are_not_averaged():
    """PEFT-style: only parameters that train are averaged (and swapped)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    averager = PolynomialDecayAverager(model, include_buffers=False)
    assert averager.names == ["1.weight", "1.bias"]
    averager.update()
    frozen = model[0].weight.detach().clone()
    with averager.swapped():
        assert torch.equal(model[0].weight.detach(), frozen)


def test_skipped_steps_leave_the_average_alone():
    p = torch.nn.Parameter(torch.zeros(3))
    averager = PolynomialDecayAverager([p])
    with torch.no_grad():
        p.fill_(1.0)
    averager.update()
    snapshot = averager.state_dict()["averages"]["0"].clone()
    with torch.no_grad():
        p.fill_(5.0)
    averager.update(skipped=True)
    averager.update(skipped=torch.tensor(True))  # the optimizer's device flag: no host read
    assert torch.equal(averager.state_dict()["averages"]["0"], snapshot)
    assert averager.num_updates == 1
    averager.update(skipped=torch.tensor(False))
    assert averager.num_updates == 2
    w = 9 / 10  # (gamma + 1) / (t + gamma) at t = 2
    assert torch.allclose(averager.state_dict()["averages"]["0"], torch.full((3,), 1 + w * 4))


def test_optimizer_nan_step_is_not_averaged():
    model = _net()
    opt = create_optimizer("dog", model.parameters())
    averager = PolynomialDecayAverager(model)
    _train(model, opt, averager, 3)
    before = {k: v.clone() for k, v in averager.state_dict()["averages"].items()}
    opt.zero_grad()
    model(torch.randn(16, 4)).pow(2).mean().backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        opt.step()
    averager.update(skipped=opt.last_step_skipped)
    after = averager.state_dict()["averages"]
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert averager.num_updates == 3


def test_resume_of_optimizer_and_averager_is_bit_exact():
    model_a = _net()
    opt_a = create_optimizer("ldog", model_a.parameters(), reps_rel=1e-3)
    avg_a = PolynomialDecayAverager(model_a)
    _train(model_a, opt_a, avg_a, 6, seed=3)
    buf = io.BytesIO()
    torch.save(
        {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "avg": avg_a.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b = _net()
    model_b.load_state_dict(ckpt["model"])
    opt_b = create_optimizer("ldog", model_b.parameters(), reps_rel=1e-3)
    opt_b.load_state_dict(ckpt["opt"])
    avg_b = PolynomialDecayAverager(model_b)
    avg_b.load_state_dict(ckpt["avg"])
    _train(model_a, opt_a, avg_a, 6, seed=4)
    _train(model_b, opt_b, avg_b, 6, seed=4)
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    sa, sb = avg_a.state_dict(), avg_b.state_dict()
    assert torch.equal(sa["num_updates"], sb["num_updates"])
    for k, v in sa["averages"].items():
        assert torch.equal(v, sb["averages"][k]), k


def test_load_state_dict_checks_names_and_shapes():
    avg = PolynomialDecayAverager(torch.nn.Linear(2, 2))
    avg.update()
    sd = avg.state_dict()
    other = PolynomialDecayAverager(torch.nn.Linear(2, 3))
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(sd)
    bad = {**sd, "averages": {"weight": sd["averages"]["weight"]}}
    with pytest.raises(ValueError, match="missing"):
        PolynomialDecayAverager(torch.nn.Linear(2, 2)).load_state_dict(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        PolynomialDecayAverager([torch.zeros(2)], gamma=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        PolynomialDecayAverager([torch.zeros(2)], dtype=torch.int32)
    with pytest.raises(TypeError, match="floating"):
        PolynomialDecayAverager([torch.zeros(2, dtype=torch.int64)])
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to average"):
        PolynomialDecayAverager(frozen, include_buffers=False).update()


def test_matches_swa_utils_averaged_model():
    """AveragedModel with our multi_avg_fn (or avg_fn) computes the same average."""
    model = torch.nn.Linear(5, 3)
    ours = PolynomialDecayAverager(model)
    theirs = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=get_polynomial_decay_multi_avg_fn(8.0)
    )
    single = torch.optim.swa_utils.AveragedModel(model, avg_fn=get_polynomial_decay_avg_fn(8.0))
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ours.update()
        theirs.update_parameters(model)
        single.update_parameters(model)
    for name, value in ours.state_dict()["averages"].items():  # fp32: measured 0
        assert torch.allclose(theirs.module.state_dict()[name], value, rtol=0, atol=1e-6)
        assert torch.allclose(single.module.state_dict()[name], value, rtol=0, atol=1e-6)


def test_update_bn_inside_swapped():
    """swa_utils.update_bn recomputes batch-norm statistics for the averaged weights; swapping
    out afterwards puts the training statistics back."""
    model = _net()
    averager = PolynomialDecayAverager(model)
    opt = create_optimizer("dog", model.parameters(), reps_rel=1e-3)
    _train(model, opt, averager, 5)
    training_stats = model[1].running_mean.clone()
    loader = [torch.randn(16, 4) for _ in range(3)]
    with averager.swapped():
        torch.optim.swa_utils.update_bn(loader, model)
        recomputed = model[1].running_mean.clone()
    assert torch.equal(model[1].running_mean, training_stats)
    # what was written while swapped in stays with the average
    assert torch.equal(averager.state_dict()["averages"]["1.running_mean"], recomputed)


def test_update_is_sync_free(monkeypatch):
    averager = PolynomialDecayAverager(torch.nn.Linear(3, 3))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host read of a tensor inside update()")

    averager.update()
    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, attr, forbidden)
        averager.update(skipped=torch.tensor(False))
        averager.update()
