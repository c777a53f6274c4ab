"""Schedule-free Prodigy against a per-element statement of the two papers' algorithms, its
train/eval modes, checkpoints, skipped steps and the Trainer's use of it.

The reference keeps the three sequences of Defazio et al. (NeurIPS 2024) as separate numbers,
``x`` (the average), ``z`` (the base iterate) and ``y`` (where the gradient is taken), with
Prodigy's estimate of ``d`` (Mishchenko & Defazio, ICML 2024) computed at ``y``; the optimizer
stores only ``y`` (the parameters) and ``z``. The test problem is test_dadapt's (a separable
noisy quadratic, two groups, a parameter without gradient every third step).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_dadapt import D0, SHAPES, _convention, _make_problem, _run_ours

from hf_tuningfree.optim import ProdigyScheduleFree, create_optimizer
from hf_tuningfree.optim.reference.schedule_free import prodigy_sf_sequences

TOL = 1e-12
#: The reference updates x and y from z (three sequences), the optimizer y directly (two): the
#: operations differ in order, so their ~1e-16 roundings differ, and the iteration amplifies
#: them; measured up to 1.1e-14 (y), 3.4e-15 (x), d 2.6e-15.
TOL_ITERATES = 1e-12
BETAS = (0.8, 0.99)


def _groups(decoupled):
    return [
        dict(lr=1.0, weight_decay=0.1, decoupled_weight_decay=decoupled, eps=1e-8),
        dict(lr=0.5, weight_decay=0.0, decoupled_weight_decay=decoupled, eps=1e-3),
    ]


def _worst(params, expected):
    return max(
        ((p.detach().double().flatten() - torch.tensor(e, dtype=torch.float64)).abs()
         / (1 + torch.tensor(e, dtype=torch.float64).abs())).max().item()
        for ps, es in zip(params, expected, strict=True)
        for p, e in zip(ps, es, strict=True)
    )  # fmt: skip


@pytest.mark.parametrize("d0_rel", [1e-3, 0.0], ids=["start1e-3", "no_start"])
@pytest.mark.parametrize(
    "bias_correction, safeguard, coef",
    [(True, False, 1.0), (False, False, 1.0), (True, True, 0.5)],
    ids=["bc", "no_bc", "bc_safeguard_coef0.5"],
)
@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled_wd", "decoupled_wd"])
@pytest.mark.parametrize("growth_rate", [math.inf, 1.5], ids=["growth_inf", "growth_1.5"])
def test_matches_the_three_sequence_reference(d0_rel, bias_correction, safeguard, coef,
                                              decoupled, growth_rate):  # fmt: skip
    """The parameters follow y, after eval() x, and d follows the reference's at every step
    (fp64; d to 1e-12 relative, the iterates to TOL_ITERATES), on the per-tensor loop."""
    prob = _make_problem()
    hp = _groups(decoupled)
    model = {"d0": D0, "d0_rel": d0_rel, "growth_rate": growth_rate, "betas": BETAS}
    model["d_coef"] = coef
    model |= {"use_bias_correction": bias_correction, "safeguard_warmup": safeguard}
    ds = _assert_matches_reference(prob, hp, model)
    assert ds[-1] > 3 * D0, "d did not grow: the test would not exercise it"


def _assert_matches_reference(prob, hp, model):
    """Run the optimizer (the per-tensor loop: prodigy_sf has no C kernels, so "auto" on CPU is
    this loop) and the reference; y, x after eval() and d agree. Returns the reference's d."""
    x_ref, y_ref, ds_ref = prodigy_sf_sequences(*_convention(prob), hp, **model)
    params, ds, opt = _run_ours(ProdigyScheduleFree, prob, hp, model, impl="loop")
    worst_y = _worst(params, y_ref)
    worst_d = max(abs(a - b) / b for a, b in zip(ds, ds_ref, strict=True))
    opt.eval()
    worst_x = _worst(params, x_ref)
    print(f"y {worst_y:.1e} x {worst_x:.1e} d {worst_d:.1e} d_last {ds[-1]:.3g}")
    assert worst_y <= TOL_ITERATES and worst_x <= TOL_ITERATES and worst_d <= TOL
    return ds_ref


