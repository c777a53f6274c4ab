"""Optimizer step-time benchmark: ratios to fused AdamW measured in the same run.

A transformer-shaped parameter set (~25M parameters in ~150 tensors), random gradients, and every
contender's ``step()`` timed individually; contenders are interleaved over rounds so that machine
noise hits all of them alike, and the median step time is reported as a ratio to
``torch.optim.AdamW(fused=True)`` (the bar users compare against) and, where the authors publish
an implementation, to theirs.

    python benchmarks/step_time.py                      # everything in the registry + baselines
    python benchmarks/step_time.py --only adopt,dog     # a subset
    python benchmarks/step_time.py --impls native       # only one of our code paths
    python benchmarks/step_time.py --only dog,ldog --weight-decay 0.01 --p10
    python benchmarks/step_time.py --only hyper_sgd,hyper_adam --impls auto,native \
        --extra-contenders --threads 1 --cpu-time       # hypergradient variants, on a busy machine

The authors' packages are optional (``pip install -c constraints.txt -e ".[bench]"``); missing
ones are listed and skipped. First-step time (which includes compilation for the compiled paths) is
reported separately from the steady state.

On a machine shared with other jobs the wall clock mostly measures the wait for a core:
``--cpu-time`` times CPU time instead (of this thread with ``--threads 1``, of the process
otherwise; with 2 threads also set ``OMP_WAIT_POLICY=PASSIVE`` so that waiting threads do not
spin), which in a one-thread run still measures the work (memory-bandwidth contention remains), and
``--p10`` adds the 10th percentile of the step times, the better estimate of the uncontended time.
``--weight-decay`` passes a weight decay to our optimizers and the authors' (the baselines keep
theirs). ``--extra-contenders`` adds torch's SGD with momentum on its foreach (default) and
for-loop paths and the configurations in :data:`VARIANTS` (for the hypergradient optimizers: our
plain SGD/Adam through the same base with ``height=0``, other tower heights, learned momentum and
betas), each for every ``--impls`` the optimizer has (its registry entry's ``implementations``).
Goals on CPU for the hypergradient optimizers: ``hyper_sgd`` <= 1.3x SGD with momentum,
``hyper_adam`` <= 1.8x fused AdamW.

glibc hands freed memory back to the OS eagerly, so foreach temporaries page-fault on every step
and timings swing several-fold; the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set high unless they are already set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
if __name__ == "__main__" and any(k not in os.environ for k in _MALLOC):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC})

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_tuningfree.optim import (  # noqa: E402
    available_optimizers,
    create_optimizer,
    get_optimizer_spec,
)

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def transformer_shapes(
    layers: int = 12, hidden: int = 384, vocab: int = 8192
) -> list[tuple[int, ...]]:
    """Embedding + ``layers`` blocks of (qkv, proj, fc1, fc2 weights and biases, two norms) + a
    final norm: 24.4M parameters in 147 tensors with the defaults."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,)]  # ln1
        shapes += [(hidden, 3 * hidden), (3 * hidden,)]  # qkv
        shapes += [(hidden, hidden), (hidden,)]  # proj
        shapes += [(hidden,), (hidden,)]  # ln2
        shapes += [(hidden, 4 * hidden), (4 * hidden,)]  # fc1
        shapes += [(4 * hidden, hidden), (hidden,)]  # fc2
    shapes += [(hidden,), (hidden,)]
    return shapes


# --------------------------------------------------------------------------- contenders
#: ``--extra-contenders``: configurations of ours beyond the registry defaults, by registry name.
VARIANTS: dict[str, dict[str, dict]] = {
    "hyper_sgd": {
        "height 0 (plain SGD)": {"height": 0},
        "height 1": {"height": 1},
        "height 3": {"height": 3, "hyper_lr": 0.01},
        "lr+momentum": {"learn": "lr+momentum"},
    },
    "hyper_adam": {
        "height 0 (plain Adam)": {"height": 0},
        "one step size for the model": {"per_tensor": False},
        "height 3": {"height": 3, "hyper_lr": 0.01, "per_tensor": False},
        "lr+betas": {"learn": "lr+beta1+beta2", "per_tensor": False},
    },
}


