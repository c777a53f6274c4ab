"""The C path of the D-Adaptation family and Prodigy (:mod:`hf_tuningfree.optim._native`).

On CPU, ``implementation="auto"`` and ``"native"`` run each pass (statistics, update) as one C
call per bucket. These tests hold it to the per-tensor loop path step by step (fp32 and fp64, two
groups, both weight-decay modes, maximize, a gradient that is sometimes None, a tensor whose first
gradient comes late, tensors above the threaded size), and check the non-finite guard,
checkpoints, thread counts, host reads and the fallback when the C library is unavailable. The
per-element references of the papers' algorithms run on this path too (tests/test_dadapt.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from native_scenarios import SHAPES, feed, initial_weights, missing

from hf_tuningfree.optim import DAdaptAdaGrad, DAdaptAdam, DAdaptSGD, Prodigy, _native
from hf_tuningfree.optim.dadapt import DAdaptationBase

#: Two groups; tensors above 4 blocks of 8192 elements (the threaded size), one of 1 element.
STEPS = 24


def _hp(name: str, decoupled: bool) -> tuple[type, dict, list[dict]]:
    """(class, model-wide hyperparameters, per-group hyperparameters). Group 1 maximizes."""
    groups = [dict(lr=1.0, weight_decay=0.1), dict(lr=0.5, weight_decay=0.05, maximize=True)]
    for g in groups:
        g["decoupled_weight_decay"] = decoupled
    model = {"d0": 1e-4}
    if name in ("dadapt_adam", "prodigy"):
        groups[0]["eps"], groups[1]["eps"] = 1e-8, 1e-3
        model["betas"] = (0.8, 0.99)
        if name == "dadapt_adam":
            return DAdaptAdam, model, groups
        return Prodigy, {**model, "growth_rate": 1e3}, groups
    if name.startswith("dadapt_sgd"):
        momentum = 0.9 if name == "dadapt_sgd_momentum" else 0.0
        return DAdaptSGD, model, [{**g, "momentum": momentum} for g in groups]
    if name.startswith("dadapt_adagrad"):  # weight decay is coupled only
        momentum = 0.5 if name == "dadapt_adagrad_momentum" else 0.0
        for g, eps, alpha in zip(groups, (1e-6, 1e-3), (1e-6, 0.1), strict=True):
            del g["decoupled_weight_decay"]
            g |= {"eps": eps, "initial_accumulator_value": alpha, "momentum": momentum}
        return DAdaptAdaGrad, model, groups
    raise KeyError(name)


NAMES = [
    "dadapt_adam",
    "prodigy",
    "dadapt_sgd",
    "dadapt_sgd_momentum",
    "dadapt_adagrad",
    "dadapt_adagrad_momentum",
]
#: the C kernels of each optimizer's (statistics, update, fused) passes
KERNELS = {
    "dadapt_adam": ("dadapt_adam_stats", "dadapt_adam_update", "dadapt_adam_fused"),
    "prodigy": ("prodigy_stats", "prodigy_update", "prodigy_fused"),
    "dadapt_sgd": ("dadapt_sgd_stats", "dadapt_sgd_update", "dadapt_sgd_fused"),
    "dadapt_sgd_momentum": (
        "dadapt_sgd_stats",
        "dadapt_sgd_momentum_update",
        "dadapt_sgd_momentum_fused",
    ),
    "dadapt_adagrad": ("dadapt_adagrad_stats", "dadapt_adagrad_update", "dadapt_adagrad_fused"),
    "dadapt_adagrad_momentum": (
        "dadapt_adagrad_stats",
        "dadapt_adagrad_update",
        "dadapt_adagrad_fused",
    ),
}
#: Where nothing is reduced across processes, a step runs in the fused form (the guard's
#: ||g||^2, then one kernel that computes the other sums while it updates); sharded runs keep the
#: two-pass form (statistics, one all-reduce, update). Both are tested here in one process.
FORMS = ["fused", "two_pass"]


def _use_form(form: str, monkeypatch) -> None:
    monkeypatch.setattr(DAdaptationBase, "FUSE", form == "fused")


def _expected_calls(name: str, form: str, steps: int) -> list[str]:
    """The C kernels a run of ``steps`` steps on the two groups calls, in order."""
    stats, update, fused = KERNELS[name]
    if form == "fused":
        return ["dadapt_grad_sq", "dadapt_grad_sq", fused, fused] * steps
    return [stats, stats, update, update] * steps


#: (name, decoupled weight decay): AdaGrad's decay is coupled only
CASES = [(n, dec) for n in NAMES for dec in (True, False) if not (dec and "adagrad" in n)]


@pytest.fixture
def native_calls(monkeypatch):
    """Names of the C kernels called (skips without a C compiler)."""
    if _native.load() is None:
        pytest.skip("no C compiler")
    calls: list[str] = []
    real = _native.dadapt_kernel

    def spy(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_native, "dadapt_kernel", spy)
    return calls


def _grads(dtype, steps=STEPS, seed=3):
    """Per step, per group, per tensor: a gradient or None. A fixed direction plus noise (so that
    d grows), independent of the iterates (so that rounding differences are not amplified through
    the gradients). Tensor 1 of each group has none on every third step; tensor 2 of group 1 gets
    its first gradient at step 5."""
    gen = torch.Generator().manual_seed(seed)
    bias = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in grp] for grp in SHAPES]
    out = []
    for t in range(steps):
        step = []
        for gi, shapes in enumerate(SHAPES):
            gs = []
            for pi, s in enumerate(shapes):
                noise = torch.randn(s, generator=gen, dtype=torch.float64)
                g = (bias[gi][pi] + 0.5 * noise).to(dtype)
                gs.append(None if missing(t, gi, pi) else g)
            step.append(gs)
        out.append(step)
    return out


def _make(name, init, impl, decoupled=True):
    cls, model, hp = _hp(name, decoupled)
    params = [[torch.nn.Parameter(p.clone()) for p in grp] for grp in init]
    groups = [{"params": ps, **h} for ps, h in zip(params, hp, strict=True)]
    return params, cls(groups, implementation=impl, **model)


def _snapshot(params, opt, skip_state_of=None):
    """Every parameter, state tensor and model-wide scalar (but the skip counter), cloned, in a
    fixed order."""
    flat = [p for ps in params for p in ps]
    out = [p.detach().clone() for p in flat]
    for p in flat:
        st = opt.state[p] if p is not skip_state_of else {}
        out += [st[k].clone() for k in sorted(st)]
    out += [v.clone() for k, v in sorted(opt.global_state.items()) if k != "skipped_steps"]
    return out


def _by_kind(params, opt) -> dict[str, torch.Tensor]:
    """The model's parameters and each state key, flattened into one tensor per kind (tensors
    without state yet contribute their parameter only), and each model-wide scalar."""
    flat = [p for ps in params for p in ps]
    out = {"param": torch.cat([p.detach().reshape(-1) for p in flat])}
    keys = sorted(next(opt.state[p] for p in flat if opt.state[p]))
    for key in keys:
        out[key] = torch.cat([opt.state[p][key].reshape(-1) for p in flat if opt.state[p]])
    for key, value in opt.global_state.items():
        out["global " + key] = value.reshape(1).double()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a| (the absolute difference when a is all zero)."""
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


