"""bf16/fp16 parameters with stochastic rounding (issue 15.2): unbiased rounding, no stall where
round-to-nearest loses every update, reproducible under a seed and across a resume, and nothing
changed by a skipped step or for fp32 parameters."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_tuningfree.optim import ADOPT, available_optimizers, create_optimizer
from hf_tuningfree.optim.registry import get_optimizer_spec
from hf_tuningfree.optim.rounding import RoundingStream, stochastic_round


def _neighbours(x: float, dtype: torch.dtype) -> tuple[float, float]:
    near = torch.tensor(x).to(dtype)
    up = torch.nextafter(near, torch.tensor(math.inf, dtype=dtype))
    down = torch.nextafter(near, torch.tensor(-math.inf, dtype=dtype))
    lo, hi = (down, near) if near.float() > x else (near, up)
    return lo.float().item(), hi.float().item()


# ------------------------------------------------------------------------ the rounding itself
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x", [1.0 + 2**-10, -3.3, 7.1e-3, 1000.7])
def test_each_value_goes_to_a_neighbour_with_the_unbiased_probability(dtype, x):
    n = 200_000
    value = torch.full((n,), x, dtype=torch.float32)
    x = value[0].item()  # the fp32 value actually rounded
    lo, hi = _neighbours(x, dtype)
    out = stochastic_round(value, dtype, torch.Generator().manual_seed(0)).float()
    assert set(out.unique().tolist()) <= {lo, hi}
    share = (out == hi).double().mean().item()
    want = (x - lo) / (hi - lo)
    sigma = math.sqrt(want * (1 - want) / n)
    assert abs(share - want) < 5 * sigma + 1e-12, (share, want)
    assert abs(out.double().mean().item() - x) < 5 * sigma * (hi - lo) + 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_representable_values_and_non_finite_ones_are_unchanged(dtype):
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.15625, 3.0], dtype=dtype)
    special = torch.tensor([math.inf, -math.inf, math.nan])
    out = stochastic_round(torch.cat([exact.float(), special]), dtype, torch.Generator())
    assert torch.equal(out[:6], exact)
    assert out[6].item() == math.inf and out[7].item() == -math.inf and math.isnan(out[8])


def test_bad_inputs_are_named():
    with pytest.raises(
        ValueError, match=r"stochastic_round: value must be fp32, got torch\.float64"
    ):
        stochastic_round(torch.zeros(2, dtype=torch.float64), torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        stochastic_round(torch.zeros(2), torch.float32)


# ------------------------------------------------------------------------ in the optimizers
def _adopt_run(
    dtype: torch.dtype, rounding: bool, steps: int, seed: int = 0, start: float = 1.0
) -> torch.Tensor:
    """ADOPT at lr 1e-3 on 4096 weights at ``start`` with a constant gradient: each update is
    lr * g / sqrt(v) = 1e-3, an eighth of bf16's ulp at 1.0 (2^-7), below half of it."""
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.full((4096,), start, dtype=dtype))
    opt = ADOPT([p], lr=1e-3, stochastic_rounding=rounding)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p.detach().float()


def test_updates_below_half_an_ulp_stall_to_nearest_and_accumulate_when_stochastic():
    steps = 200
    fp32 = _adopt_run(torch.float32, True, steps)
    nearest = _adopt_run(torch.bfloat16, False, steps)
    stochastic = _adopt_run(torch.bfloat16, True, steps)
    moved = 1.0 - fp32.mean().item()
    assert moved > 0.15  # fp32 moved ~0.2 (the first ADOPT step has no update)
    assert torch.equal(nearest, torch.ones_like(nearest))  # every update lost
    # each of the 4096 weights is fp32's path rounded at random: a mean within a few sigma
    # (per-step rounding error at most one ulp, independent) of fp32's
    ulp = 2.0**-7
    sigma = ulp * math.sqrt(steps) / math.sqrt(4096)
    assert abs(stochastic.mean().item() - fp32.mean().item()) < 5 * sigma
    assert (stochastic - fp32).abs().max().item() < 60 * ulp


def test_fp16_parameters_accumulate_too():
    # at 6.0 fp16's ulp is 2^-8 ~ 3.9e-3: 1e-3 updates are below half of it
    fp32 = _adopt_run(torch.float32, True, 100, start=6.0)
    nearest = _adopt_run(torch.float16, False, 100, start=6.0)
    stochastic = _adopt_run(torch.float16, True, 100, start=6.0)
    assert torch.equal(nearest, torch.full_like(nearest, 6.0))
    sigma = 2.0**-8 * math.sqrt(100) / math.sqrt(4096)
    assert fp32.mean().item() < 6.0 - 0.08
    assert abs(stochastic.mean().item() - fp32.mean().item()) < 5 * sigma


def test_the_same_seed_gives_the_same_run_and_another_seed_another():
    a = _adopt_run(torch.bfloat16, True, 20, seed=3)
    b = _adopt_run(torch.bfloat16, True, 20, seed=3)
    c = _adopt_run(torch.bfloat16, True, 20, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ["adopt", "prodigy", "dog", "hyper_adam"])
