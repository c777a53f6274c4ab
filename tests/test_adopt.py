"""ADOPT against a per-element statement of the authors' algorithm, and its documented behaviour."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from native_scenarios import feed, initial_weights, scaled_gradients

from hf_tuningfree.optim import ADOPT, _native
from hf_tuningfree.optim.reference.adopt import adopt as reference_adopt
from hf_tuningfree.toy import run_counterexample, toy_optimizers

SHAPES_A = [(3, 4), (5,), (2, 2, 2)]
SHAPES_B = [(4,), (1,)]
STEPS = 50


def _make_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(shape, scale=1.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale

    init = [[randn(s) for s in SHAPES_A], [randn(s) for s in SHAPES_B]]
    grads = []
    for t in range(STEPS):
        step = []
        for grp in init:
            gs = []
            for pi, p in enumerate(grp):
                # parameter 1 of each group gets no gradient on every third step
                if pi == 1 and t % 3 == 1:
                    gs.append(None)
                else:
                    scale = 10.0 if t % 7 == 0 else 1.0  # occasional large gradients hit the clip
                    gs.append(randn(p.shape, scale))
            step.append(gs)
        grads.append(step)
    return init, grads


def _use_impl(impl: str, monkeypatch) -> str:
    """``impl`` as a test id -> the ``implementation`` argument. ``"native"``: the fused C loop
    (skipped without a C compiler); ``"compiled_torch"``: the ``torch.compile`` kernel."""
    if impl == "native":
        if _native.load() is None:
            pytest.skip("no C compiler")
        return "native"
    if impl == "compiled_torch":
        return "compiled"
    return impl


def _run_ours(init, grads, groups_hp, impl, dtype):
    params = [[torch.nn.Parameter(p.clone().to(dtype)) for p in grp] for grp in init]
    opt = ADOPT(
        [{"params": ps, **hp} for ps, hp in zip(params, groups_hp, strict=True)],
        implementation=impl,
    )
    for step_grads in grads:
        for ps, gs in zip(params, step_grads, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = None if g is None else g.to(dtype)
        opt.step()
    return params, opt


def _groups_hp(clipped: bool, decoupled: bool):
    exp = 0.25 if clipped else None
    return [
        dict(lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1,
             decoupled_weight_decay=decoupled, clip_exponent=exp, maximize=False),
        dict(lr=0.02, betas=(0.5, 0.99), eps=1e-3, weight_decay=0.0,
             decoupled_weight_decay=decoupled, clip_exponent=exp, maximize=True),
    ]  # fmt: skip


@pytest.mark.parametrize("impl", ["loop", "foreach", "native", "compiled_torch"])
@pytest.mark.parametrize("clipped", [True, False], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled_wd", "coupled_wd"])
def test_matches_per_element_reference(impl, clipped, decoupled, monkeypatch):
    """fp64, so the comparison measures the algorithm, not fp32 rounding (which alone moves an
    fp32 run ~1e-6 away from exact arithmetic over 50 steps; fp32 paths are compared with each
    other in test_compiled_and_foreach_match_loop_fp32)."""
    dtype = torch.float64
    init, grads = _make_problem()
    hp = _groups_hp(clipped, decoupled)
    grad_lists = [
        [[None if g is None else g.flatten().tolist() for g in gs] for gs in st] for st in grads
    ]
    expected, _ = reference_adopt(
        [[p.flatten().tolist() for p in grp] for grp in init],
        lambda t, x: grad_lists[t],
        len(grad_lists),
        hp,
    )
    params, _ = _run_ours(init, grads, hp, _use_impl(impl, monkeypatch), dtype)
    worst = max(
        (p.detach().double().flatten() - torch.tensor(e, dtype=torch.float64)).abs().max().item()
        for ps, es in zip(params, expected, strict=True)
        for p, e in zip(ps, es, strict=True)
    )
    assert worst <= 1e-12, f"max abs difference {worst:.2e} > 1e-12"
    # the parameters did move (a no-op optimizer would fail the reference anyway, but say it)
    assert (params[0][0].detach().double() - init[0][0]).abs().max().item() > 1e-2


def test_first_step_only_sets_second_moment():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = ADOPT([p], weight_decay=0.1)
    p.grad = torch.tensor([0.5, -4.0, 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0, 3.0]))
    assert torch.equal(opt.state[p]["exp_avg_sq"], torch.tensor([0.25, 16.0, 0.0]))
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(3))
    assert opt.state[p]["step"].item() == 1.0


def test_clip_bounds_the_first_update():
    """At t=1 the clip value is 1**0.25 = 1, so |m_1| <= (1 - beta1) whatever the gradient."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ADOPT([p], lr=1.0, betas=(0.9, 0.9999))
    p.grad = torch.tensor([1e-3, 1e-3, 1e-3])
    opt.step()  # v = 1e-6
    p.grad = torch.tensor([10.0, -10.0, 1e-4])  # normalised: 1e4, -1e4, 0.1
    opt.step()
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor([0.1, -0.1, 0.01]))
    assert torch.allclose(p.detach(), torch.tensor([-0.1, 0.1, -0.01]))


