"""Optimizer step-time benchmark: ratios to fused AdamW measured in the same run.

A transformer-shaped parameter set (~25M parameters in ~150 tensors), random gradients, and every
contender's ``step()`` timed individually; contenders are interleaved over rounds so that machine
noise hits all of them alike, and the median step time is reported as a ratio to
``torch.optim.AdamW(fused=True)`` (the bar users compare against) and, where the authors publish
an implementation, to theirs.

    python benchmarks/step_time.py                      # everything in the registry + baselines
    python benchmarks/step_time.py --only adopt,dog     # a subset
    python benchmarks/step_time.py --impls compiled     # only one of our code paths

The authors' packages are optional (``pip install -c constraints.txt -e ".[bench]"``); missing
ones are listed and skipped. First-step time (which includes compilation for the compiled paths) is
reported separately from the steady state.

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
from hf_tuningfree.optim import available_optimizers, create_optimizer  # noqa: E402

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
def _authors() -> dict[str, tuple[str, Factory]]:
    """The authors' own implementations, keyed by our registry name; absent packages skipped."""
    out: dict[str, tuple[str, Factory]] = {}
    try:
        from adopt import ADOPT as AuthorsADOPT

        out["adopt"] = ("torch-adopt (authors)", lambda p: AuthorsADOPT(p, lr=1e-3))
    except ImportError:
        pass
    try:  # D-Adaptation, Facebook Research's package; settings as our defaults where they differ
        import dadaptation

        out["dadapt_sgd"] = ("dadaptation DAdaptSGD (authors)", dadaptation.DAdaptSGD)
        out["dadapt_adam"] = (
            "dadaptation DAdaptAdam (authors)",
            lambda p: dadaptation.DAdaptAdam(p, decouple=True, use_bias_correction=True),
        )
        out["dadapt_adagrad"] = ("dadaptation DAdaptAdaGrad (authors)", dadaptation.DAdaptAdaGrad)
    except ImportError:
        pass
    try:
        from prodigyopt import Prodigy as AuthorsProdigy

        out["prodigy"] = (
            "prodigyopt Prodigy (authors)",
            lambda p: AuthorsProdigy(p, use_bias_correction=True),
        )
    except ImportError:
        pass
    try:
        from dog import DoG as AuthorsDoG
        from dog import LDoG as AuthorsLDoG

        out["dog"] = ("dog-optimizer DoG (authors)", lambda p: AuthorsDoG(p))
        out["ldog"] = ("dog-optimizer LDoG (authors)", lambda p: AuthorsLDoG(p))
    except ImportError:
        pass
    return out


def _baselines() -> dict[str, Factory]:
    return {
        "AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
        "AdamW for-loop": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False),
        "SGD momentum (fastest path)": lambda p: torch.optim.SGD(
            p, lr=1e-2, momentum=0.9, fused=True
        ),
    }


@dataclass
class Contender:
    label: str
    factory: Factory
    ours: str | None = None  # registry name if it is ours
    impl: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    first_step: float = 0.0
    times: list[float] = field(default_factory=list)


def build_contenders(names: list[str], impls: list[str]) -> list[Contender]:
    contenders = [Contender(label, f) for label, f in _baselines().items()]
    authors = _authors()
    for name in names:
        for impl in impls:
            contenders.append(
                Contender(
                    f"{name} [{impl}]",
                    lambda p, n=name, i=impl: create_optimizer(n, p, implementation=i),
                    ours=name,
                    impl=impl,
                )
            )
        if name in authors:
            label, factory = authors[name]
            contenders.append(Contender(label, factory))
    return contenders


# --------------------------------------------------------------------------- timing
def run(args: argparse.Namespace) -> list[Contender]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = transformer_shapes(args.layers, args.hidden, args.vocab)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    master = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    names = args.only.split(",") if args.only else available_optimizers()
    contenders = build_contenders(names, args.impls.split(","))
    numel = sum(p.numel() for p in params)
    print(
        f"{numel / 1e6:.1f}M parameters in {len(params)} tensors, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps, torch {torch.__version__}",
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
                start = time.perf_counter()
                c.optimizer.step()
                c.times.append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return contenders


def report(contenders: list[Contender]) -> str:
    med = {c.label: statistics.median(c.times) for c in contenders}
    base = med["AdamW fused"]
    sgd = med["SGD momentum (fastest path)"]
    authors = {name: label for name, (label, _) in _authors().items()}
    lines = [
        "| optimizer | median step (ms) | x fused AdamW | x SGD momentum | vs authors' code | "
        "first step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for c in contenders:
        vs_auth = ""
        if c.ours and c.ours in authors and authors[c.ours] in med:
            vs_auth = f"{med[authors[c.ours]] / med[c.label]:.2f}x faster"
        lines.append(
            f"| {c.label} | {med[c.label] * 1e3:.1f} | {med[c.label] / base:.2f} | "
            f"{med[c.label] / sgd:.2f} | {vs_auth} | {c.first_step * 1e3:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated registry names")
    parser.add_argument("--impls", default="loop,foreach,compiled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args(argv)
    contenders = run(args)
    print(report(contenders))
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