def _authors(**kw) -> dict[str, tuple[str, Factory]]:
    """The authors' own implementations, keyed by our registry name; absent packages skipped.
    ``kw`` (a weight decay) goes to every one of them."""
    out: dict[str, tuple[str, Factory]] = {}
    try:
        from adopt import ADOPT as AuthorsADOPT

        out["adopt"] = ("torch-adopt (authors)", lambda p: AuthorsADOPT(p, lr=1e-3, **kw))
    except ImportError:
        pass
    try:  # D-Adaptation, Facebook Research's package; settings as our defaults where they differ
        import dadaptation

        out["dadapt_sgd"] = (
            "dadaptation DAdaptSGD (authors)",
            lambda p: dadaptation.DAdaptSGD(p, **kw),
        )
        out["dadapt_adam"] = (
            "dadaptation DAdaptAdam (authors)",
            lambda p: dadaptation.DAdaptAdam(p, decouple=True, use_bias_correction=True, **kw),
        )
        out["dadapt_adagrad"] = (
            "dadaptation DAdaptAdaGrad (authors)",
            lambda p: dadaptation.DAdaptAdaGrad(p, **kw),
        )
    except ImportError:
        pass
    try:
        from prodigyopt import Prodigy as AuthorsProdigy

        out["prodigy"] = (
            "prodigyopt Prodigy (authors)",
            lambda p: AuthorsProdigy(p, use_bias_correction=True, **kw),
        )
    except ImportError:
        pass
    try:
        from dog import DoG as AuthorsDoG
        from dog import LDoG as AuthorsLDoG

        out["dog"] = ("dog-optimizer DoG (authors)", lambda p: AuthorsDoG(p, **kw))
        out["ldog"] = ("dog-optimizer LDoG (authors)", lambda p: AuthorsLDoG(p, **kw))
    except ImportError:
        pass
    return out


def _baselines(extra: bool = False) -> dict[str, Factory]:
    out: dict[str, Factory] = {
        "AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
        "AdamW for-loop": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False),
        "SGD momentum (fastest path)": lambda p: torch.optim.SGD(
            p, lr=1e-2, momentum=0.9, fused=True
        ),
    }
    if extra:
        out["SGD momentum foreach (torch default)"] = lambda p: torch.optim.SGD(
            p, lr=1e-2, momentum=0.9, foreach=True
        )
        out["SGD momentum for-loop"] = lambda p: torch.optim.SGD(
            p, lr=1e-2, momentum=0.9, foreach=False
        )
    return out


@dataclass
class Contender:
    label: str
    factory: Factory
    ours: str | None = None  # registry name if it is ours
    impl: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    first_step: float = 0.0
    times: list[float] = field(default_factory=list)


def _ours(name: str, impl: str, **kw) -> Factory:
    return lambda p: create_optimizer(name, p, implementation=impl, **kw)


def build_contenders(
    names: list[str],
    impls: list[str],
    weight_decay: float | None = None,
    extra: bool = False,
) -> list[Contender]:
    """Baselines, then for each registry name ours on every ``impls`` path (with ``extra``, its
    :data:`VARIANTS` too) and the authors' implementation where there is one."""
    contenders = [Contender(label, f) for label, f in _baselines(extra).items()]
    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    authors = _authors(**wd)
    for name in names:
        offered = ("auto", *get_optimizer_spec(name).implementations)
        name_impls = [i for i in impls if i in offered]  # the forms this optimizer has
        for impl in name_impls:
            contenders.append(
                Contender(f"{name} [{impl}]", _ours(name, impl, **wd), ours=name, impl=impl)
            )
        variants = VARIANTS.get(name, {}) if extra else {}
        for variant, kw in variants.items():
            for impl in name_impls:
                label = f"{name} {variant} [{impl}]"
                contenders.append(Contender(label, _ours(name, impl, **wd, **kw), impl=impl))
        if name in authors:
            label, factory = authors[name]
            contenders.append(Contender(label, factory))
    return contenders


