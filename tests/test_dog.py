"""DoG, L-DoG and T-DoG against per-element statements of the paper's algorithm, and their
documented behaviour (Ivgi, Hinder & Carmon, ICML 2023)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from hf_tuningfree.optim import DoG, LDoG, PolynomialDecayAverager, TDoG, _native, create_optimizer
from hf_tuningfree.optim.dog import dog_tensor_update as dog_module_update
from hf_tuningfree.optim.reference import dog as dog_reference

SHAPES = [[(3, 4), (5,), (2, 2, 2), (70, 100)], [(4,), (1,)], [(6,), (2, 3)]]
STEPS = 30


def _make_problem(seed=0, steps=STEPS):
    gen = torch.Generator().manual_seed(seed)
    init = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in grp] for grp in SHAPES]
    grads = []
    for t in range(steps):
        step = []
        for gi, grp in enumerate(init):
            gs = []
            for pi, p in enumerate(grp):
                # no gradient on every third step; one tensor's first gradient at step 2
                if (pi == 1 and t % 3 == 1) or (gi == 2 and pi == 0 and t < 2):
                    gs.append(None)
                else:
                    scale = 5.0 if t % 7 == 0 else 1.0
                    gs.append(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
            step.append(gs)
        grads.append(step)
    return init, grads


def _groups_hp(mode):
    layerwise = mode == "ldog"
    return [
        dict(lr=1.0, reps_rel=1e-2, weight_decay=0.1, eps=1e-8),
        dict(lr=0.5, reps_rel=1e-3 if layerwise else 1e-2, weight_decay=0.0, eps=1e-8),
        dict(lr=2.0, reps_rel=1e-1 if layerwise else 1e-2, weight_decay=0.01,
             eps=1e-6 if layerwise else 1e-8),
    ]  # fmt: skip


CLASSES = {"dog": DoG, "ldog": LDoG, "tdog": TDoG}
REFERENCES = {"dog": dog_reference.dog, "ldog": dog_reference.ldog, "tdog": dog_reference.tdog}


def _run_ours(init, grads, groups_hp, mode, impl, dtype=torch.float64, record=None):
    params = [[torch.nn.Parameter(p.clone().to(dtype)) for p in grp] for grp in init]
    opt = CLASSES[mode](
        [{"params": ps, **hp} for ps, hp in zip(params, groups_hp, strict=True)],
        implementation=impl,
    )
    for step_grads in grads:
        for ps, gs in zip(params, step_grads, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = None if g is None else g.to(dtype)
        opt.step()
        if record is not None:
            record.append(_current_etas(opt, params, mode))
    return params, opt


def _current_etas(opt, params, mode):
    if mode != "ldog":
        return float(opt.global_state["eta"])
    out = {}
    for gi, ps in enumerate(params):
        for pi, p in enumerate(ps):
            st = opt.state.get(p)
            if st and "rbar" in st and p.grad is not None:
                eps = opt.param_groups[gi]["eps"]
                out[(gi, pi)] = float(st["rbar"] / torch.sqrt(st["G"] + eps))
    return out


def _as_lists(init, grads):
    """``(init, gradient, steps)`` in the calling convention of hf_tuningfree.optim.reference."""
    grad_lists = [
        [[None if g is None else g.flatten().tolist() for g in gs] for gs in st] for st in grads
    ]
    return (
        [[p.flatten().tolist() for p in grp] for grp in init],
        lambda t, x: grad_lists[t],
        len(grad_lists),
    )


@pytest.mark.parametrize("impl", ["loop", "foreach", "native"])
@pytest.mark.parametrize("mode", ["dog", "ldog", "tdog"])
def test_matches_per_element_reference(mode, impl):
    """fp64, three groups (different lr and weight decay), gradients missing on some steps and a
    tensor whose first gradient comes at step 2: parameters within 1e-12 of the reference after
    30 steps, and the step size of every step (every tensor's, for L-DoG) within 1e-12 relative."""
    init, grads = _make_problem()
    hp = _groups_hp(mode)
    expected, expected_etas = REFERENCES[mode](*_as_lists(init, grads), hp)
    record: list = []
    params, _ = _run_ours(init, grads, hp, mode, impl, record=record)
    worst = max(
        (p.detach().flatten() - torch.tensor(e, dtype=torch.float64)).abs().max().item()
        for ps, es in zip(params, expected, strict=True)
        for p, e in zip(ps, es, strict=True)
    )
    assert worst <= 1e-12, f"max abs difference {worst:.2e} > 1e-12"
    for t, (ours, ref) in enumerate(zip(record, expected_etas, strict=True)):
        if mode == "ldog":
            assert ours.keys() == ref.keys(), f"step {t}: tensors {ours.keys()} vs {ref.keys()}"
            for key, value in ref.items():
                assert ours[key] == pytest.approx(value, rel=1e-12), f"step {t}, tensor {key}"
        else:
            assert ours == pytest.approx(ref, rel=1e-12), f"step {t}"
    moved = (params[0][0].detach() - init[0][0]).abs().max().item()
    assert moved > (1e-9 if mode == "tdog" else 1e-2)


def test_ldog_etas_differ_per_tensor_and_match_one_tensor_dog():
    """L-DoG on one tensor is DoG on that tensor; with several tensors the etas differ."""
    init, grads = _make_problem(seed=3)
    hp = [dict(lr=1.0, reps_rel=1e-3, weight_decay=0.0, eps=1e-8)]
    single_init = [[init[0][0]]]
    single_grads = [[[st[0][0]]] for st in grads]
    p_l, _ = _run_ours(single_init, single_grads, hp, "ldog", "loop")
    p_d, _ = _run_ours(single_init, single_grads, hp, "dog", "loop")
    assert torch.allclose(p_l[0][0], p_d[0][0], rtol=0, atol=1e-12)
    _, opt = _run_ours([init[0]], [[st[0]] for st in grads], hp, "ldog", "loop")
    etas = [eta for _, eta in opt.etas()]
    assert len(etas) == len(SHAPES[0]) and len({round(e, 12) for e in etas}) == len(etas)


@pytest.mark.parametrize("mode", ["dog", "ldog"])
def test_paths_agree_in_fp32(mode):
    init, grads = _make_problem(seed=5)
    hp = _groups_hp(mode)
    finals = {}
    for impl in ("loop", "foreach", "native"):
        params, _ = _run_ours(init, grads, hp, mode, impl, dtype=torch.float32)
        finals[impl] = [p.detach().clone() for ps in params for p in ps]
    for impl in ("foreach", "native"):
        diff = max(
            (a - b).abs().max().item() for a, b in zip(finals["loop"], finals[impl], strict=True)
        )
        # fp32: measured 2.9e-6 (L-DoG), 2.4e-7 (DoG)
        assert diff <= 1e-5, f"{impl} differs from loop by {diff:.2e}"


@pytest.mark.parametrize("impl", ["loop", "foreach", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_parameters_are_updated_in_full(impl, dtype):
    """Every element of a 16-bit tensor moves (torch 2.13's CPU fused SGD skips the vectorised
    part of 16-bit tensors, so those take the per-tensor path)."""
    p = torch.nn.Parameter(torch.ones(64, dtype=dtype))
    opt = DoG([p], reps_rel=0.5, implementation=impl)
    p.grad = torch.full((64,), 0.5, dtype=dtype)
    opt.step()
    expected = 1.0 - 4.5 * 0.5 / 4.0  # x - r_eps g/||g||: r_eps = 0.5 (1 + 8), ||g|| = 4
    assert torch.allclose(p.detach().float(), torch.full((64,), expected), atol=1e-2)


@pytest.mark.parametrize("cls", [DoG, LDoG, TDoG])
def test_zero_gradients_with_eps_zero_do_not_produce_nan(cls):
    p = torch.nn.Parameter(torch.ones(3))
    opt = cls([p], eps=0.0, reps_rel=0.5)
    for _ in range(2):
        p.grad = torch.zeros(3)
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    p.grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(p.detach()).all() and not torch.equal(p.detach(), torch.ones(3))


def test_first_step_size_is_r_eps_over_gradient_norm():
    """x_1 = x_0 - r_eps * g_0 / ||g_0||: the first move has length r_eps (eps aside)."""
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ||x_0|| = 5
    opt = DoG([p], reps_rel=1e-2, eps=0.0)
    p.grad = torch.tensor([0.0, -2.0], dtype=torch.float64)
    opt.step()
    r_eps = 1e-2 * (1 + 5.0)
    assert torch.allclose(p.detach(), torch.tensor([3.0, 4.0 + r_eps], dtype=torch.float64))
    assert opt.stats()["rbar"] == pytest.approx(r_eps)
    assert opt.stats()["eta"] == pytest.approx(r_eps / 2.0)


def test_global_step_size_is_shared_by_all_groups():
    """The Trainer's decay/no-decay split must not change DoG: two groups behave as one."""
    init, grads = _make_problem(seed=7)
    flat_init = [[p for grp in init for p in grp]]
    flat_grads = [[[g for gs in st for g in gs]] for st in grads]
    hp1 = [dict(lr=1.0, reps_rel=1e-3, weight_decay=0.0, eps=1e-8)]
    one, _ = _run_ours(flat_init, flat_grads, hp1, "dog", "loop")
    several, _ = _run_ours(init, grads, hp1 * 3, "dog", "loop")
    for a, b in zip(one[0], [p for ps in several for p in ps], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_weight_decay_does_not_touch_grad():
    p = torch.nn.Parameter(torch.randn(4))
    for cls in (DoG, LDoG, TDoG):
        for impl in ("loop", "foreach", "native"):
            opt = cls([p], weight_decay=0.1, implementation=impl)
            for _ in range(3):
                g = torch.randn(4)
                p.grad = g.clone()
                opt.step()
                assert torch.equal(p.grad, g)


@pytest.mark.parametrize("impl", ["loop", "foreach", "native"])
@pytest.mark.parametrize("cls", [DoG, LDoG, TDoG])
def test_maximize_is_minimizing_the_negated_gradient_bit_for_bit(cls, impl):
    """Two groups, weight decay, the second maximizing: 6 steps equal, bit for bit, those of an
    optimizer that minimizes with that group's gradients negated (parameters and the step-size
    statistics), and after each step the caller's gradients are exactly what they were."""
    torch.manual_seed(0)
    init = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    hp = [{"weight_decay": 0.1}, {"weight_decay": 0.05, "maximize": True}]
    opt_a = cls([{"params": [a[0]], **hp[0]}, {"params": [a[1]], **hp[1]}], implementation=impl)
    opt_b = cls(
        [{"params": [b[0]], **hp[0]}, {"params": [b[1]], "weight_decay": 0.05}],
        implementation=impl,
    )
    assert opt_a.param_groups[1]["maximize"] is True and opt_b.defaults["maximize"] is False
    for _ in range(6):
        g = [torch.randn_like(t) for t in init]
        a[0].grad, a[1].grad = g[0].clone(), g[1].clone()
        b[0].grad, b[1].grad = g[0].clone(), -g[1]
        opt_a.step()
        opt_b.step()
        assert torch.equal(a[0].grad, g[0]) and torch.equal(a[1].grad, g[1])
        for pa, pb in zip(a, b, strict=True):
            assert torch.equal(pa, pb)
        assert opt_a.stats() == opt_b.stats()
    moved = (a[1] - init[1]).abs().max().item()
    assert moved > (1e-9 if cls is TDoG else 1e-3)  # it moved (T-DoG's steps are tiny)


@pytest.mark.parametrize("impl", ["loop", "foreach", "native"])
def test_maximize_with_one_gradient_shared_by_two_parameters(impl):
    """Two parameters holding the same gradient tensor (one object, and two views of one
    buffer): the step is the one on -grad for both, as with two separate negated copies; a
    double negation would hand the passes +grad. The shared gradients are unchanged after."""
    torch.manual_seed(3)
    init = [torch.randn(6, dtype=torch.float64) for _ in range(4)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a = LDoG(a, maximize=True, implementation=impl)
    opt_b = LDoG(b, implementation=impl)
    for _ in range(4):
        g = torch.randn(6, dtype=torch.float64)
        buf = torch.randn(6, dtype=torch.float64)
        a[0].grad = a[1].grad = g.clone()  # one tensor object for both
        a[2].grad, a[3].grad = buf.view(6), buf.view(2, 3).view(6)  # two views, one memory
        shared, buffer = a[0].grad, buf.clone()
        b[0].grad, b[1].grad, b[2].grad, b[3].grad = -g, -g, -buffer, -buffer
        opt_a.step()
        opt_b.step()
        assert torch.equal(shared, g) and torch.equal(buf, buffer)
        for pa, pb in zip(a, b, strict=True):
            assert torch.equal(pa, pb)
    assert (a[0] - init[0]).abs().max().item() > 1e-3


def test_maximize_gradients_are_restored_when_a_step_raises():
    """A step that fails inside its passes (after the gradients were negated for them) leaves
    the maximizing group's gradient as the caller set it, and the weights untouched."""
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = DoG([p], maximize=True)
    p.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    seen = []

    def failing_pass(batch):
        seen.append(batch.groups[0].grads[0].clone())
        raise RuntimeError("a pass failed")

    opt._local_statistics = failing_pass  # the first pass of the step
    g = torch.randn(4, dtype=torch.float64)
    p.grad = g.clone()
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="a pass failed"):
        opt.step()
    assert torch.equal(seen[0], -g)  # the pass saw the negated gradient
    assert torch.equal(p.grad, g)
    assert torch.equal(p.detach(), before)


def test_maximize_must_be_a_bool():
    with pytest.raises(TypeError, match="maximize must be True or False, got int 1"):
        LDoG([torch.nn.Parameter(torch.zeros(2))], maximize=1)


def test_refresh_distances_after_editing_parameters():
    """Distances are measured by the pass that writes the parameters; after an edit outside
    step(), refresh_distances() measures them anew and the next step sees the edit."""
    init, grads = _make_problem(seed=2)
    hp = _groups_hp("dog")
    params, opt = _run_ours(init, grads[:5], hp, "dog", "loop")
    with torch.no_grad():
        params[0][0].add_(3.0)  # an edit outside step(): far from x0
    opt.refresh_distances()
    st = opt.state[params[0][0]]
    assert torch.allclose(st["dist_sq"], ((params[0][0] - st["x0"]) ** 2).sum(), rtol=1e-12)
    expected = math.sqrt(
        sum(
            ((p.detach() - opt.state[p]["x0"]) ** 2).sum().item()
            for ps in params
            for p in ps
            if "x0" in opt.state[p]
        )
    )
    for ps, gs in zip(params, grads[5], strict=True):
        for p, g in zip(ps, gs, strict=True):
            p.grad = g
    opt.step()
    assert opt.stats()["rbar"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_cpu_kernel_matches_the_per_tensor_path(dtype):
    """The C loop (one call per bucket) against dog_tensor_update, with a skipped call."""
    if _native.load() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    shapes = [(70, 100), (3,), (40000,)]
    xs = [torch.randn(s, dtype=dtype) for s in shapes]
    gs = [torch.randn(s, dtype=dtype) for s in shapes]
    x0s = [x + 0.1 * torch.randn_like(x) for x in xs]
    steps = torch.tensor([0.3, 0.02, 1e-3], dtype=dtype)
    ok = torch.tensor(True)
    ref_x = [x.clone() for x in xs]
    ref_d = [torch.zeros((), dtype=torch.float64) for _ in xs]
    for k in range(3):
        dog_module_update(ref_x[k], gs[k], x0s[k], ref_d[k], ok, steps[k], weight_decay=0.05)
    out = torch.zeros(3, dtype=torch.float64)
    _native.dog_update(xs, gs, x0s, steps, 0.05, ok, out)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # fp32: measured 2.4e-7 (x), 4.2e-8 (d)
    for a, b in zip(xs, ref_x, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=tol)
    assert torch.allclose(out, torch.stack(ref_d), rtol=tol)
    before = [x.clone() for x in xs]
    _native.dog_update(xs, gs, x0s, steps, 0.05, torch.tensor(False), out.fill_(-1.0))
    assert all(torch.equal(a, b) for a, b in zip(xs, before, strict=True))
    assert torch.equal(out, torch.full((3,), -1.0, dtype=torch.float64))


# --------------------------------------------------------------------------- skipped steps
@pytest.mark.parametrize("name", ["dog", "ldog", "tdog"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_leaves_rbar_and_G_unchanged(name, bad):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
    opt = create_optimizer(name, params, weight_decay=0.01)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    before_global = {k: v.clone() for k, v in opt.global_state.items()}
    before_state = {
        (i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items()
    }
    before_params = [p.detach().clone() for p in params]
    params[1].grad[0, 1] = bad
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    for k, v in before_global.items():
        if k != "skipped_steps":
            assert torch.equal(opt.global_state[k], v), k
    for (i, k), v in before_state.items():
        assert torch.equal(opt.state[params[i]][k], v), (i, k)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before_params, params, strict=True))
    assert bool(opt.last_step_skipped)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert not bool(opt.last_step_skipped)
    assert opt.stats()["skipped_steps"] == 1.0


def test_skipped_first_step_then_training_goes_on():
    p = torch.nn.Parameter(torch.ones(3))
    opt = DoG([p])
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    assert float(opt.global_state["G"]) == 0.0
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))
    assert opt.stats()["step"] == 1.0


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reps_rel": 0.0}, "reps_rel"),
        ({"reps_rel": -1e-6}, "reps_rel"),
        ({"reps_rel": float("nan")}, "reps_rel"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"eps": -1e-8}, "eps"),
        ({"implementation": "fast"}, "implementation"),
        ({"global_reduce": "everywhere"}, "global_reduce"),
    ],
)
@pytest.mark.parametrize("cls", [DoG, LDoG, TDoG])
def test_bad_hyperparameters_name_the_problem(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.5])
def test_tdog_delta_must_be_a_probability(delta):
    with pytest.raises(ValueError, match="delta"):
        TDoG([torch.nn.Parameter(torch.zeros(2))], delta=delta)


