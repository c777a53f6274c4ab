"""The ``"foreach"`` form of the D-Adaptation family, Prodigy and schedule-free Prodigy: each
pass's per-element function run once per bucket on :class:`TensorList` arguments
(:mod:`hf_tuningfree.optim.multitensor`).

Held to: the per-tensor op it stands for, bit for bit, for every mapped operation; the loop path
over whole runs (fp64 to rounding, fp32/bf16 with stochastic rounding on and off bit for bit),
with a skipped step, weight decay, ``beta1 = 0``, ``slice_p``, an implicit ``x0``; a number of
compute ops per step that does not grow with the number of tensors; no host reads; resume.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_tuningfree.optim import (
    DAdaptAdaGrad,
    DAdaptAdam,
    DAdaptSGD,
    HyperAdaGrad,
    HyperRMSProp,
    Prodigy,
    ProdigyScheduleFree,
    kernels,
    multitensor,
)
from hf_tuningfree.optim.kernels import choose_path
from hf_tuningfree.optim.multitensor import TensorList, run_multi, segment_dots

CLASSES = [DAdaptSGD, DAdaptAdam, DAdaptAdaGrad, Prodigy, ProdigyScheduleFree]
IDS = [c.__name__ for c in CLASSES]


def _lists(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2, 4), (1,)]
    a = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    a[0][0, 0] = 0.0
    b[1][0] = -0.0
    return a, b


def _rel(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Largest ``|a - b|`` over ``max |b|``, tensor by tensor."""
    return max(
        float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())
        for a, b in zip(got, ref, strict=True)
    )


def _same(x: TensorList | list, y: list[torch.Tensor]) -> bool:
    items = x.items if isinstance(x, TensorList) else x
    return len(items) == len(y) and all(
        u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v)
        for u, v in zip(items, y, strict=True)
    )


# ---------------------------------------------------------------------- the operations
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_every_mapped_operation_is_the_per_tensor_operation_bit_for_bit(dtype):
    a, b = _lists(dtype)
    A, B = TensorList(a), TensorList(b)
    c = torch.tensor(0.3, dtype=dtype)
    pos = [t.abs() for t in a]
    cases = {
        "a + b": (A + B, [x + y for x, y in zip(a, b, strict=True)]),
        "a - b": (A - B, [x - y for x, y in zip(a, b, strict=True)]),
        "a * b": (A * B, [x * y for x, y in zip(a, b, strict=True)]),
        "a / b": (A / B, [x / y for x, y in zip(a, b, strict=True)]),
        "a + c": (A + c, [x + c for x in a]),
        "c + a": (c + A, [c + x for x in a]),
        "a - c": (A - c, [x - c for x in a]),
        "c - a": (c - A, [c - x for x in a]),
        "c * a": (c * A, [c * x for x in a]),
        "a / c": (A / c, [x / c for x in a]),
        "c / a": (c / A, [c / x for x in a]),
        "2.0 * a": (2.0 * A, [2.0 * x for x in a]),
        "0.0 - a": (0.0 - A, [0.0 - x for x in a]),
        "a - 1.5": (A - 1.5, [x - 1.5 for x in a]),
        "-a": (-A, [-x for x in a]),
        "sqrt": (TensorList(pos).sqrt(), [x.sqrt() for x in pos]),
        "torch.sqrt": (torch.sqrt(TensorList(pos)), [torch.sqrt(x) for x in pos]),
        "abs": (A.abs(), [x.abs() for x in a]),
        "maximum": (torch.maximum(A, B), [torch.maximum(x, y) for x, y in zip(a, b, strict=True)]),
        "minimum": (torch.minimum(A, B), [torch.minimum(x, y) for x, y in zip(a, b, strict=True)]),
        "a > 0": (A > 0, [x > 0 for x in a]),
    }
    wrong = [name for name, (got, want) in cases.items() if not _same(got, want)]
    assert not wrong, wrong
    assert torch.equal((0.0 - A).items[0][0, 0], torch.tensor(0.0, dtype=dtype))  # +0, not -0
    assert not torch.signbit((0.0 - A).items[0][0, 0])