def test_bf16_parameters_keep_their_dtype_and_paths_agree():
    """bf16 parameters: state stays bf16 (step fp32). The eager paths compute in bf16 (like
    torch's foreach Adam), the compiled kernel in fp32 registers; all three track an fp32 run to
    within bf16 rounding on average."""
    torch.manual_seed(1)
    shapes = [(64, 32), (32,), (7, 3)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(20)]

    def run(dtype, impl):
        ps = [torch.nn.Parameter(x.clone().to(dtype)) for x in init]
        opt = ADOPT(ps, lr=1e-2, weight_decay=0.01, implementation=impl)
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.to(dtype)
            opt.step()
        return ps, opt

    ref, _ = run(torch.float32, "loop")
    runs = {impl: run(torch.bfloat16, impl) for impl in ("loop", "compiled", "foreach")}
    ps, opt = runs["loop"]
    assert all(p.dtype == torch.bfloat16 for p in ps)
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[ps[0]]["step"].dtype == torch.float32
    for impl, (ps, _) in runs.items():
        for r, o in zip(ref, ps, strict=True):
            mean_diff = (r.detach() - o.detach().float()).abs().mean().item()
            assert mean_diff < 1e-2, f"{impl}: mean |bf16 - fp32| = {mean_diff:.2e}"


@pytest.mark.parametrize("compiled", ["native", "compiled_torch"])
def test_compiled_and_foreach_match_loop_fp32(compiled, monkeypatch):
    torch.manual_seed(2)
    shapes = [(128, 64), (64,), (3, 5, 7), ()]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(15)]
    finals = {}
    for impl in ("loop", "foreach", "compiled"):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        chosen = _use_impl(compiled, monkeypatch) if impl == "compiled" else impl
        opt = ADOPT(ps, lr=1e-2, weight_decay=0.05, implementation=chosen)
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        finals[impl] = [p.detach().clone() for p in ps] + [
            opt.state[p]["exp_avg_sq"].clone() for p in ps
        ]
    for impl in ("foreach", "compiled"):
        diff = max(
            (a - b).abs().max().item() for a, b in zip(finals["loop"], finals[impl], strict=True)
        )
        assert diff <= 1e-6, f"{impl} differs from loop by {diff:.2e}"  # fp32: measured 2.4e-7