def test_model_wide_settings_must_agree_across_groups():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="reps_rel"):
        DoG([{"params": [a]}, {"params": [b], "reps_rel": 1e-4}])
    opt = DoG([{"params": [a]}])
    with pytest.raises(ValueError, match="eps"):
        opt.add_param_group({"params": [b], "eps": 1e-3})
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [b], "weight_decay": -1.0})
    LDoG([{"params": [a]}, {"params": [b], "reps_rel": 1e-4}])  # per tensor: fine


def test_sparse_gradient_is_a_clear_error():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = DoG(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


# --------------------------------------------------------------------------- checkpoints
def test_first_step_flag_survives_state_dict():
    """Before the first step the state is empty (nothing to mark); after it, x0 and the global
    scalars carry the "already started" information through a weights_only round trip."""
    p = torch.nn.Parameter(torch.randn(4))
    opt = DoG([p])
    sd = opt.state_dict()
    assert sd["state"] == {}
    opt.load_state_dict(sd)  # Accelerate round-trips once before any step
    p.grad = torch.randn(4)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert set(loaded["param_groups"][0]["global_state"]) >= {"rbar", "G", "eta", "step"}
    opt2 = DoG([p])
    opt2.load_state_dict(loaded)
    x0_before = opt2.state[p]["x0"].clone()
    p.grad = torch.randn(4)
    opt2.step()  # not a first step: x0 and r_eps are kept
    assert torch.equal(opt2.state[p]["x0"], x0_before)
    assert opt2.stats()["step"] == 2.0


@pytest.mark.parametrize("name", ["dog", "ldog"])
def test_bf16_resume_keeps_fp32_statistics_exact(name):
    torch.manual_seed(0)
    shapes = [(8, 4), (4,)]
    model_a = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in shapes]
    grads = [[torch.randn(s).bfloat16() for s in shapes] for _ in range(8)]
    opt_a = create_optimizer(name, model_a, reps_rel=1e-2)

    def run(params, opt, gs):
        for step in gs:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()

    run(model_a, opt_a, grads[:4])
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    model_b = [torch.nn.Parameter(p.detach().clone()) for p in model_a]
    opt_b = create_optimizer(name, model_b, reps_rel=1e-2)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    assert opt_b.state[model_b[0]]["dist_sq"].dtype == torch.float32
    run(model_a, opt_a, grads[4:])
    run(model_b, opt_b, grads[4:])
    for a, b in zip(model_a, model_b, strict=True):
        assert torch.equal(a, b)
    for pa, pb in zip(model_a, model_b, strict=True):
        for key, value in opt_a.state[pa].items():
            assert torch.equal(value, opt_b.state[pb][key]), key


