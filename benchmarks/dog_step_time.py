"""Step time of DoG / L-DoG against fused AdamW and the authors' ``dog-optimizer``, same run.

The parameter set, interleaving and reporting follow ``benchmarks/step_time.py`` (the registry-wide
benchmark): a transformer-shaped set of ~25M parameters in ~150 tensors, random gradients, each
contender's ``step()`` timed individually over interleaved rounds, medians reported as ratios to
``torch.optim.AdamW(fused=True)``. The authors' package is optional
(``pip install dog-optimizer``, part of the ``bench`` extra); without it their rows are skipped.

    python benchmarks/dog_step_time.py
    python benchmarks/dog_step_time.py --impls compiled --weight-decay 0.01
    python benchmarks/dog_step_time.py --threads 1 --cpu-time     # on a busy machine

The table gives the median and the 10th percentile of the step times; on a machine shared with
other jobs the 10th percentile is the better estimate of the uncontended time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
if __name__ == "__main__" and any(k not in os.environ for k in _MALLOC):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC})

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_tuningfree.optim import create_optimizer  # noqa: E402

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def transformer_shapes(
    layers: int = 12, hidden: int = 384, vocab: int = 8192
) -> list[tuple[int, ...]]:
    """24.4M parameters in 147 tensors with the defaults (as benchmarks/step_time.py)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (hidden, 3 * hidden), (3 * hidden,)]
        shapes += [(hidden, hidden), (hidden,), (hidden,), (hidden,)]
        shapes += [(hidden, 4 * hidden), (4 * hidden,), (4 * hidden, hidden), (hidden,)]
    shapes += [(hidden,), (hidden,)]
    return shapes


def contenders(impls: list[str], wd: float) -> dict[str, Factory]:
    out: dict[str, Factory] = {"AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)}
    for name in ("dog", "ldog"):
        for impl in impls:
            out[f"{name} [{impl}]"] = lambda p, n=name, i=impl: create_optimizer(
                n, p, implementation=i, weight_decay=wd
            )
    try:
        from dog import DoG as AuthorsDoG
        from dog import LDoG as AuthorsLDoG

        out["dog-optimizer DoG (authors)"] = lambda p: AuthorsDoG(p, weight_decay=wd)
        out["dog-optimizer LDoG (authors)"] = lambda p: AuthorsLDoG(p, weight_decay=wd)
    except ImportError:
        print("(dog-optimizer not installed: the authors' rows are skipped)")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default="loop,foreach,compiled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time CPU time instead of wall time: robust on a machine shared with other jobs "
        "(with --threads 2 also set OMP_WAIT_POLICY=PASSIVE so that waiting threads do not spin)",
    )
    args = parser.parse_args(argv)
    clock = time.perf_counter
    if args.cpu_time:  # CPU time of this thread (1 thread) or of the process (all threads)
        clock = time.thread_time if args.threads == 1 else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in transformer_shapes()]
    master = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    print(
        f"{numel / 1e6:.1f}M parameters in {len(params)} tensors, {args.threads} threads, "
        f"weight_decay {args.weight_decay}, torch {torch.__version__}",
        flush=True,
    )
    opts: dict[str, torch.optim.Optimizer] = {}
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    for label, make in contenders(args.impls.split(","), args.weight_decay).items():
        opts[label] = make(params)
        start = time.perf_counter()
        opts[label].step()
        first[label] = time.perf_counter() - start
        for _ in range(args.warmup):
            opts[label].step()
        times[label] = []
    for r in range(args.rounds):
        for label, opt in opts.items():
            with torch.no_grad():
                torch._foreach_copy_(params, master)
            for _ in range(args.steps):
                start = clock()
                opt.step()
                times[label].append(clock() - start)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: sorted(v)[len(v) // 10] for k, v in times.items()}  # 10th percentile
    base, base_low = med["AdamW fused"], low["AdamW fused"]
    authors = {"dog": "dog-optimizer DoG (authors)", "ldog": "dog-optimizer LDoG (authors)"}
    print(
        "| optimizer | median step (ms) | x fused AdamW | vs authors' code | "
        "p10 step (ms) | p10 x fused AdamW | first step (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, m in med.items():
        ref = authors.get(label.split(" ")[0])
        vs = f"{med[ref] / m:.2f}x faster" if ref in med else ""
        print(
            f"| {label} | {m * 1e3:.1f} | {m / base:.2f} | {vs} | {low[label] * 1e3:.1f} | "
            f"{low[label] / base_low:.2f} | {first[label] * 1e3:.0f} |"
        )


if __name__ == "__main__":
    main()
