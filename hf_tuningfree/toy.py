"""The ADOPT paper's toy counterexample, as a reproducible experiment.

An online convex problem in the style of Reddi, Kale & Kumar ("On the Convergence of Adam and
Beyond", ICLR 2018), used by Taniguchi et al. (ADOPT, NeurIPS 2024, Section 5.1): at each step

    f_t(x) = k^2 * x   with probability 1/k,   else  -k * x,        x projected to [-1, 1].

The expected gradient is ``k^2/k - k(1 - 1/k) = +1``, so the minimiser is ``x = -1``. Adam's second
moment includes the rare large gradient ``k^2`` in the very step it normalises, which shrinks that
step; the many small ``-k`` steps win and Adam drifts to a wrong point with ``x > 0``. ADOPT
normalises by the previous second moment, so the rare step keeps its full weight and x moves
toward -1. Clipped ADOPT (the authors' default) clips the normalised gradient to ``t**0.25``: early
on the rare large gradient is clipped hard, so it is slower on this problem; the clip bound grows
with t and the guarantee is kept.

Every seed is one coordinate of a single parameter vector: the optimizers are elementwise, so one
``step()`` advances all seeds in parallel.

Run: ``python -m hf_tuningfree.toy`` (the main job until the optimizer comparison exists).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .argtypes import positive_int
from .optim import ADOPT


@dataclass(frozen=True)
class ToyResult:
    name: str
    mean_x: float
    frac_negative: float
    trajectory: list[tuple[int, float]]
    seconds: float


def toy_optimizers(beta1: float = 0.9, beta2: float = 0.999) -> dict[str, Callable]:
    """The compared optimizers, each a factory ``params -> Optimizer``."""
    return {
        "Adam": lambda p: torch.optim.Adam(p, lr=0.01, betas=(beta1, beta2)),
        "ADOPT (unclipped)": lambda p: ADOPT(p, lr=0.01, betas=(beta1, beta2), clip_exponent=None),
        "ADOPT (clipped t^0.25)": lambda p: ADOPT(p, lr=0.01, betas=(beta1, beta2)),
    }


def run_counterexample(
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    steps: int,
    seeds: int = 256,
    k: float = 50.0,
    base_lr: float = 0.01,
    seed: int = 0,
    record_every: int | None = None,
) -> tuple[torch.Tensor, list[tuple[int, float]]]:
    """Run one optimizer on ``seeds`` independent copies; returns the final x per copy and the
    trajectory of the mean. Step size ``base_lr / sqrt(1 + 0.01 t)``, as in the paper."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.Parameter(torch.zeros(seeds, dtype=torch.float64))
    opt = make_optimizer([x])
    big = torch.tensor(k * k, dtype=torch.float64)
    small = torch.tensor(-k, dtype=torch.float64)
    every = record_every or max(1, steps // 10)
    trajectory: list[tuple[int, float]] = []
    for t in range(steps):
        draw = torch.rand(seeds, generator=gen, dtype=torch.float64)
        x.grad = torch.where(draw < 1.0 / k, big, small)
        for group in opt.param_groups:
            group["lr"] = base_lr / math.sqrt(1.0 + 0.01 * t)
        opt.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)
        if (t + 1) % every == 0:
            trajectory.append((t + 1, x.mean().item()))
    return x.detach().clone(), trajectory


def run_all(
    steps: int = 50_000, seeds: int = 256, k: float = 50.0, beta2: float = 0.999
) -> list[ToyResult]:
    results = []
    for name, make in toy_optimizers(beta2=beta2).items():
        start = time.perf_counter()
        final, traj = run_counterexample(make, steps=steps, seeds=seeds, k=k)
        results.append(
            ToyResult(
                name,
                final.mean().item(),
                (final < 0).double().mean().item(),
                traj,
                time.perf_counter() - start,
            )
        )
    return results


def format_results(results: Sequence[ToyResult], steps: int, k: float) -> str:
    lines = [
        f"ADOPT toy counterexample: k={k:g}, beta2=0.999, lr 0.01/sqrt(1+0.01t), {steps} steps; "
        "optimum x = -1",
        "",
        "| optimizer | mean final x | seeds with x < 0 | time |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.mean_x:+.3f} | {r.frac_negative:.0%} | {r.seconds:.1f} s |")
    lines.append("")
    checkpoints = ", ".join(str(s) for s, _ in results[0].trajectory)
    lines.append(f"mean x over time (at steps {checkpoints})")
    for r in results:
        lines.append(f"  {r.name:<24} " + " ".join(f"{v:+.2f}" for _, v in r.trajectory))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The toy's options, shared by ``hf-tuningfree toy`` and ``python -m hf_tuningfree.toy``."""
    parser.add_argument("--steps", type=positive_int, default=50_000, help="steps (default 50000)")
    parser.add_argument(
        "--seeds", type=positive_int, default=256, help="independent runs in parallel (default 256)"
    )
    parser.add_argument(
        "--k", type=float, default=50.0, help="the rare gradient is k^2, the common one -k (50)"
    )


def run(args: argparse.Namespace) -> list[ToyResult]:
    """Run every toy optimizer as ``args`` says and print the table."""
    torch.set_num_threads(1)
    results = run_all(args.steps, args.seeds, args.k)
    print(format_results(results, args.steps, args.k))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_tuningfree.toy", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
