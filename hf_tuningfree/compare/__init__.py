"""``hf-tuningfree compare``: did the untuned optimizer match a tuned baseline?

On one model and data set it runs every tuning-free optimizer at its registry defaults, AdamW over
a log-spaced learning-rate grid and AdamW at the stock Trainer learning rate, all with the same
seeds, data order, steps and evaluation; then writes JSON, CSV, a markdown table, plots and a
plain-words summary. Runs are cached, so an interrupted comparison resumes where it stopped.

    hf-tuningfree compare                       # offline default (~4 min on 2 CPU cores)
    python -m hf_tuningfree.compare --steps 300 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from hf_tuningfree.compare.spec import RunSpec, TaskSpec, build_runs, log_grid

__all__ = ["RunSpec", "TaskSpec", "build_runs", "log_grid", "main", "run"]

#: AdamW grids per task kind: from-scratch training wants larger steps than LoRA fine-tuning.
DEFAULT_GRIDS = {"offline-gpt2": (1e-4, 1e-1), "smollm2-lora": (1e-5, 1e-2)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="offline-gpt2", help="task kind (default offline-gpt2)")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        help="registry names (default: every tuning-free optimizer)",
    )
    parser.add_argument(
        "--adamw-lrs",
        nargs="+",
        type=float,
        default=None,
        help="explicit AdamW learning rates (default: a log-spaced grid)",
    )
    parser.add_argument("--grid-points", type=int, default=7)
    parser.add_argument("--grid-low", type=float, default=None)
    parser.add_argument("--grid-high", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-stock-adamw", action="store_true",
                        help="skip AdamW at the stock Trainer lr (5e-5)")  # fmt: skip


def task_from_args(args: argparse.Namespace) -> TaskSpec:
    from hf_tuningfree.compare.tasks import default_task

    return default_task(args.task, args.steps)


def run(args: argparse.Namespace) -> dict[str, Path]:
    from hf_tuningfree.compare.report import write_outputs
    from hf_tuningfree.compare.runner import run_comparison
    from hf_tuningfree.optim import available_optimizers

    task = task_from_args(args)
    optimizers = args.optimizers or available_optimizers(tuning_free_only=True)
    unknown = sorted(set(optimizers) - set(available_optimizers()))
    if unknown:
        raise SystemExit(f"unknown optimizers {unknown}; valid: {available_optimizers()}")
    low, high = DEFAULT_GRIDS.get(task.kind, (1e-5, 1e-1))
    lrs = args.adamw_lrs or log_grid(args.grid_low or low, args.grid_high or high, args.grid_points)
    runs = build_runs(optimizers, lrs, args.seeds, include_stock=not args.no_stock_adamw)
    output_dir = Path(args.output_dir or f"outputs/compare-{task.kind}")
    print(
        f"hf-tuningfree compare: {task.kind}, {task.max_steps} steps, {len(optimizers)} "
        f"tuning-free optimizer(s) + AdamW at {len(lrs)} learning rates, seeds {args.seeds}: "
        f"{len(runs)} runs, {args.workers} worker(s); output in {output_dir}",
        flush=True,
    )
    start = time.perf_counter()
    results = run_comparison(
        task, runs, output_dir, workers=args.workers, progress=lambda s: print(s, flush=True)
    )
    paths = write_outputs(results, task, output_dir, plots=not args.no_plots)
    print()
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"finished in {time.perf_counter() - start:.0f}s; written:")
    for name, path in paths.items():
        print(f"  {name:<18} {path}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-tuningfree compare", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