def test_does_not_mutate_grad():
    p = torch.nn.Parameter(torch.randn(4))
    opt = ADOPT([p], weight_decay=0.1, decoupled_weight_decay=False, maximize=True)
    for _ in range(3):
        g = torch.randn(4)
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1e-3}, "lr"),
        ({"eps": -1e-6}, "eps"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "betas"),
        ({"clip_exponent": -0.5}, "clip_exponent"),
        ({"implementation": "fast"}, "implementation"),
        ({"global_reduce": "everywhere"}, "global_reduce"),
    ],
)
def test_bad_hyperparameters_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ADOPT([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bool_flags_reject_non_bool():
    with pytest.raises(TypeError, match="maximize"):
        ADOPT([torch.nn.Parameter(torch.zeros(2))], maximize=1)


def test_sparse_gradient_is_a_clear_error():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ADOPT(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_toy_counterexample_adam_fails_adopt_moves_to_optimum():
    """The paper's counterexample (k=50, beta2=0.999): the optimum is x=-1.

    Measured with 128 seeds and 6000 steps: Adam sits at a wrong point (mean x ~ +0.37) while
    unclipped ADOPT moves below 0 toward -1; clipped ADOPT is slower on this problem (mean x
    ~ +0.85) because the rare large gradient is clipped while t**0.25 is small.
    """
    opts = toy_optimizers()
    finals = {
        name: run_counterexample(make, steps=6000, seeds=128)[0] for name, make in opts.items()
    }
    adam = finals["Adam"].mean().item()
    unclipped = finals["ADOPT (unclipped)"].mean().item()
    clipped = finals["ADOPT (clipped t^0.25)"].mean().item()
    print(f"toy: Adam {adam:+.3f}, ADOPT unclipped {unclipped:+.3f}, clipped {clipped:+.3f}")
    assert adam > 0.25
    assert unclipped < -0.03
    assert (finals["ADOPT (unclipped)"] < 0).double().mean().item() > 0.5
    assert clipped > adam  # the documented trade-off of clipping on this problem


# --------------------------------------------------------------------------- the fused C path
# ``implementation="native"`` (and ``"auto"``) on CPU runs ``_native.adopt_update``: one C call
# per bucket. These tests hold it to the per-tensor loop path step by step, and check the guard,
# checkpoints, thread counts and the fallback when the C library is unavailable.

#: Two groups; a tensor above 4 blocks of 8192 elements (the threaded size), one of 1 element.
NATIVE_STEPS = 24


@pytest.fixture
def native_calls(monkeypatch):
    """Counts calls of the C kernel (and skips without a C compiler)."""
    if _native.load() is None:
        pytest.skip("no C compiler")
    calls = []
    real = _native.adopt_update

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(_native, "adopt_update", spy)
    return calls


def _native_hp(clipped: bool, decoupled: bool) -> list[dict]:
    """Group 0: clipped or not, weight decay, beta1 0.9 (lerp's small-weight branch); group 1:
    maximize with weight decay and beta1 0.5 (its other branch)."""
    exp = 0.25 if clipped else None
    return [
        dict(lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1,
             decoupled_weight_decay=decoupled, clip_exponent=exp, maximize=False),
        dict(lr=0.02, betas=(0.5, 0.99), eps=1e-3, weight_decay=0.05,
             decoupled_weight_decay=decoupled, clip_exponent=exp, maximize=True),
    ]  # fmt: skip


def _make(init, hp, impl):
    params = [[torch.nn.Parameter(p.clone()) for p in grp] for grp in init]
    groups = [{"params": ps, **h} for ps, h in zip(params, hp, strict=True)]
    return params, ADOPT(groups, implementation=impl)


def _snapshot(params, opt, skip_state_of=None):
    """Every parameter and state tensor, cloned, in a fixed order."""
    flat = [p for ps in params for p in ps]
    out = [p.detach().clone() for p in flat]
    for p in flat:
        st = opt.state[p] if p is not skip_state_of else {}
        out += [st[k].clone() for k in ("step", "exp_avg", "exp_avg_sq")] if st else []
    return out


def _by_kind(params, opt) -> dict[str, torch.Tensor]:
    """The model's parameters, ``exp_avg``, ``exp_avg_sq`` and step counters, each flattened
    into one tensor (tensors without state yet contribute their parameter only)."""
    flat = [p for ps in params for p in ps]
    out = {"param": torch.cat([p.detach().reshape(-1) for p in flat])}
    for key in ("exp_avg", "exp_avg_sq", "step"):
        out[key] = torch.cat([opt.state[p][key].reshape(-1) for p in flat if opt.state[p]])
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a| (0 when both are all zero)."""
    scale = a.abs().max().item() if a.numel() else 0.0
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff / scale if scale > 0 else diff


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("clipped", [True, False], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled_wd", "coupled_wd"])
def test_native_path_tracks_the_loop_path_step_by_step(dtype, clipped, decoupled, native_calls):
    """After every one of 24 steps, the parameters, ``exp_avg`` and ``exp_avg_sq`` of the C path
    are within rounding of the loop path: max |difference| <= 1e-6 (fp32) or 1e-13 (fp64) of the
    largest value of that quantity in the model (torch's CPU sqrt is not correctly rounded, the C
    one is: u differs by an ulp on ~20% of the fp32 elements); step counters are equal."""
    hp = _native_hp(clipped, decoupled)
    init, grads = initial_weights(dtype), scaled_gradients(dtype, steps=NATIVE_STEPS)
    ref_params, ref = _make(init, hp, "loop")
    params, opt = _make(init, hp, "native")
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    worst = dict.fromkeys(("param", "exp_avg", "exp_avg_sq"), 0.0)
    for t, step_grads in enumerate(grads):
        feed(ref_params, step_grads)
        feed(params, step_grads)
        ref.step()
        opt.step()
        expected, got = _by_kind(ref_params, ref), _by_kind(params, opt)
        assert torch.equal(got["step"], expected["step"]), t
        for kind, w in worst.items():
            assert got[kind].dtype == dtype
            rel = _rel(expected[kind], got[kind])
            assert rel <= tol, f"step {t}, {kind}: {rel:.2e} > {tol:.0e}"
            worst[kind] = max(w, rel)
    assert len(native_calls) == 2 * NATIVE_STEPS  # one call per group and step
    # the late tensor had 19 steps; the others moved
    assert opt.state[params[1][2]]["step"].item() == NATIVE_STEPS - 5
    assert (params[0][0].detach() - init[0][0]).abs().max().item() > 1e-2
    print("native vs loop, worst relative difference:", {k: f"{v:.1e}" for k, v in worst.items()})


def test_native_kernel_writes_nothing_when_not_ok():
    """The C kernel itself: with ``ok`` False nothing is written (NaN gradients included), step
    counters included; with ``ok`` True a v-only first step leaves x and m alone."""
    if _native.load() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    shapes = [(40000,), (7,)]
    xs = [torch.randn(s) for s in shapes]
    gs = [torch.full(s, float("nan")) for s in shapes]
    ms = [torch.randn(s) for s in shapes]
    vs = [torch.rand(s) for s in shapes]
    steps = [torch.tensor(3.0), torch.tensor(0.0)]
    before = [t.clone() for t in (*xs, *ms, *vs, *steps)]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled=True,
              clip_exponent=0.25, maximize=False)  # fmt: skip
    _native.adopt_update(xs, gs, ms, vs, steps, torch.tensor(False), **kw)
    after = [*xs, *ms, *vs, *steps]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    gs = [torch.randn(s) for s in shapes]
    _native.adopt_update(xs, gs, ms, vs, steps, torch.tensor(True), **kw)
    assert torch.equal(xs[1], before[1]) and torch.equal(ms[1], before[3])  # first step
    assert torch.equal(vs[1], gs[1] * gs[1])
    assert not torch.equal(xs[0], before[0])
    assert [s.item() for s in steps] == [4.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_native_sum_of_squares_for_the_guard(dtype):
    """``_native.sum_sq`` (the guard's pass on the C path): the sum of all squares to rounding,
    the same bits for 1 and 2 threads, 0 for no elements, NaN/Inf when any element is."""
    if _native.load() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    ts = [torch.randn(s, dtype=dtype) for s in [(70000,), (3,), (0,), (200, 300)]]
    out = torch.full((), -1.0, dtype=torch.float64)
    expected = sum((t.double() ** 2).sum() for t in ts)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            _native.sum_sq(ts, out)
            results.append(out.clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    assert results[0].item() == pytest.approx(
        expected.item(), rel=1e-6 if dtype == torch.float32 else 1e-13
    )
    _native.sum_sq(ts[2:3], out)
    assert out.item() == 0.0
    for bad, check in ((float("nan"), math.isnan), (float("inf"), math.isinf)):
        ts[3][17, 5] = bad
        _native.sum_sq(ts, out)
        assert check(out.item())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_native_nonfinite_gradient_leaves_params_and_state_bit_identical(bad, native_calls):
    """A NaN/Inf in one element of one gradient (of the second group) skips the step for the
    whole model on the C path: parameters and existing state bit-identical, the state of the
    tensor whose first gradient arrives in that step only created (zeros, step 0), and training
    then continues exactly as if that step never happened."""
    hp = _native_hp(True, True)
    dtype = torch.float32
    init, grads = initial_weights(dtype), scaled_gradients(dtype, steps=8)
    params, opt = _make(init, hp, "native")
    clean_params, clean = _make(init, hp, "native")
    for step_grads in grads[:5]:
        for ps, o in ((params, opt), (clean_params, clean)):
            feed(ps, step_grads)
            o.step()
    late = params[1][2]  # first gradient at step 5: the poisoned step
    assert not opt.state[late]
    before = _snapshot(params, opt)
    poisoned = [[None if g is None else g.clone() for g in gs] for gs in grads[5]]
    poisoned[1][0].view(-1)[123] = bad
    feed(params, poisoned)
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    assert bool(opt.last_step_skipped)
    fresh = opt.state[late]
    assert fresh["step"].item() == 0.0
    assert not fresh["exp_avg"].any() and not fresh["exp_avg_sq"].any()
    after = _snapshot(params, opt, skip_state_of=late)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    for step_grads in grads[5:]:
        for ps, o in ((params, opt), (clean_params, clean)):
            feed(ps, step_grads)
            o.step()
    assert not bool(opt.last_step_skipped)
    assert opt.stats()["skipped_steps"] == 1.0
    got, expected = _snapshot(params, opt), _snapshot(clean_params, clean)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len(native_calls) > 0


def test_native_state_dict_round_trip_continues_bit_exactly(tmp_path, native_calls):
    """Save mid-training (through ``torch.save`` / ``torch.load(weights_only=True)``, as the
    Trainer does), load into a fresh optimizer over copied parameters: the next steps are
    bit-identical to the uninterrupted run."""
    hp = _native_hp(True, False)
    dtype = torch.float32
    init, grads = initial_weights(dtype), scaled_gradients(dtype, steps=16)
    params, opt = _make(init, hp, "native")
    for step_grads in grads[:8]:
        feed(params, step_grads)
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    resumed_params, resumed = _make([[p.detach() for p in ps] for ps in params], hp, "native")
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(_snapshot(params, opt), _snapshot(resumed_params, resumed), strict=True)
    )
    for step_grads in grads[8:]:
        for ps, o in ((params, opt), (resumed_params, resumed)):
            feed(ps, step_grads)
            o.step()
    got, expected = _snapshot(resumed_params, resumed), _snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert opt.state[params[0][0]]["step"].item() == 16.0


def test_native_path_is_independent_of_the_thread_count(native_calls):
    """Elementwise work split into blocks: 1 and 2 threads give bit-identical results."""
    hp = _native_hp(True, True)
    init, grads = initial_weights(torch.float32), scaled_gradients(torch.float32, steps=6)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params, opt = _make(init, hp, "native")
            for step_grads in grads:
                feed(params, step_grads)
                opt.step()
            results.append(_snapshot(params, opt))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_native_reads_a_tensor_learning_rate_without_host_reads(monkeypatch, native_calls):
    """``group["lr"]`` as a 0-dim tensor that a schedule changes in place: the C code reads it
    from memory each step (no ``.item()``/``float()``/``bool()`` on any tensor in ``step()``), and
    the run equals a loop-path run with the same float learning rates (fp64)."""
    dtype = torch.float64
    hp = _native_hp(True, True)
    init, grads = initial_weights(dtype), scaled_gradients(dtype, steps=10)
    params, opt = _make(init, hp, "native")
    ref_params, ref = _make(init, hp, "loop")
    lr = torch.tensor(0.05, dtype=torch.float64)
    opt.param_groups[0]["lr"] = lr

    def no_host_read(*_args, **_kwargs):
        raise AssertionError("host read of a tensor inside step()")

    for t, step_grads in enumerate(grads):
        value = 0.05 * (1.0 - t / 20)
        lr.fill_(value)
        ref.param_groups[0]["lr"] = value
        feed(params, step_grads)
        feed(ref_params, step_grads)
        with monkeypatch.context() as m:
            for name in ("item", "__float__", "__bool__"):
                m.setattr(torch.Tensor, name, no_host_read)
            opt.step()
        ref.step()
    expected, got = _by_kind(ref_params, ref), _by_kind(params, opt)
    assert torch.equal(expected["step"], got["step"])
    assert all(_rel(expected[k], got[k]) <= 1e-13 for k in ("param", "exp_avg", "exp_avg_sq"))
    assert len(native_calls) == 2 * len(grads)


@pytest.mark.parametrize("impl", ["auto", "compiled"])
def test_without_the_c_library_the_torch_paths_give_the_same_numbers(impl, monkeypatch):
    """``_native.load()`` returning None (no compiler): ``"auto"`` on these small groups runs the
    loop path (bit-identical to ``implementation="loop"``), ``"compiled"`` the torch.compile
    kernel (within fp32 rounding of it); the C kernel is never called."""
    monkeypatch.setenv(_native.NATIVE_ENV_VAR, "0")
    calls = []
    monkeypatch.setattr(_native, "adopt_update", lambda *a, **k: calls.append(1))
    hp = _native_hp(True, False)
    dtype = torch.float32
    init, grads = initial_weights(dtype), scaled_gradients(dtype, steps=12)
    ref_params, ref = _make(init, hp, "loop")
    params, opt = _make(init, hp, impl)
    for step_grads in grads:
        for ps, o in ((ref_params, ref), (params, opt)):
            feed(ps, step_grads)
            o.step()
    if impl == "auto":
        expected, got = _snapshot(ref_params, ref), _snapshot(params, opt)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    else:
        expected, got = _by_kind(ref_params, ref), _by_kind(params, opt)
        assert torch.equal(expected["step"], got["step"])
        # fp32: measured 1e-7
        assert all(_rel(expected[k], got[k]) <= 1e-6 for k in ("param", "exp_avg", "exp_avg_sq"))
    assert calls == []


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    """A compiler that cannot run: one RuntimeWarning at the first step, then the torch paths,
    with the loop path's numbers exactly (``"auto"`` on small groups)."""
    monkeypatch.setattr(_native.loader, "_lib", None)
    monkeypatch.setattr(_native.loader, "_failed", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("HF_TUNINGFREE_CACHE", str(tmp_path / "cache"))
    hp = _native_hp(False, True)
    init, grads = initial_weights(torch.float32), scaled_gradients(torch.float32, steps=6)
    ref_params, ref = _make(init, hp, "loop")
    params, opt = _make(init, hp, "auto")
    with pytest.warns(RuntimeWarning, match="building the fused CPU kernels failed"):
        feed(params, grads[0])
        opt.step()
    assert _native.load() is None
    feed(ref_params, grads[0])
    ref.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        for step_grads in grads[1:]:
            for ps, o in ((ref_params, ref), (params, opt)):
                feed(ps, step_grads)
                o.step()
    expected, got = _snapshot(ref_params, ref), _snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