# --------------------------------------------------------------------------- behaviour
def _logistic_problem(n=512, d=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(X @ w_true)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < p).to(torch.float64)
    return X, y


def _loss(w, b, X, y, l2=1e-3):
    z = X @ w + b
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.5 * l2 * (w @ w)


def _run_convex(make_opt, X, y, steps, batch=32, seed=1, average=True):
    w = torch.nn.Parameter(torch.zeros(X.shape[1], dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = make_opt([w, b])
    averager = PolynomialDecayAverager([w, b])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        _loss(w, b, X[idx], y[idx]).backward()
        opt.step()
        averager.update()
    with torch.no_grad():
        last = _loss(w, b, X, y).item()
        with averager.swapped():
            avg = _loss(w, b, X, y).item()
    return last, avg


@pytest.mark.slow
def test_convex_dog_with_averaging_matches_the_best_sgd_over_four_orders_of_reps_rel():
    """Regularised logistic regression, minibatch 32, 1500 steps. SGD runs a grid of 7 step sizes
    (each judged by the better of its last and its averaged iterate); DoG runs untuned, with
    averaging, for reps_rel from 1e-8 to 1e-4, and must reach within 2% of the best SGD loss."""
    X, y = _logistic_problem()
    steps = 1500
    grid = [10.0**k for k in (-3, -2.5, -2, -1.5, -1, -0.5, 0)]
    sgd = {
        lr: min(_run_convex(lambda p, lr=lr: torch.optim.SGD(p, lr=lr), X, y, steps)) for lr in grid
    }
    best_lr = min(sgd, key=sgd.get)
    best = sgd[best_lr]
    print("\nSGD grid (final full-data loss, best of last/averaged iterate):")
    for lr, value in sgd.items():
        print(f"  lr={lr:<8.4g} {value:.5f}")
    print(f"best SGD: lr={best_lr:g} loss {best:.5f}")
    results = {}
    for reps_rel in (1e-8, 1e-7, 1e-6, 1e-5, 1e-4):
        for name in ("dog", "ldog"):
            _, avg = _run_convex(
                lambda p, r=reps_rel, n=name: create_optimizer(n, p, reps_rel=r), X, y, steps
            )
            results[(name, reps_rel)] = avg
            print(f"{name:5s} reps_rel={reps_rel:g}: averaged loss {avg:.5f} "
                  f"({100 * (avg / best - 1):+.2f}% vs best SGD)")  # fmt: skip
    assert best_lr not in (grid[0], grid[-1]), "the SGD grid should bracket the best step size"
    for (name, reps_rel), value in results.items():
        if name == "dog":
            assert value <= 1.02 * best, f"DoG reps_rel={reps_rel}: {value:.5f} vs {best:.5f}"


@pytest.mark.parametrize("impl", ["loop", "foreach", "native"])
@pytest.mark.parametrize("zero_init_scale", [True, False], ids=["scaled", "paper"])
def test_ldog_zero_initialised_tensors_take_the_models_scale(zero_init_scale, impl):
    """Two tensors start at 0 (LoRA's B), one of them with its first gradient at step 2: with
    zero_init_scale their r_eps is reps_rel (1 + sqrt(n_k) RMS(x_0)), the RMS over the step's
    tensors; without, the paper's reps_rel (1 + 0). Per element against the reference, fp64."""
    init, grads = _make_problem()
    init[0][1] = torch.zeros_like(init[0][1])
    init[2][0] = torch.zeros_like(init[2][0])  # first gradient at step 2
    hp = _groups_hp("ldog")
    expected, expected_etas = dog_reference.ldog(
        *_as_lists(init, grads), hp, zero_init_scale=zero_init_scale
    )
    params = [[torch.nn.Parameter(p.clone()) for p in grp] for grp in init]
    opt = LDoG(
        [{"params": ps, **h} for ps, h in zip(params, hp, strict=True)],
        implementation=impl,
        zero_init_scale=zero_init_scale,
    )
    record = []
    for step_grads in grads:
        for ps, gs in zip(params, step_grads, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = g
        opt.step()
        record.append(_current_etas(opt, params, "ldog"))
    for t, (ours, ref) in enumerate(zip(record, expected_etas, strict=True)):
        assert ours.keys() == ref.keys()
        for key, value in ref.items():
            assert ours[key] == pytest.approx(value, rel=1e-12), f"step {t}, tensor {key}"
    worst = max(
        (p.detach().flatten() - torch.tensor(e, dtype=torch.float64)).abs().max().item()
        for ps, es in zip(params, expected, strict=True)
        for p, e in zip(ps, es, strict=True)
    )
    assert worst <= 1e-13  # measured 1.8e-15
    first_b = expected_etas[0][(0, 1)] * math.sqrt(grads[0][0][1].square().sum().item() + 1e-8)
    if zero_init_scale:  # rbar_0 of the zero tensor: reps_rel (1 + 2.2) here
        assert first_b > 3 * hp[0]["reps_rel"]
    else:
        assert first_b == pytest.approx(hp[0]["reps_rel"], rel=1e-14)  # measured 0


def test_dog_family_defaults_start_at_a_thousandth_of_the_weights():
    """The fast start: reps_rel = 1e-3 by default (the paper's 1e-6 is an argument away)."""
    for cls in (DoG, LDoG, TDoG):
        p = torch.nn.Parameter(torch.ones(100))
        opt = cls([p])
        assert opt.param_groups[0]["reps_rel"] == 1e-3
        p.grad = torch.ones(100)
        opt.step()
        rbar = opt.global_state["rbar"] if cls is not LDoG else opt.state[p]["rbar"]
        # fp32 weights: measured 7.9e-8
        assert float(rbar) == pytest.approx(1e-3 * (1 + 10.0), rel=1e-6)