def test_a_resumed_run_continues_with_the_same_random_bits(name):
    def fresh():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.linspace(-1, 1, 513).to(torch.bfloat16))
        return p, create_optimizer(name, [p])

    def grad(p, k):
        return (torch.sin(torch.arange(p.numel()) * 0.1 + k)).to(torch.bfloat16)

    p, opt = fresh()
    for k in range(10):
        p.grad = grad(p, k)
        opt.step()
    expected = p.detach().clone()

    p, opt = fresh()
    for k in range(4):
        p.grad = grad(p, k)
        opt.step()
    saved, weights = copy.deepcopy(opt.state_dict()), p.detach().clone()
    torch.manual_seed(123)  # the resumed process is seeded differently: the stream is saved
    q = torch.nn.Parameter(weights)
    resumed = create_optimizer(name, [q])
    resumed.load_state_dict(saved)
    for k in range(4, 10):
        q.grad = grad(q, k)
        resumed.step()
    assert torch.equal(q.detach(), expected)


def test_a_skipped_step_leaves_bf16_weights_and_state_bit_identical():
    p = torch.nn.Parameter(torch.linspace(-1, 1, 257).to(torch.bfloat16))
    opt = create_optimizer("prodigy", [p])
    p.grad = torch.ones_like(p)
    opt.step()
    before, state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    p.grad = torch.full_like(p, math.nan)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(p.detach(), before)
    after = opt.state_dict()["state"][0]
    for key, value in state["state"][0].items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("name", available_optimizers())
def test_fp32_parameters_are_untouched_by_the_option(name):
    runs = []
    for rounding in (True, False):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 65, dtype=torch.float32))
        opt = create_optimizer(name, [p], stochastic_rounding=rounding)
        for k in range(3):
            p.grad = torch.cos(torch.arange(65) * 0.3 + k)
            opt.step()
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1])


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.exp2(exponent - 7)


@pytest.mark.parametrize("implementation", ["auto", "loop"])
@pytest.mark.parametrize("name", available_optimizers())
def test_every_optimizer_rounds_its_bf16_update_to_a_neighbour(name, implementation):
    """One step from the same bf16 weights and state: stochastic and to-nearest results are
    neighbours (at most one ulp apart), and some elements differ (the rounding did happen)."""
    out = []
    for rounding in (True, False):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4099).to(torch.bfloat16))
        opt = create_optimizer(
            name, [p], stochastic_rounding=rounding, implementation=implementation
        )
        p.grad = torch.sin(torch.arange(4099) * 0.37).to(torch.bfloat16)
        opt.step()
        out.append(p.detach().float())
    stochastic, nearest = out
    gap = (stochastic - nearest).abs()
    assert (gap <= _bf16_ulp(torch.maximum(stochastic.abs(), nearest.abs())) + 0.0).all()
    if not torch.equal(nearest, torch.linspace(0.5, 1.5, 4099).to(torch.bfloat16).float()):
        assert (gap > 0).any()  # the weights moved, so some rounding went the other way


@pytest.mark.parametrize("name", available_optimizers())
def test_the_option_is_a_constructor_argument_of_every_optimizer(name):
    assert get_optimizer_spec(name).hyperparameters()["stochastic_rounding"] is True
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match=r"'stochastic_rounding' of optimizer .* must be bool"):
        create_optimizer(name, [p], stochastic_rounding="yes")
    with pytest.raises(TypeError, match="stochastic_rounding must be True or False, got str"):
        get_optimizer_spec(name).cls([p], stochastic_rounding="yes")
    with pytest.raises(ValueError, match="stochastic_rounding is a constructor argument"):
        create_optimizer(name, [{"params": [p], "stochastic_rounding": False}])


def test_a_deep_copy_keeps_the_stream_and_steps_identically():
    p = torch.nn.Parameter(torch.linspace(-1, 1, 300).to(torch.bfloat16))
    opt = ADOPT([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    twin_p, twin = copy.deepcopy((p, opt))  # one memo: the copy's group holds twin_p
    assert twin.param_groups[0]["params"][0] is twin_p
    for _ in range(3):
        p.grad = torch.ones_like(p)
        twin_p.grad = torch.ones_like(twin_p)
        opt.step()
        twin.step()
    assert torch.equal(p.detach(), twin_p.detach())


def test_the_stream_reseeds_per_call_from_two_integers():
    a, b = RoundingStream(5), RoundingStream.from_state({"seed": 5, "calls": 0})
    draws = []
    for stream in (a, b):
        stream.begin_step()
        draws.append(
            torch.randint(0, 1 << 16, (8,), generator=stream.generator(torch.device("cpu")))
        )
    assert torch.equal(draws[0], draws[1])
    a.begin_step()
    again = torch.randint(0, 1 << 16, (8,), generator=a.generator(torch.device("cpu")))
    assert not torch.equal(again, draws[0])
    assert a.state() == {"seed": 5, "calls": 2}
