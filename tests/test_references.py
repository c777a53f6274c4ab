"""Every registered optimizer agrees with its paper's per-element reference at fp64.

The references live in ``hf_tuningfree.optim.reference`` (one module per family, plain Python
floats, sharing nothing with the implementation). One test, parametrised over the registry: each
name has a configuration here that exercises it (several param groups with different
hyperparameters, a tensor without a gradient on some steps, non-default model-wide settings), is
run on every CPU code path (``"loop"``, ``"foreach"`` and ``"auto"``, which on CPU is the C
kernels where a compiler exists; the torch.compile path is left to the per-family files, it
takes minutes), and must follow the reference's parameters and its adapted scalar at every step.
A registered name without a reference or a configuration here fails.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_tuningfree.optim import _native, available_optimizers, get_optimizer_spec
from hf_tuningfree.optim.reference import BY_NAME, problems

F64 = torch.float64
STEPS = 30
#: The agreement asked of every case (relative: see ``_rel_error``); a case that needs more
#: says so in its ``tol`` with the measured value and the reason.
TOL = 1e-12
QUADRATIC = [[(3, 4), (5,), (2, 3)], [(4,), (2, 2)]]
#: DoG: a large tensor (its distance dominates), and in group 2 a tensor whose first gradient
#: comes at step 2 (its x0 and, for L-DoG, its rbar start late)
DOG_SHAPES = [[(3, 4), (5,), (2, 2, 2), (70, 100)], [(4,), (1,)], [(6,), (2, 3)]]


def _dog_missing(t: int, gi: int, pi: int) -> bool:
    return (pi == 1 and t % 3 == 1) or (gi == 2 and pi == 0 and t < 2)


def _dog_problem(zero: tuple[tuple[int, int], ...] = ()) -> problems.NoisyQuadratic:
    """The noisy quadratic (its gradients point at a distant target, so DoG's distance and
    step size grow), with tensors that start at zero (LoRA's B) where ``zero`` says."""
    problem = problems.noisy_quadratic(DOG_SHAPES, STEPS, seed=1, missing=_dog_missing)
    for gi, pi in zero:
        problem.init[gi][pi] = [0.0] * len(problem.init[gi][pi])
    return problem


def _read_d(opt: Any, params: Any, grads: Any) -> float:
    return opt.stats()["d"]


def _read_eta(opt: Any, params: Any, grads: Any) -> float:
    return opt.stats()["eta"]


def _read_ldog(opt: Any, params: Any, grads: Any) -> dict:
    """Each stepped tensor's eta = rbar / sqrt(G + eps), from its state."""
    out = {}
    for gi, ps in enumerate(params):
        for pi, p in enumerate(ps):
            if grads[gi][pi] is not None:
                st, eps = opt.state[p], opt.param_groups[gi]["eps"]
                out[(gi, pi)] = float(st["rbar"] / torch.sqrt(st["G"] + eps))
    return out


def _read_hyper(opt: Any, params: Any, grads: Any) -> dict:
    stats = opt.stats()
    return {k[len("hyper/") :]: v for k, v in stats.items() if k.startswith("hyper/level")}


def _read_none(opt: Any, params: Any, grads: Any) -> None:
    return None


@dataclass
class Case:
    """A configuration of one registry name: its problem, its groups' hyperparameters (given
    to both the optimizer and the reference) and model-wide arguments (the optimizer's
    constructor arguments, also the reference's keywords)."""

    problem: Callable[[], Any]
    groups: list[dict[str, Any]]
    model_wide: dict[str, Any]
    read: Callable[[Any, Any, Any], Any]
    steps: int = STEPS
    tol: float = TOL
    #: the adapted scalar must move by at least this factor over the run (else the case would
    #: not test its adaptation); None where nothing is adapted
    min_growth: float | None = 2.0
    #: the weights must move by at least this much (relative, ``_rel_error``) from ``init``
    min_move: float = 1e-3
    #: whether "auto" on CPU runs C kernels (where the library builds)
    has_c: bool = True


def _quadratic() -> problems.NoisyQuadratic:
    return problems.noisy_quadratic(QUADRATIC, STEPS, seed=0)


def _stream() -> problems.GradientStream:
    return problems.gradient_stream(QUADRATIC, STEPS, seed=2)


D0 = 1e-4
_ADAM_GROUPS = [
    dict(lr=1.0, weight_decay=0.1, decoupled_weight_decay=True, eps=1e-8),
    dict(lr=0.5, weight_decay=0.0, decoupled_weight_decay=True, eps=1e-3),
]

CASES: dict[str, Case] = {
    "adopt": Case(
        _stream,
        [
            dict(
                lr=0.05,
                betas=(0.9, 0.999),
                eps=1e-6,
                weight_decay=0.1,
                decoupled_weight_decay=True,
                clip_exponent=0.25,
                maximize=False,
            ),
            dict(
                lr=0.02,
                betas=(0.5, 0.99),
                eps=1e-3,
                weight_decay=0.05,
                decoupled_weight_decay=False,
                clip_exponent=0.3,
                maximize=True,
            ),
        ],
        {},
        _read_none,
        min_growth=None,
    ),
    "dadapt_sgd": Case(
        _quadratic,
        [
            dict(lr=1.0, weight_decay=0.1, decoupled_weight_decay=True, momentum=0.9),
            dict(lr=0.5, weight_decay=0.0, decoupled_weight_decay=True, momentum=0.9),
        ],
        dict(d0=D0, d0_rel=1e-3, growth_rate=1.5, gradient_bound="first"),
        _read_d,
    ),
    "dadapt_adam": Case(
        _quadratic,
        _ADAM_GROUPS,
        dict(d0=D0, d0_rel=1e-3, growth_rate=math.inf, betas=(0.8, 0.99), use_bias_correction=True),
        _read_d,
    ),
    "dadapt_adagrad": Case(
        _quadratic,
        [
            dict(lr=1.0, weight_decay=0.1, eps=1e-6, momentum=0.5, initial_accumulator_value=1e-6),
            dict(lr=0.5, weight_decay=0.0, eps=1e-3, momentum=0.5, initial_accumulator_value=0.1),
        ],
        dict(d0=D0, d0_rel=1e-3, growth_rate=1.5),
        _read_d,
    ),
    "prodigy": Case(
        _quadratic,
        _ADAM_GROUPS,
        dict(
            d0=D0,
            d0_rel=1e-3,
            growth_rate=1.5,
            betas=(0.8, 0.99),
            use_bias_correction=True,
            safeguard_warmup=True,
            d_coef=0.5,
        ),
        _read_d,
    ),
    "prodigy_sf": Case(
        _quadratic,
        [dict(g, decoupled_weight_decay=False) for g in _ADAM_GROUPS],
        dict(
            d0=D0,
            d0_rel=1e-3,
            growth_rate=math.inf,
            betas=(0.8, 0.99),
            use_bias_correction=True,
            safeguard_warmup=False,
            d_coef=2.0,
        ),
        _read_d,
        has_c=False,  # its update has no fused C kernel yet (ProdigyScheduleFree.FUSE = False)
    ),
    "dog": Case(
        _dog_problem,
        [
            dict(lr=1.0, reps_rel=1e-3, weight_decay=0.1, eps=1e-8),
            dict(lr=0.5, reps_rel=1e-3, weight_decay=0.0, eps=1e-8),
            dict(lr=2.0, reps_rel=1e-3, weight_decay=0.01, eps=1e-8),
        ],
        {},
        _read_eta,
    ),
    "ldog": Case(
        lambda: _dog_problem(zero=((0, 1), (2, 0))),
        [
            dict(lr=1.0, reps_rel=1e-2, weight_decay=0.1, eps=1e-8),
            dict(lr=0.5, reps_rel=1e-3, weight_decay=0.0, eps=1e-8),
            dict(lr=2.0, reps_rel=1e-1, weight_decay=0.01, eps=1e-6),
        ],
        dict(zero_init_scale=True),
        _read_ldog,
    ),
    "tdog": Case(
        _dog_problem,
        [
            dict(lr=1.0, reps_rel=1e-2, weight_decay=0.1, eps=1e-8),
            dict(lr=0.5, reps_rel=1e-2, weight_decay=0.0, eps=1e-8),
            dict(lr=2.0, reps_rel=1e-2, weight_decay=0.01, eps=1e-8),
        ],
        dict(delta=0.05),
        _read_eta,
        min_move=1e-8,  # the taming divides DoG's step by ~1e5 here: the weights move ~1e-7
    ),
    "hyper_sgd": Case(
        _quadratic,
        [dict(lr=0.05, weight_decay=0.1), dict(lr=0.025, weight_decay=0.0)],
        dict(
            lr=0.05,
            momentum=0.8,
            learn="lr+momentum",
            height=2,
            hyper_optimizer=("sgd", "adam"),
            hyper_lr=(1e-3, 0.01),
            hyper_betas=(0.9, 0.99),
            hyper_eps=1e-16,
            lr_parametrization="log",
        ),
        _read_hyper,
        min_growth=None,
    ),
    "hyper_adam": Case(
        _quadratic,
        [
            dict(lr=0.01, weight_decay=0.05, eps=1e-8, decoupled_weight_decay=True),
            dict(lr=0.02, weight_decay=0.0, eps=1e-8, decoupled_weight_decay=True),
        ],
        dict(
            lr=0.01,
            betas=(0.85, 0.95),
            learn="lr",
            height=2,
            hyper_optimizer=("adam", "adam"),
            hyper_lr=(0.02, 0.02),
            hyper_betas=(0.8, 0.95),
            hyper_eps=1e-12,
            lr_parametrization="log",
        ),
        _read_hyper,
        min_growth=None,
    ),
    "hyper_adagrad": Case(
        _quadratic,
        [
            dict(lr=0.1, weight_decay=0.05, eps=1e-10, initial_accumulator_value=0.1),
            dict(lr=0.05, weight_decay=0.0, eps=1e-10, initial_accumulator_value=0.1),
        ],
        dict(
            lr=0.1,
            learn="lr",
            height=2,
            hyper_optimizer=("sgd", "adam"),
            hyper_lr=(3e-3, 0.02),
            lr_parametrization="identity",
        ),
        _read_hyper,
        min_growth=None,
    ),
    "hyper_rmsprop": Case(
        _quadratic,
        [
            dict(lr=0.01, weight_decay=0.05, eps=1e-8),
            dict(lr=0.01, weight_decay=0.0, eps=1e-8),
        ],
        dict(
            lr=0.01,
            decay=0.9,
            learn="lr+decay",
            height=2,
            hyper_optimizer=("adam", "sgd"),
            hyper_lr=(0.01, 1e-3),
            lr_parametrization="square",
        ),
        _read_hyper,
        min_growth=None,
    ),
}


def _paths(name: str) -> list[str]:
    """The forms the test runs for ``name``: those of loop, foreach and native the optimizer has
    (its registry entry's ``implementations``), and auto. ``"compiled"`` (torch.compile, seconds
    per kernel) is held to the loop in each family's own tests."""
    offered = get_optimizer_spec(name).implementations
    return [p for p in ("loop", "foreach", "native") if p in offered] + ["auto"]


PAIRS = [(n, p) for n in available_optimizers(aliases=False) for p in _paths(n)]


def _run_optimizer(name: str, case: Case, problem: Any, impl: str) -> tuple[list, list]:
    """The registered class on ``problem`` at fp64: the parameters after ``case.steps`` steps
    and ``case.read`` after every step."""
    cls = get_optimizer_spec(name).cls
    params = [
        [
            torch.nn.Parameter(torch.tensor(v, dtype=F64).reshape(s))
            for v, s in zip(g, shp, strict=True)
        ]
        for g, shp in zip(problem.init, problem.shapes, strict=True)
    ]
    groups = [{"params": ps, **hp} for ps, hp in zip(params, case.groups, strict=True)]
    opt = cls(groups, implementation=impl, **case.model_wide)
    trace = []
    for t in range(case.steps):
        x = [[p.detach().flatten().tolist() for p in ps] for ps in params]
        grads = problem.gradient(t, x)
        for ps, gs in zip(params, grads, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = None if g is None else torch.tensor(g, dtype=F64).reshape(p.shape)
        opt.step()
        trace.append(case.read(opt, params, grads))
    return [[p.detach().flatten().tolist() for p in ps] for ps in params], trace


def _rel_error(ours: list, ref: list) -> float:
    """max over tensors of ``max_e |ours_e - ref_e| / max_e |ref_e|`` (the error relative to the
    tensor's scale; a tensor that is all zero in the reference is compared absolutely)."""
    worst = 0.0
    for og, rg in zip(ours, ref, strict=True):
        for o, r in zip(og, rg, strict=True):
            scale = max((abs(v) for v in r), default=0.0) or 1.0
            worst = max(worst, max(abs(a - b) for a, b in zip(o, r, strict=True)) / scale)
    return worst


def _trace_error(ours: list, ref: list) -> float:
    worst = 0.0
    for t, (o, r) in enumerate(zip(ours, ref, strict=True)):
        if r is None:
            assert o is None
            continue
        if isinstance(r, dict):
            assert o.keys() == r.keys(), f"step {t}: {sorted(o)} vs {sorted(r)}"
            pairs = [(o[k], r[k]) for k in r]
        else:
            pairs = [(o, r)]
        worst = max([worst] + [abs(a - b) / abs(b) for a, b in pairs])
    return worst


def _scalars(trace: list) -> list[float]:
    return [v for entry in trace for v in (entry.values() if isinstance(entry, dict) else [entry])]


@pytest.fixture
def library_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the entries into the C library (every kernel wrapper of ``_native`` fetches it with
    ``_native.loader._library()``)."""
    calls: list[int] = []
    real = _native.loader._library

    def counted() -> Any:
        calls.append(1)
        return real()

    monkeypatch.setattr(_native.loader, "_library", counted)
    return calls


@pytest.mark.parametrize(("name", "impl"), PAIRS)
def test_every_optimizer_agrees_with_its_reference(name: str, impl: str, library_calls) -> None:
    assert name in BY_NAME, (
        f"{name!r} has no per-element reference: add one to hf_tuningfree/optim/reference/ and "
        "to its BY_NAME"
    )
    assert name in CASES, f"{name!r} has no configuration in tests/test_references.py CASES"
    case = CASES[name]
    problem = case.problem()
    expected, expected_trace = BY_NAME[name](
        problem.init, problem.gradient, case.steps, case.groups, **case.model_wide
    )
    params, trace = _run_optimizer(name, case, problem, impl)
    err_x, err_trace = _rel_error(params, expected), _trace_error(trace, expected_trace)
    c_calls = len(library_calls)
    print(f"{name} {impl}: params {err_x:.1e}, trace {err_trace:.1e}, C calls {c_calls}")
    assert err_x <= case.tol, f"{name} {impl}: parameters differ by {err_x:.2e} relative"
    assert err_trace <= case.tol, f"{name} {impl}: adapted scalar differs by {err_trace:.2e}"
    # the case exercises the optimizer: the weights moved, the adapted scalar moved
    assert _rel_error(params, problem.init) > case.min_move
    if case.min_growth is not None:
        values = _scalars(expected_trace)
        assert max(values) >= case.min_growth * min(values), f"{name}: the estimate barely moved"
    if impl in ("auto", "native") and case.has_c and _native.load() is not None:
        assert c_calls > 0, f"{name}: {impl!r} on CPU did not run the C kernels"
    elif impl not in ("auto", "native"):
        assert c_calls == 0, f"{name}: {impl!r} entered the C library"


HYPER_NAMES = ("hyper_sgd", "hyper_adam", "hyper_adagrad", "hyper_rmsprop")
PER_TENSOR_PAIRS = [(n, p) for n in HYPER_NAMES for p in _paths(n)]


def _read_per_tensor(opt: Any, params: Any, grads: Any) -> dict:
    gs = opt.global_state
    height = opt.height
    out = {f"level{j}/lr": gs[f"hyper/level{j}/lr"].tolist() for j in range(height)}
    out[f"level{height}/lr"] = float(gs[f"hyper/level{height}/lr"])
    return out


@pytest.mark.parametrize(("name", "impl"), PER_TENSOR_PAIRS)
def test_per_tensor_step_sizes_agree_with_the_reference(
    name: str, impl: str, library_calls
) -> None:
    """``per_tensor=True``: every tensor's own tower (every level below the fixed top learned
    per tensor, each tensor's hypergradient its own dot) against the reference's
    ``per_tensor`` tower (one autograd tower per tensor), at fp64, on the case of ``name`` with
    the step size alone learned: the two groups start at their own lr, a tensor misses its
    gradient every third step, weight decay in one group."""
    base = CASES[name]
    model_wide = {**base.model_wide, "learn": "lr", "per_tensor": True}
    case = Case(base.problem, base.groups, model_wide, _read_per_tensor, min_growth=None)
    problem = case.problem()
    expected, expected_trace = BY_NAME[name](
        problem.init, problem.gradient, case.steps, case.groups, **model_wide
    )
    params, trace = _run_optimizer(name, case, problem, impl)
    err_x = _rel_error(params, expected)
    err_trace = max(
        abs(a - b) / abs(b)
        for o, r in zip(trace, expected_trace, strict=True)
        for key in r
        for a, b in zip(
            o[key] if isinstance(o[key], list) else [o[key]],
            r[key] if isinstance(r[key], list) else [r[key]],
            strict=True,
        )
    )
    print(f"{name} {impl} per_tensor: params {err_x:.1e}, step sizes {err_trace:.1e}")
    assert err_x <= case.tol and err_trace <= case.tol
    if impl in ("auto", "native") and _native.load() is not None:  # one step size per tensor
        assert library_calls, f"{name}: {impl!r} on CPU did not run the C kernels"
    elif impl not in ("auto", "native"):
        assert not library_calls, f"{name}: {impl!r} entered the C library"
    # the tensors learned different step sizes (else the test could not tell per tensor apart)
    last = expected_trace[-1]["level0/lr"]
    assert len(last) == 5 and max(last) > 1.05 * min(last)


def test_every_reference_is_a_registered_name() -> None:
    assert set(BY_NAME) == set(available_optimizers(aliases=False)) and set(CASES) == set(BY_NAME)


REFERENCE_DIR = Path(__file__).resolve().parents[1] / "hf_tuningfree" / "optim" / "reference"
ALLOWED_IMPORTS = {"__future__", "collections", "dataclasses", "math", "torch", "typing"}


@pytest.mark.parametrize("path", sorted(REFERENCE_DIR.glob("*.py")), ids=lambda p: p.name)
def test_references_share_nothing_with_the_implementation(path: Path) -> None:
    """A reference imports the standard library's maths, torch and its own package only."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    seen = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            seen += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            seen.append("." * node.level + (node.module or ""))
    foreign = [m for m in seen if not m.startswith(".") and m.split(".")[0] not in ALLOWED_IMPORTS]
    assert not foreign, f"{path.name} imports {foreign}"
    assert seen, "the check read no import at all"