def test_where_on_a_0_dim_condition_selects_every_tensor_nan_included():
    a, b = _lists(torch.float32)
    a[2][1, 1, 1] = float("nan")
    a[0][3, 2] = float("inf")
    A, B = TensorList(a), TensorList(b)
    for ok in (torch.tensor(True), torch.tensor(False)):
        got = torch.where(ok, A, 0.0)
        assert _same(got, [torch.where(ok, x, 0.0) for x in a]) or bool(ok)
        assert all(g.shape == x.shape for g, x in zip(got.items, a, strict=True))
        both = torch.where(ok, A, B)
        want = [torch.where(ok, x, y) for x, y in zip(a, b, strict=True)]
        assert all(
            torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0))
            for g, w in zip(both.items, want, strict=True)
        )
    zeroed = torch.where(torch.tensor(False), A, 0.0)
    assert all(int(t.count_nonzero()) == 0 for t in zeroed.items)  # the NaN and Inf are gone
    kept = torch.where(torch.tensor(True), A, 0.0)
    assert bool(kept.items[2][1, 1, 1].isnan()) and bool(kept.items[0][3, 2].isinf())


def test_to_and_copy_cast_as_the_tensor_methods_do():
    a, _ = _lists(torch.float64)
    A = TensorList(a)
    assert A.to(torch.float64) is A  # as Tensor.to: nothing to do, the same tensors
    assert _same(A.to(torch.float32), [x.to(torch.float32) for x in a])
    into = [torch.empty_like(x, dtype=torch.bfloat16) for x in a]
    TensorList(into).copy_(A)
    assert _same(into, [x.to(torch.bfloat16) for x in a])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sum_is_the_total_of_every_tensor_within_rounding(dtype):
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(n, generator=g, dtype=dtype) for n in (1000, 17, 4096, 3)]
    total = TensorList(ts).sum(dtype=torch.float64)
    exact = sum(t.to(torch.float64).sum() for t in ts)
    assert total.dtype == torch.float64 and total.dim() == 0
    rel = abs(float(total) - float(exact)) / float(sum(t.abs().sum() for t in ts))
    assert rel <= 1e-15, rel  # measured: 0 to 4e-17
    assert TensorList(ts).sum().dtype == dtype


def test_run_multi_calls_once_per_pattern_of_missing_optional_arguments():
    p = [torch.full((2,), float(i)) for i in range(5)]
    x0 = [None, torch.ones(2), None, torch.ones(2), torch.ones(2)]
    seen = []

    def fn(param, state, scale, *, flag):
        seen.append((len(param), state is None, flag))
        return (param * scale).sum() if state is None else (param * scale + state).sum()

    outs = run_multi(fn, [p, x0], [torch.tensor(2.0)], {"flag": True})
    assert sorted(seen) == [(2, True, True), (3, False, True)]
    assert sum(float(o) for o in outs) == 2.0 * 2 * (0 + 1 + 2 + 3 + 4) + 3 * 2


def test_run_multi_cuts_a_large_bucket_into_chunks(monkeypatch):
    """At most ``CHUNK_ELEMENTS`` per call (a larger tensor alone): the flat temporaries of
    ``where`` and ``sum`` stay bounded; the sums over the calls are the bucket's."""
    monkeypatch.setattr(multitensor, "CHUNK_ELEMENTS", 100)
    p = [torch.ones(n) for n in (60, 30, 20, 250, 5, 95)]
    calls = []

    def fn(param, scale):
        calls.append([t.numel() for t in param.items])
        return (param * scale).sum(dtype=torch.float64)

    outs = run_multi(fn, [p], [torch.tensor(2.0)], {})
    assert calls == [[60, 30], [20], [250], [5, 95]]
    assert float(sum(outs)) == 2.0 * 460


def test_operands_of_different_lengths_are_an_error():
    with pytest.raises(ValueError, match=r"TensorList operands of different lengths: \[1, 2\]"):
        torch.where(TensorList([torch.ones(1)]) > 0, TensorList([torch.ones(1)] * 2), 0.0)


# ---------------------------------------------------------------------- the optimizers
def _model(dtype: torch.dtype, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(37, 19), (19,), (5, 7), (300,), (2, 3, 4)]
    out = [torch.randn(shapes[i % 5], generator=g, dtype=torch.float64) for i in range(n)]
    out[2 % n].zero_()  # all zero at the first step: an implicit x0 (Prodigy's)
    return [t.to(dtype).requires_grad_() for t in out]


def _run(cls, impl, dtype, steps=12, n=4, nan_at=3, **kw):
    params = _model(dtype, n)
    targets = [torch.full_like(p, 2.0) for p in params]
    opt = cls(params, implementation=impl, **kw)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step's warning
        for k in range(steps):
            for p, t in zip(params, targets, strict=True):
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
                p.grad = ((p.detach().double() - t.double()) + 0.1 * noise).to(dtype)
            if k == nan_at:
                params[1].grad[0] = float("nan")
            opt.step()
    return params, opt