# ---------------------------------------------------------------------- the loop path, step by step
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "name, decoupled", CASES, ids=[f"{n}-{'decoupled' if d else 'coupled'}_wd" for n, d in CASES]
)
def test_native_path_tracks_the_loop_path_step_by_step(
    name, decoupled, dtype, form, native_calls, monkeypatch
):
    """After every one of 24 steps, the parameters, every state tensor and every model-wide scalar
    (d, numerator, ||s||) of the C path are within rounding of the loop path: max |difference| <=
    1e-6 (fp32) or 1e-12 (fp64) of the largest value of that quantity in the model. (C's sqrt is
    correctly rounded, torch's vectorised CPU sqrt not always: ~20% of the fp32 elements differ
    by an ulp after the first step; the largest difference measured over the run was 4e-7.)
    Both forms: fused (one process) and two-pass (what sharded runs use)."""
    _use_form(form, monkeypatch)
    init, grads = initial_weights(dtype), _grads(dtype)
    ref_params, ref = _make(name, init, "loop", decoupled)
    params, opt = _make(name, init, "native", decoupled)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    worst: dict[str, float] = {}
    for t, step_grads in enumerate(grads):
        feed(ref_params, step_grads)
        feed(params, step_grads)
        ref.step()
        opt.step()
        expected, got = _by_kind(ref_params, ref), _by_kind(params, opt)
        assert expected.keys() == got.keys()
        assert torch.equal(got["global step"], expected["global step"])
        for kind, value in expected.items():
            assert got[kind].dtype == value.dtype, kind
            rel = _rel(value, got[kind])
            assert rel <= tol, f"step {t}, {kind}: {rel:.2e} > {tol:.0e}"
            worst[kind] = max(worst.get(kind, 0.0), rel)
    assert native_calls == _expected_calls(name, form, STEPS)
    # d grew by an order of magnitude or more, the parameters moved
    assert opt.stats()["d"] > 10 * 1e-4
    assert (params[0][0].detach() - init[0][0]).abs().max().item() > 1e-3
    print("native vs loop, worst relative difference:", {k: f"{v:.1e}" for k, v in worst.items()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", NAMES)
def test_fused_and_two_pass_forms_agree(name, dtype, native_calls, monkeypatch):
    """The fused form (one process) and the two-pass form (sharded runs) evaluate the same
    elementwise expressions over the same blocks and add the same per-block sums: equal to
    fp64 rounding of the sums (measured: bit-identical with GCC 12, every optimizer and dtype)."""
    init, grads = initial_weights(dtype), _grads(dtype, steps=12)
    runs = []
    for form in FORMS:
        _use_form(form, monkeypatch)
        params, opt = _make(name, init, "native", decoupled=False)
        for step_grads in grads:
            feed(params, step_grads)
            opt.step()
        runs.append(_by_kind(params, opt))
    fused, two_pass = runs
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for kind, value in two_pass.items():
        assert _rel(value, fused[kind]) <= tol, kind
    assert {c.rsplit("_", 1)[1] for c in native_calls} == {"sq", "fused", "stats", "update"}


# ---------------------------------------------------------------------- guard, checkpoints, threads
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")], ids=["nan", "-inf"])
@pytest.mark.parametrize("name", NAMES)
def test_native_nonfinite_gradient_leaves_params_and_state_bit_identical(
    name, bad, form, native_calls, monkeypatch
):
    """A NaN/Inf in one element of one gradient (of the second group) skips the step for the
    whole model on the C path: parameters, state and model-wide scalars bit-identical (the tensor
    whose first gradient arrives in that step only gets its initial state), and training then
    continues exactly as if that step never happened."""
    _use_form(form, monkeypatch)
    dtype = torch.float32
    init, grads = initial_weights(dtype), _grads(dtype, steps=9)
    params, opt = _make(name, init, "native")
    clean_params, clean = _make(name, init, "native")
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
    initial: dict = {}
    opt._init_param_state(late, initial, opt.param_groups[1])
    if "z" in opt.state[late]:  # DAdaptSGD's z, created by its first update pass, starts at x
        initial["z"] = late.detach()
    if "x0" in opt.state[late] and "x0" not in initial:  # Prodigy's x0 of a nonzero tensor,
        initial["x0"] = late.detach()  # stored after the zero check (implicit_zero_x0)
    assert opt.state[late].keys() == initial.keys()
    assert all(torch.equal(opt.state[late][k], v) for k, v in initial.items())
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
    assert KERNELS[name][2 if form == "fused" else 1] in native_calls


@pytest.mark.parametrize("name", NAMES)
def test_native_state_dict_round_trip_continues_bit_exactly(name, tmp_path, native_calls):
    """Save mid-training (``torch.save`` / ``torch.load(weights_only=True)``, as the Trainer
    does), load into a fresh optimizer over copied parameters: the next steps are bit-identical to
    the uninterrupted run."""
    dtype = torch.float32
    init, grads = initial_weights(dtype), _grads(dtype, steps=14)
    params, opt = _make(name, init, "native")
    for step_grads in grads[:7]:
        feed(params, step_grads)
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    copied = [[p.detach() for p in ps] for ps in params]
    resumed_params, resumed = _make(name, copied, "native")
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(_snapshot(params, opt), _snapshot(resumed_params, resumed), strict=True)
    )
    for step_grads in grads[7:]:
        for ps, o in ((params, opt), (resumed_params, resumed)):
            feed(ps, step_grads)
            o.step()
    got, expected = _snapshot(resumed_params, resumed), _snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert opt.global_state["step"].item() == 14.0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_native_path_is_independent_of_the_thread_count(name, form, native_calls, monkeypatch):
    """Elementwise work and per-block sums added in block order: 1 and 2 threads give
    bit-identical parameters, state and d."""
    _use_form(form, monkeypatch)
    init, grads = initial_weights(torch.float32), _grads(torch.float32, steps=6)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params, opt = _make(name, init, "native")
            for step_grads in grads:
                feed(params, step_grads)
                opt.step()
            results.append(_snapshot(params, opt))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_native_step_makes_no_host_reads(name, monkeypatch, native_calls):
    """``step()`` on the C path reads no tensor on the host (no ``.item()``, ``float()``,
    ``bool()``): the C code reads ``ok`` and the coefficients from tensor memory."""
    init, grads = initial_weights(torch.float32), _grads(torch.float32, steps=4)
    params, opt = _make(name, init, "auto")

    def no_host_read(*_args, **_kwargs):
        raise AssertionError("host read of a tensor inside step()")

    for step_grads in grads:
        feed(params, step_grads)
        with monkeypatch.context() as m:
            for attr in ("item", "__float__", "__bool__"):
                m.setattr(torch.Tensor, attr, no_host_read)
            opt.step()
    assert len(native_calls) == 4 * len(grads)
    assert opt.stats()["step"] == len(grads)


# ---------------------------------------------------------------------- fallback
@pytest.mark.parametrize("name", NAMES)
def test_without_the_c_library_auto_is_the_loop_path(name, monkeypatch):
    """``_native.load()`` returning None (no compiler): ``"auto"`` on these small groups runs the
    per-tensor loop, bit-identical to ``implementation="loop"``; the C kernels are never called.
    (``"compiled"``, torch.compile, is held to the loop in tests/test_dadapt.py.)"""
    monkeypatch.setenv(_native.NATIVE_ENV_VAR, "0")
    calls = []
    monkeypatch.setattr(_native, "dadapt_kernel", lambda *a, **k: calls.append(a[0]))
    dtype = torch.float32
    init, grads = initial_weights(dtype), _grads(dtype, steps=10)
    ref_params, ref = _make(name, init, "loop")
    params, opt = _make(name, init, "auto")
    for step_grads in grads:
        for ps, o in ((ref_params, ref), (params, opt)):
            feed(ps, step_grads)
            o.step()
    expected, got = _snapshot(ref_params, ref), _snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert calls == []
    assert opt.stats()["d"] > 1e-4


def test_sixteen_bit_parameters_take_the_torch_path(native_calls):
    """bf16 parameters (fp32 arithmetic in the torch kernels) are not for the C kernels: the
    bucket falls back to the loop path and gives its numbers exactly."""
    torch.manual_seed(0)
    init = torch.randn(300)
    runs = []
    for impl in ("loop", "auto"):
        p = torch.nn.Parameter(init.to(torch.bfloat16))
        opt = DAdaptAdam([p], d0=1e-3, implementation=impl)
        for t in range(5):
            p.grad = (p.detach().float() - math.sin(t)).to(torch.bfloat16)
            opt.step()
        runs.append((p.detach().clone(), opt.stats()["d"]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert runs[0][0].dtype == torch.bfloat16
    assert native_calls == []


# ---------------------------------------------------------------------- the kernels themselves
def _kernel_table():
    """Per kernel: (per-element torch function, the state streams after x and g, coefficients in
    the order of the function's 0-dim arguments with ``ok`` left out)."""
    from hf_tuningfree.optim import dadapt, prodigy
    from hf_tuningfree.optim.dadapt import sgd

    return {
        "dadapt_adam_stats": (dadapt.dadapt_adam_statistics, ["v", "s"],
                              [0.1, 1e-8, 1e-3, 0.05]),
        "dadapt_adam_update": (dadapt.dadapt_adam_tensor_update, ["m", "v", "s"],
                               [1e-3, 0.1, 0.0, 0.1, 0.01, 0.05, 1.0, 1e-8]),
        "prodigy_stats": (prodigy.prodigy_statistics, ["s", "x0"], [0.1, 2e-3, -0.05]),
        "prodigy_update": (prodigy.prodigy_tensor_update, ["m", "v", "s"],
                           [1e-3, 1e-3, 2e-3, 0.1, 0.0, 0.1, 0.01, -0.05, 1e-11]),
        "dadapt_sgd_stats": (dadapt.dadapt_sgd_statistics, ["s"], [0.1, 1e-3]),
        "dadapt_sgd_update": (dadapt.dadapt_sgd_tensor_update, ["s"], [1e-3, 0.1, 0.0]),
        "dadapt_sgd_momentum_update": (sgd.dadapt_sgd_momentum_tensor_update, ["s", "z"],
                                       [1e-3, 0.1, 1e-4, 0.1]),
        "dadapt_adagrad_stats": (dadapt.dadapt_adagrad_statistics, ["alpha", "s"],
                                 [0.1, 1e-3, 1e-6]),
        "dadapt_adagrad_update": (dadapt.dadapt_adagrad_tensor_update, ["alpha", "s", "x0"],
                                  [1e-3, 0.1, 0.5, 1e-6]),
    }  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "kernel",
    ["dadapt_adam_stats", "dadapt_adam_update", "prodigy_stats", "prodigy_update",
     "dadapt_sgd_stats", "dadapt_sgd_update", "dadapt_sgd_momentum_update",
     "dadapt_adagrad_stats", "dadapt_adagrad_update", "dadapt_adagrad_update-averaged"],
)  # fmt: skip
def test_kernels_directly(kernel, dtype):
    """Each C kernel against its per-element torch function, on tensors of 70000, 3, 0 and 600
    elements with maximize and coupled decay on. A statistics kernel: the function's sums to
    rounding (terms in the tensors' dtype, sums in fp64), the same bits for 1 and 2 threads, NaN
    for a NaN gradient. An update kernel: nothing written when ``ok`` is False (NaN gradients
    included); otherwise the function's update to rounding (sqrt: an ulp)."""
    if _native.load() is None:
        pytest.skip("no C compiler")
    kernel, _, variant = kernel.partition("-")
    fn, state, coefficients = _kernel_table()[kernel]
    gen = torch.Generator().manual_seed(0)
    shapes = [(70000,), (3,), (0,), (20, 30)]

    def rand(positive=False):
        ts = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
        return [t.abs() for t in ts] if positive else ts

    streams = [rand(), rand()] + [rand(positive=key in ("v", "alpha")) for key in state]
    coef = torch.tensor(coefficients, dtype=torch.float64)
    scalars = [torch.tensor(c, dtype=dtype) for c in coefficients]
    flags = {"maximize": True, "coupled": True}
    if kernel == "dadapt_adagrad_update":
        flags["averaged"] = variant == "averaged"
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    nsums = _native.DADAPT_KERNELS[kernel][2]
    if nsums:
        sums = []
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                out = torch.full((nsums,), -1.0, dtype=torch.float64)
                _native.dadapt_kernel(kernel, streams, coef, out=out, **flags)
                sums.append(out)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(sums[0], sums[1])
        expected = torch.zeros(nsums, dtype=torch.float64)
        for k in range(len(shapes)):
            expected += torch.stack(fn(*(lst[k] for lst in streams), *scalars, acc64=True, **flags))
        assert torch.allclose(sums[0], expected, rtol=tol, atol=0.0), (sums[0], expected)
        streams[1][3][7, 11] = math.nan
        _native.dadapt_kernel(kernel, streams, coef, out=out, **flags)
        assert out.isnan().any()
        return
    written = [streams[0], *streams[2:]]
    bad = [streams[0], [t.clone().fill_(math.nan) for t in streams[1]], *streams[2:]]
    before = [t.clone() for lst in written for t in lst]
    _native.dadapt_kernel(kernel, bad, coef, ok=torch.tensor(False), **flags)
    after = [t for lst in written for t in lst]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    ref = [[t.clone() for t in lst] for lst in streams]
    _native.dadapt_kernel(kernel, streams, coef, ok=torch.tensor(True), **flags)
    for k in range(len(shapes)):
        fn(*(lst[k] for lst in ref), torch.tensor(True), *scalars, acc64=True, **flags)
    for got, want in zip(streams, ref, strict=True):
        for a, b in zip(got, want, strict=True):
            if b.numel():
                assert _rel(b, a) <= tol
    assert not torch.equal(streams[0][0], before[0])