@pytest.mark.parametrize(
    "warmup_steps, r", [(4, 0.0), (0, 1.0), (6, 2.0)], ids=["warmup4", "r1", "warmup6_r2"]
)
def test_warmup_and_polynomial_weighting_match_the_reference(warmup_steps, r):
    """``warmup_steps`` scales the step (and the numerator's and s's weights) by
    ``min(1, (k+1)/warmup_steps)``; ``r`` weighs z_k by ``(k+1)^r lr_max^2`` in x (fp64)."""
    prob = _make_problem()
    hp = _groups(True)
    model = {"d0": D0, "d0_rel": 1e-3, "betas": BETAS, "use_bias_correction": True}
    ds_ref = _assert_matches_reference(prob, hp, {**model, "warmup_steps": warmup_steps, "r": r})
    _, _, ds_plain = prodigy_sf_sequences(*_convention(prob), hp, **model)
    # the options change the run (else this test would not exercise them)
    assert max(abs(a - b) / b for a, b in zip(ds_ref, ds_plain, strict=True)) > 1e-3


@pytest.mark.parametrize("slice_p", [2, 3])
def test_slice_p_matches_the_reference(slice_p):
    """``slice_p = k``: the numerator and ``s`` on every k-th element of each tensor (``s`` at
    1/k size), ``||s||_1`` over them; the update of y, z, x on every element (fp64)."""
    prob = _make_problem()
    hp = _groups(True)
    model = {"d0": D0, "d0_rel": 1e-3, "betas": BETAS, "use_bias_correction": True}
    ds_ref = _assert_matches_reference(prob, hp, {**model, "slice_p": slice_p})
    _, _, ds_plain = prodigy_sf_sequences(*_convention(prob), hp, **model)
    assert max(abs(a - b) / b for a, b in zip(ds_ref, ds_plain, strict=True)) > 1e-3


def test_averaging_weight_with_r_and_warmup():
    """At a constant d, c_k = (k+1)^r / sum_{i<=k} (i+1)^r (the default r = 2 included, r = 0:
    1 / (k+1), the uniform average); during a linear warm-up the weight is the squared step
    times (k+1)^r, so c_k = (k+1)^(2+r) / sum (i+1)^(2+r) while k < warmup_steps."""
    torch.manual_seed(0)

    def poly(power):
        return [(k + 1) ** power / sum((i + 1) ** power for i in range(k + 1)) for k in range(8)]

    for kwargs, expected in [
        ({"r": 1.0}, poly(1)),
        ({}, poly(2)),
        ({"r": 0.0}, poly(0)),
        ({"warmup_steps": 100, "r": 0.0}, poly(2)),
        ({"warmup_steps": 100}, poly(4)),
    ]:
        p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
        opt = ProdigyScheduleFree(
            [p], d0=1e-6, d0_rel=0.0, growth_rate=1.0, use_bias_correction=False, **kwargs
        )
        cs = []
        for _ in range(8):
            p.grad = p.detach().clone()
            opt.step()
            cs.append(opt.stats()["sf_average_weight"])
        assert cs == pytest.approx(expected, rel=1e-12, abs=0), kwargs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"warmup_steps": 2.5}, r"Invalid warmup_steps: 2.5; allowed: an integer >= 0"),
        ({"warmup_steps": -1}, r"Invalid warmup_steps: -1; allowed: an integer >= 0"),
        ({"r": -0.5}, r"Invalid r: -0.5; allowed: a finite number >= 0"),
    ],
)
def test_warmup_and_r_are_checked_when_built(kwargs, message):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=message):
        ProdigyScheduleFree([p], **kwargs)


def test_warmup_and_r_are_model_wide():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"r=1.0 in a param group differs from 2.0"):
        ProdigyScheduleFree([{"params": [a]}, {"params": [b], "r": 1.0}])