CONFIGS = {
    "default": {},
    "coupled-wd": {"weight_decay": 0.1},
    "decoupled-wd": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "slice_p=2": {"slice_p": 2},
    "beta1=0": {"betas": (0.0, 0.99)},
    "momentum": {"momentum": 0.9},
}
APPLIES = {
    "decoupled-wd": {DAdaptSGD, DAdaptAdam, Prodigy, ProdigyScheduleFree},
    "slice_p=2": {DAdaptSGD, DAdaptAdam, Prodigy, ProdigyScheduleFree},
    "beta1=0": {DAdaptAdam, Prodigy},
    "momentum": {DAdaptSGD, DAdaptAdaGrad},
}


@pytest.mark.parametrize(
    ("cls", "config"),
    [
        pytest.param(cls, config, id=f"{cls.__name__}-{config}")
        for cls in CLASSES
        for config in CONFIGS
        if cls in APPLIES.get(config, CLASSES)
    ],
)
def test_foreach_follows_the_loop_at_fp64(cls, config):
    kw = CONFIGS[config]
    ref, ref_opt = _run(cls, "loop", torch.float64, **kw)
    got, opt = _run(cls, "foreach", torch.float64, **kw)
    worst = _rel(got, ref)
    d, ref_d = opt.stats()["d"], ref_opt.stats()["d"]
    print(f"{cls.__name__} {config}: params {worst:.1e}, d {abs(d / ref_d - 1):.1e}")
    assert worst <= 1e-13 and abs(d / ref_d - 1) <= 1e-13, (worst, d, ref_d)  # measured <= 2.5e-15
    assert d > 10 * opt.param_groups[0]["d0"] or d > 1e-2  # d grew: the sums were used
    assert opt.stats()["skipped_steps"] == 1
    for p, q in zip(got, ref, strict=True):  # the same state, the same keys (x0 left out alike)
        assert opt.state[p].keys() == ref_opt.state[q].keys()


@pytest.mark.parametrize(
    ("dtype", "rounding"),
    [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)],
    ids=["fp32", "bf16-stochastic", "bf16-nearest"],
)
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_foreach_is_the_loop_bit_for_bit_in_fp32_and_bf16(cls, dtype, rounding):
    """The same ops in the same dtypes; the sums are fp64-accumulated, so their different order
    of addition does not reach ``d`` here (measured: equal)."""
    kw = {"stochastic_rounding": rounding, "weight_decay": 0.01}
    ref, ref_opt = _run(cls, "loop", dtype, **kw)
    got, opt = _run(cls, "foreach", dtype, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert opt.stats()["d"] == ref_opt.stats()["d"]
    assert any(not torch.equal(a, b) for a, b in zip(got, _model(dtype), strict=True))  # it moved


class _ComputeOps(TorchDispatchMode):
    """Counts the aten ops that compute (no views, no allocations)."""

    SKIP: ClassVar[set[str]] = {
        "aten.empty_like.default",
        "aten.empty.memory_format",
        "aten.scalar_tensor.default",
    }

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func) not in self.SKIP:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_the_ops_of_a_foreach_step_do_not_grow_with_the_number_of_tensors(cls, monkeypatch):
    """O(1) kernels per step: 4 tensors or 40, the same number of compute ops (each a
    multi-tensor op on CUDA); the loop's grows with the tensors (its packing of small tensors
    switched off here, as for large ones)."""
    monkeypatch.setattr(cls, "PACK_BELOW", 0)
    counts = {}
    for impl in ("foreach", "loop"):
        for n in (4, 40):
            params, opt = _run(cls, impl, torch.float32, steps=2, n=n, nan_at=-1)
            for p in params:
                p.grad = torch.ones_like(p)
            with _ComputeOps() as mode:
                opt.step()
            counts[impl, n] = mode.count
    print(counts)
    assert counts["foreach", 4] == counts["foreach", 40], counts
    assert counts["loop", 40] > 2 * counts["loop", 4], counts


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_foreach_step_reads_nothing_on_the_host(cls, monkeypatch):
    params, opt = _run(cls, "foreach", torch.float32, steps=2, nan_at=-1)

    def no_host_read(*_args, **_kwargs):
        raise AssertionError("host read of a tensor inside step()")

    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        with monkeypatch.context() as m:
            for attr in ("item", "__float__", "__bool__", "tolist"):
                m.setattr(torch.Tensor, attr, no_host_read)
            opt.step()
    assert opt.stats()["step"] == 5


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_foreach_run_resumes_on_the_loop_and_back(cls):
    """A state dict is the same whatever form wrote it: 6 foreach steps equal 3 foreach steps,
    a reload into a loop optimizer, 3 loop steps (fp64, to rounding)."""
    whole, _ = _run(cls, "foreach", torch.float64, steps=6, nan_at=-1)
    first, opt = _run(cls, "foreach", torch.float64, steps=3, nan_at=-1)
    saved = opt.state_dict()
    resumed = cls(first, implementation="loop")
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["implementation"] == "foreach"  # groups come from the dict
    for group in resumed.param_groups:
        group["implementation"] = "loop"
    targets = [torch.full_like(p, 2.0) for p in first]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # replay the generator to the same place
        for p in first:
            torch.randn(p.shape, generator=g, dtype=torch.float64)
    for _ in range(3):
        for p, t in zip(first, targets, strict=True):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad = (p.detach() - t) + 0.1 * noise
        resumed.step()
    worst = _rel(first, whole)
    assert worst <= 1e-13, worst