# --------------------------------------------------------------------------- timing
def _clock(args: argparse.Namespace) -> Callable[[], float]:
    """Wall time, or with ``--cpu-time`` the CPU time of this thread (one thread) or process."""
    if not args.cpu_time:
        return time.perf_counter
    return time.thread_time if args.threads == 1 else time.process_time


def run(args: argparse.Namespace) -> list[Contender]:
    clock = _clock(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = transformer_shapes(args.layers, args.hidden, args.vocab)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    master = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    names = args.only.split(",") if args.only else available_optimizers()
    contenders = build_contenders(
        names, args.impls.split(","), args.weight_decay, args.extra_contenders
    )
    numel = sum(p.numel() for p in params)
    options = ", CPU time" if args.cpu_time else ""
    if args.weight_decay is not None:
        options += f", weight_decay {args.weight_decay}"
    print(
        f"{numel / 1e6:.1f}M parameters in {len(params)} tensors, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps{options}, torch {torch.__version__}",
        flush=True,
    )
    for c in contenders:
        c.optimizer = c.factory(params)
        start = time.perf_counter()
        c.optimizer.step()
        c.first_step = time.perf_counter() - start
        for _ in range(args.warmup):
            c.optimizer.step()
    for r in range(args.rounds):
        for c in contenders:
            with torch.no_grad():  # same starting values each round
                torch._foreach_copy_(params, master)
            for _ in range(args.steps):
                start = clock()
                c.optimizer.step()
                c.times.append(clock() - start)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return contenders


def _p10(times: list[float]) -> float:
    return sorted(times)[len(times) // 10]


def report(contenders: list[Contender], p10: bool = False) -> str:
    """The markdown table; ``p10`` adds the 10th percentile of the step times and its ratio."""
    med = {c.label: statistics.median(c.times) for c in contenders}
    low = {c.label: _p10(c.times) for c in contenders}
    base, base_low = med["AdamW fused"], low["AdamW fused"]
    sgd = med["SGD momentum (fastest path)"]
    authors = {name: label for name, (label, _) in _authors().items()}
    head = "| optimizer | median step (ms) | x fused AdamW | x SGD momentum | vs authors' code | "
    head += "p10 step (ms) | p10 x fused AdamW | " if p10 else ""
    lines = [head + "first step (ms) |", "|---" * (8 if p10 else 6) + "|"]
    for c in contenders:
        vs_auth = ""
        if c.ours and c.ours in authors and authors[c.ours] in med:
            vs_auth = f"{med[authors[c.ours]] / med[c.label]:.2f}x faster"
        row = (
            f"| {c.label} | {med[c.label] * 1e3:.1f} | {med[c.label] / base:.2f} | "
            f"{med[c.label] / sgd:.2f} | {vs_auth} | "
        )
        if p10:
            row += f"{low[c.label] * 1e3:.1f} | {low[c.label] / base_low:.2f} | "
        lines.append(row + f"{c.first_step * 1e3:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated registry names")
    parser.add_argument("--impls", default="loop,foreach,native,compiled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time CPU time (of this thread with --threads 1, else of the process) instead of "
        "wall time: robust on a machine shared with other jobs",
    )
    parser.add_argument(
        "--p10", action="store_true", help="also report the 10th percentile of the step times"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="weight decay for our optimizers and the authors' (default: each one's own)",
    )
    parser.add_argument(
        "--extra-contenders",
        action="store_true",
        help="add torch SGD momentum foreach/for-loop and the VARIANTS of the selected names",
    )
    args = parser.parse_args(argv)
    contenders = run(args)
    print(report(contenders, p10=args.p10))
    missing = {
        "adopt": "torch-adopt",
        "dadapt_adam": "dadaptation",
        "prodigy": "prodigyopt",
        "dog": "dog-optimizer",
    }
    absent = [pkg for name, pkg in missing.items() if name not in _authors()]
    if absent:
        print(f"\n(authors' packages not installed, skipped: {', '.join(absent)})")


if __name__ == "__main__":
    main()