def _quadratic_run(steps, *, checkpoint_at=None, eval_at=(), tmp_path=None, **kwargs):
    """A small fp32 problem: ``steps`` steps with eval()/train() around the steps in
    ``eval_at``; with ``checkpoint_at``, the state is saved there in eval mode (as the Trainer
    saves), loaded into a fresh optimizer and parameter, and the run continues."""
    torch.manual_seed(0)
    init = torch.randn(13)
    target = torch.randn(13)
    noise = [0.1 * torch.randn(13) for _ in range(steps)]
    p = torch.nn.Parameter(init.clone())
    opt = ProdigyScheduleFree([p], d0=1e-3, **kwargs)
    for t in range(steps):
        if t == checkpoint_at:
            opt.eval()
            torch.save({"p": p.detach(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
            ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
            p = torch.nn.Parameter(ckpt["p"].clone())
            opt = ProdigyScheduleFree([p], d0=1e-3, **kwargs)
            opt.load_state_dict(ckpt["opt"])
        elif t in eval_at:
            opt.eval()
        opt.train()
        p.grad = (p.detach() - target) * 2 + noise[t]
        opt.step()
    return p, opt


def test_resume_from_an_eval_mode_checkpoint_is_bit_identical(tmp_path):
    """Saving in eval mode (x in the model, z in the state, the mode in the param groups) and
    resuming repeats exactly the uninterrupted run that evaluated at the same step."""
    pa, oa = _quadratic_run(20, eval_at=(8,), weight_decay=0.01)
    pb, ob = _quadratic_run(20, checkpoint_at=8, tmp_path=tmp_path, weight_decay=0.01)
    assert torch.equal(pa.detach(), pb.detach())
    assert oa.stats() == ob.stats()
    assert torch.equal(oa.state[pa]["z"], ob.state[pb]["z"])


def test_train_and_eval_switch_between_y_and_x():
    p, opt = _quadratic_run(15)
    z = opt.state[p]["z"].clone()
    y = p.detach().clone()
    beta1 = opt.param_groups[0]["betas"][0]
    opt.eval()
    assert not opt.training and opt.param_groups[0]["train_mode"] is False
    x = p.detach().clone()
    # fp32: measured 1.2e-7
    torch.testing.assert_close(x, (y - (1 - beta1) * z) / beta1, rtol=0, atol=1e-6)
    opt.eval()  # a no-op in eval mode
    assert torch.equal(p.detach(), x)
    opt.train()
    assert opt.training
    torch.testing.assert_close(p.detach(), y, rtol=0, atol=1e-6)  # fp32: measured 0
    assert opt.state_dict()["param_groups"][0]["train_mode"] is True


def test_step_in_eval_mode_raises_and_changes_nothing():
    p, opt = _quadratic_run(5)
    opt.eval()
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_skipped_step_leaves_parameters_and_state_bit_identical():
    p, opt = _quadratic_run(6)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    weights = p.detach().clone()
    stats = opt.stats()
    p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        opt.step()
    assert torch.equal(p.detach(), weights)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())
    after = opt.stats()
    assert after.pop("skipped_steps") == 1.0
    stats.pop("skipped_steps")
    assert after == stats


def test_first_steps_weigh_almost_nothing_in_the_average():
    """The averaging weight is the squared step: while d grows from d0, c stays small and x
    moves little; with a constant step and r = 0 it is 1/(k+1) (the uniform average)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50))
    opt = ProdigyScheduleFree(
        [p], d0=1e-6, d0_rel=0.0, growth_rate=1.0, use_bias_correction=False, r=0.0
    )
    cs = []
    for _ in range(8):
        p.grad = p.detach().clone()
        opt.step()
        cs.append(opt.stats()["sf_average_weight"])
    assert cs == pytest.approx([1 / (k + 1) for k in range(8)], rel=1e-6)  # fp32: 4.5e-8


def test_registry_builds_it_and_rejects_beta1_zero():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = create_optimizer("prodigy_sf", [p])
    assert isinstance(opt, ProdigyScheduleFree)
    # the suite's defaults (README): d_coef 0.5 and r 2, where Prodigy keeps the authors' d_coef 1
    assert (opt.param_groups[0]["d_coef"], opt.param_groups[0]["r"]) == (0.5, 2.0)
    assert create_optimizer("prodigy", [p]).param_groups[0]["d_coef"] == 1.0
    with pytest.raises(ValueError, match=r"betas\[0\].*0 < beta1 < 1"):
        ProdigyScheduleFree([p], betas=(0.0, 0.999))


def test_shapes_are_the_dadapt_problem():
    assert len(SHAPES) == 2  # the reference above iterates over test_dadapt's two groups