@pytest.mark.parametrize("name", ["dadapt_sgd", "dadapt_adam", "dadapt_adagrad", "prodigy",
                                  "prodigy_sf"])  # fmt: skip
def test_auto_takes_foreach_on_cuda_and_not_on_cpu(name, monkeypatch):
    from hf_tuningfree.optim import get_optimizer_spec

    cls = get_optimizer_spec(name).cls
    monkeypatch.setattr(kernels, "compile_available", lambda device: True)
    args = {"offered": cls.PATHS, "order": cls.AUTO_ORDER, "native": lambda: True}
    assert choose_path("auto", torch.device("cuda"), 1 << 20, **args) == "foreach"
    expected_cpu = "native" if "native" in cls.PATHS else "compiled"
    assert choose_path("auto", torch.device("cpu"), 1 << 24, **args) == expected_cpu
    assert choose_path("auto", torch.device("cpu"), 1 << 10, **args) in ("native", "loop")


# ---------------------------------------------------------------------- HyperAdaGrad, HyperRMSProp
HYPER = {
    "adagrad": (HyperAdaGrad, {}),
    "adagrad-wd": (HyperAdaGrad, {"weight_decay": 0.1}),
    "rmsprop": (HyperRMSProp, {}),
    "rmsprop-learn-decay": (HyperRMSProp, {"learn": ("lr", "decay")}),
}


#: foreach vs loop, relative: the dots are segmented sums here, per-tensor sums there (another
#: order of addition); measured 0 in fp64 and bf16, up to 8.9e-8 in fp32
HYPER_TOL = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])  # fmt: skip
@pytest.mark.parametrize("config", list(HYPER))
def test_the_hypergradient_foreach_form_follows_the_loop(config, dtype):
    """Both passes as foreach ops (the update on TensorLists, the dots as segmented sums):
    the loop's numbers to rounding, the learned step size included, with a skipped step."""
    cls, kw = HYPER[config]
    ref, ref_opt = _run(cls, "loop", dtype, lr=1e-2, **kw)
    got, opt = _run(cls, "foreach", dtype, lr=1e-2, **kw)
    assert _rel(got, ref) <= HYPER_TOL[dtype], _rel(got, ref)
    learned, expected = opt.stats()["hyper/level0/lr"], ref_opt.stats()["hyper/level0/lr"]
    assert abs(learned / expected - 1) <= HYPER_TOL[dtype] and learned != 1e-2
    assert opt.stats()["skipped_steps"] == 1


@pytest.mark.parametrize("height", [0, 2])
@pytest.mark.parametrize("cls", [HyperAdaGrad, HyperRMSProp], ids=["adagrad", "rmsprop"])
def test_the_hypergradient_foreach_ops_do_not_grow_with_the_tensors(cls, height):
    """The guard (nothing learned, ``height=0``), or the dots, and the update: the same op
    count for 4 tensors or 40 on the foreach form."""
    counts = {}
    for n in (4, 40):
        params, opt = _run(cls, "foreach", torch.float32, steps=2, n=n, nan_at=-1, height=height)
        for p in params:
            p.grad = torch.ones_like(p)
        with _ComputeOps() as mode:
            opt.step()
        counts[n] = mode.count
    assert counts[4] == counts[40], counts


@pytest.mark.parametrize("chunk", [1 << 26, 100], ids=["one-call", "chunked"])
def test_segment_dots_are_the_per_tensor_dot_products(chunk, monkeypatch):
    monkeypatch.setattr(multitensor, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(n, generator=g) for n in (5, 300, 1, 64)]
    bs = [[torch.randn(t.shape, generator=g) for t in a] for _ in range(2)]
    got = segment_dots(a, bs, torch.float64)
    rows = [[float(x.double() @ b[i].double()) for b in bs] for i, x in enumerate(a)]
    want = torch.tensor(rows, dtype=torch.float64)
    assert got.shape == (4, 2) and got.dtype == torch.float64
    assert float((got - want).abs().max()) <= 1e-13
