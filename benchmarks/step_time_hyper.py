"""Step time of the hypergradient optimizers against the torch kernels they are measured by.

Same parameter set as ``benchmarks/step_time.py`` (a transformer shape: ~24.4M parameters in 147
tensors), random gradients, every contender's ``step()`` timed individually and the contenders
interleaved over rounds so that machine noise hits all of them alike. Reported: the median step
time as a ratio to ``torch.optim.AdamW(fused=True)`` and to torch's SGD with momentum on its
fastest CPU path (``fused=True``; the default foreach path is listed too), measured in the same run.
Goals on CPU: ``hyper_sgd`` <= 1.3x SGD with momentum, ``hyper_adam`` <= 1.8x fused AdamW.

    python benchmarks/step_time_hyper.py                 # everything below
    python benchmarks/step_time_hyper.py --quick          # only the default configurations
    python benchmarks/step_time_hyper.py --clock cpu --threads 1   # on a busy machine

``--clock cpu`` times with ``time.process_time()`` (CPU time of this process) instead of the wall
clock: on a machine shared with other jobs the wall clock mostly measures the wait for a core,
while the CPU time of a one-thread run still measures the work (memory-bandwidth contention
remains).

The registry-wide ``benchmarks/step_time.py`` times these optimizers too (by registry name and
implementation); this script adds the tower heights, the learned-beta variants and the SGD
baselines the goals refer to.

glibc hands freed memory back to the OS eagerly, so temporaries page-fault on every step and
timings swing several-fold; the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set high unless they are already set.
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
    """Embedding + ``layers`` blocks (qkv, proj, fc1, fc2 weights and biases, two norms) + a
    final norm: 24.4M parameters in 147 tensors with the defaults (as benchmarks/step_time.py)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (hidden, 3 * hidden), (3 * hidden,)]
        shapes += [(hidden, hidden), (hidden,), (hidden,), (hidden,)]
        shapes += [(hidden, 4 * hidden), (4 * hidden,), (4 * hidden, hidden), (hidden,)]
    shapes += [(hidden,), (hidden,)]
    return shapes


def contenders(quick: bool) -> dict[str, Factory]:
    def ours(name: str, **kw) -> Factory:
        return lambda p: create_optimizer(name, p, **kw)

    out: dict[str, Factory] = {
        "AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "SGD momentum fused": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
        "SGD momentum foreach (torch default)": lambda p: torch.optim.SGD(
            p, lr=1e-2, momentum=0.9, foreach=True
        ),
        "hyper_sgd (default: height 2, auto)": ours("hyper_sgd"),
        "hyper_adam (default: height 2, auto)": ours("hyper_adam"),
    }
    if quick:
        return out
    out.update(
        {
            "SGD momentum for-loop": lambda p: torch.optim.SGD(
                p, lr=1e-2, momentum=0.9, foreach=False
            ),
            "AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
            "hyper_sgd height 0 (plain, auto)": ours("hyper_sgd", height=0),
            "hyper_sgd height 1": ours("hyper_sgd", height=1),
            "hyper_sgd height 3": ours("hyper_sgd", height=3, hyper_lr=0.01),
            "hyper_sgd [loop]": ours("hyper_sgd", implementation="loop"),
            "hyper_sgd [compiled]": ours("hyper_sgd", implementation="compiled"),
            "hyper_sgd lr+momentum [compiled]": ours(
                "hyper_sgd", learn="lr+momentum", implementation="compiled"
            ),
            "hyper_adam height 0 (plain, auto)": ours("hyper_adam", height=0),
            "hyper_adam height 3": ours("hyper_adam", height=3, hyper_lr=0.01),
            "hyper_adam [loop]": ours("hyper_adam", implementation="loop"),
            "hyper_adam [compiled]": ours("hyper_adam", implementation="compiled"),
            "hyper_adam lr+betas [compiled]": ours(
                "hyper_adam", learn="lr+beta1+beta2", implementation="compiled"
            ),
            "hyper_adagrad [compiled]": ours("hyper_adagrad", implementation="compiled"),
            "hyper_rmsprop [compiled]": ours("hyper_rmsprop", implementation="compiled"),
        }
    )
    return out


def run(args: argparse.Namespace) -> dict[str, tuple[list[float], float]]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in transformer_shapes()]
    master = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    print(
        f"{numel / 1e6:.1f}M parameters in {len(params)} tensors, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps, {args.clock} clock, "
        f"torch {torch.__version__}",
        flush=True,
    )
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    built = {}
    for label, factory in contenders(args.quick).items():
        opt = factory(params)
        start = time.perf_counter()
        opt.step()  # includes compilation for the compiled paths
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            opt.step()
        built[label] = (opt, [], first)
    for r in range(args.rounds):
        for _, (opt, times, _) in built.items():
            with torch.no_grad():
                torch._foreach_copy_(params, master)
            for _ in range(args.steps):
                start = clock()
                opt.step()
                times.append(clock() - start)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return {label: (times, first) for label, (_, times, first) in built.items()}


def report(results: dict[str, tuple[list[float], float]]) -> str:
    med = {k: statistics.median(t) for k, (t, _) in results.items()}
    adamw, sgd = med["AdamW fused"], med["SGD momentum fused"]
    lines = [
        "| optimizer | median step (ms) | x fused AdamW | x fused SGD momentum | first step (ms) |",
        "|---|---|---|---|---|",
    ]
    for k, (_, first) in results.items():
        lines.append(
            f"| {k} | {med[k] * 1e3:.1f} | {med[k] / adamw:.2f} | {med[k] / sgd:.2f} | "
            f"{first * 1e3:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the default configurations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    print(report(run(args)))


if __name__ == "__main__":
    main()
