"""``hf-tuningfree compare --suite`` / ``--task a b c``: one comparison per task, one table across.

No default may be chosen on one task (issue 13): the suite runs the same optimizers, AdamW grid
and seeds on tasks of different regimes and puts them side by side. Each task is an ordinary
comparison (:func:`hf_tuningfree.compare.runner.run_comparison`, cached and resumable) written into
``<output>/<task kind>/`` with its usual files; then ``suite.md``, ``suite.csv`` and ``suite.json``
hold the cross-task table:

- per optimizer and task, the **ratio** of its final eval loss (mean over seeds) to the best AdamW
  of that task's grid (best by the mean over seeds; AdamW with its own schedule, the Trainer's
  linear decay), then the **mean** and the **worst** over tasks;
- per run, its final eval loss over its own best eval loss during the run (every evaluation and
  the final one): a run that ends more than :data:`SPIKE_LIMIT` above its best has spiked, a
  failure no tuning-free user can tune away; the table shows the worst such ratio per optimizer
  and how many runs exceed the limit.

The numbers come from the same aggregation that writes each task's ``results.json``
(:func:`hf_tuningfree.compare.report.aggregate` / ``verdict``), so they equal the per-task files.

The suite's tasks (:data:`SUITE`), sizes chosen so that every registry optimizer, a 7-point AdamW
grid and stock AdamW with 3 seeds fit in about 45 minutes on 2 idle CPU cores:

- ``offline-gpt2``: from scratch, short (150 steps; ``make demo``'s task);
- ``gpt2-long``: from scratch, long (1,000 steps);
- ``gpt2-shift-ft``: a pretrained GPT-2 fully fine-tuned on another domain (200 steps);
- ``gpt2-shift-lora``: LoRA on that model, zero-initialised B, another domain (300 steps);
- ``gpt2-shift-lora-short``: the same LoRA fine-tune stopped after 50 steps (the short run where
  step-size estimators that start small have no time to grow).

``smollm2-lora`` (a real 135M pretrained model, ~150 s per run) is left out of ``--suite`` for its
cost (60 runs are about 75 minutes alone) and can be added with ``--task``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_tuningfree.compare.spec import (
    ADAMW,
    TASK_GRIDS,
    TaskSpec,
    build_runs,
    log_grid,
    parse_optimizers,
)

#: The tasks of ``--suite``, in table order.
SUITE = ("offline-gpt2", "gpt2-long", "gpt2-shift-ft", "gpt2-shift-lora", "gpt2-shift-lora-short")
#: The seeds of a suite run unless ``--seeds`` says otherwise.
SUITE_SEEDS = (0, 1, 2)
#: A run whose final eval loss is above this multiple of its own best eval loss has spiked.
SPIKE_LIMIT = 1.02
SUITE_FILES = {"markdown": "suite.md", "csv": "suite.csv", "json": "suite.json"}
BEST_ADAMW = "adamw (best of grid)"

#: Options that describe one task and cannot apply to several.
_ONE_TASK_OPTIONS = {
    "steps": "--steps",
    "batch_size": "--batch-size",
    "block_size": "--block-size",
    "grid_low": "--grid-low",
    "grid_high": "--grid-high",
}


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """``--suite`` (every task of :data:`SUITE`); several tasks also come from ``--task a b c``."""
    parser.add_argument(
        "--suite",
        action="store_true",
        help=f"run every suite task ({', '.join(SUITE)}) and write the cross-task table "
        "(suite.md/.csv/.json) beside one sub-directory per task; --task a b c runs some",
    )


def requested_tasks(args: argparse.Namespace) -> list[str] | None:
    """The task kinds of a multi-task run (``--suite``, or ``--task`` with several kinds);
    ``None`` for an ordinary one-task comparison.

    Raises:
        SystemExit: ``--suite`` with ``--task``, or a kind named twice.
    """
    tasks = getattr(args, "task", None) or []
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if getattr(args, "suite", False):
        if tasks:
            raise SystemExit(
                "hf-tuningfree compare: error: --suite runs every suite task; to run some, name "
                f"them with --task alone (suite tasks: {' '.join(SUITE)})"
            )
        return list(SUITE)
    if len(tasks) < 2:
        return None
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise SystemExit(f"hf-tuningfree compare: error: --task names {', '.join(twice)} twice")
    return tasks


def suite_tasks(kinds: Sequence[str]) -> list[TaskSpec]:
    """The default :class:`TaskSpec` of each fixed task kind.

    Raises:
        SystemExit: an unknown kind, or ``custom`` (one custom task per comparison).
    """
    from hf_tuningfree.compare.tasks import default_task

    unknown = [k for k in kinds if k not in TASK_GRIDS]
    if unknown:
        raise SystemExit(
            f"hf-tuningfree compare: error: unknown task kind(s) {', '.join(unknown)} for a "
            f"multi-task run; available: {', '.join(TASK_GRIDS)} (a custom task runs alone)"
        )
    return [default_task(kind) for kind in kinds]


def run_suite(
    args: argparse.Namespace,
    custom_options: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """The command line's multi-task run (see :func:`compare_suite`); ``custom_options``: the
    options describing a custom task that were given (refused here)."""
    say = progress or (lambda s: print(s, flush=True))
    kinds = requested_tasks(args) or []
    given = list(custom_options) + [
        flag for dest, flag in _ONE_TASK_OPTIONS.items() if getattr(args, dest, None) is not None
    ]
    if given:
        raise SystemExit(
            f"hf-tuningfree compare: error: {' and '.join(given)} describe one task; the "
            "suite's tasks have their own (run one task with --task KIND to change them)"
        )
    try:
        optimizers = parse_optimizers(args.optimizers) if args.optimizers else None
    except ValueError as error:
        raise SystemExit(f"hf-tuningfree compare: error: --optimizers: {error}") from error
    output_dir = Path(args.output_dir) if args.output_dir else Path("outputs/compare-suite")
    paths = compare_suite(
        suite_tasks(kinds),
        optimizers,
        args.seeds or list(SUITE_SEEDS),
        output_dir,
        adamw_lrs=args.adamw_lrs,
        grid_points=args.grid_points,
        include_stock=not args.no_stock_adamw,
        workers=args.workers,
        plots=not args.no_plots,
        progress=say,
    )
    say("")
    say(paths["markdown"].read_text(encoding="utf-8"))
    say("written:")
    for name, path in paths.items():
        say(f"  {name:<10} {path}")
    return paths


def compare_suite(
    tasks: Sequence[TaskSpec],
    optimizers: Sequence[str] | None,
    seeds: Sequence[int],
    output_dir: Path,
    *,
    adamw_lrs: Sequence[float] | None = None,
    grid_points: int = 7,
    include_stock: bool = True,
    workers: int = 2,
    plots: bool = True,
    progress: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run ``optimizers`` (canonical names or variants; default every tuning-free optimizer),
    AdamW over each task's grid (``adamw_lrs`` for all tasks, else ``grid_points`` over
    :data:`~hf_tuningfree.compare.spec.TASK_GRIDS`) and stock AdamW on every task with ``seeds``;
    write each task's outputs into ``output_dir/<kind>`` and the cross-task table beside them.

    Returns the paths of the cross-task files (``markdown``, ``csv``, ``json``)."""
    from hf_tuningfree.compare.report import write_outputs
    from hf_tuningfree.compare.runner import run_comparison
    from hf_tuningfree.optim import available_optimizers

    names = list(optimizers or available_optimizers(tuning_free_only=True, aliases=False))
    kinds = [t.kind for t in tasks]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"each task kind once per suite, got {kinds}")
    started = time.perf_counter()
    load_before = _load_average()
    per_task: dict[str, list[dict[str, Any]]] = {}
    for number, task in enumerate(tasks, 1):
        lrs = list(adamw_lrs) if adamw_lrs else log_grid(*TASK_GRIDS[task.kind], grid_points)
        runs = build_runs(names, lrs, list(seeds), include_stock=include_stock)
        task_dir = output_dir / task.kind
        progress(
            f"suite task {number}/{len(tasks)}: {task.kind} ({task.model} on {task.data}, "
            f"{task.max_steps} steps): {len(runs)} runs, output in {task_dir}"
        )
        task_started = time.perf_counter()
        results = run_comparison(task, runs, task_dir, workers=workers, progress=progress)
        write_outputs(results, task, task_dir, plots=plots)
        progress(f"suite task {task.kind} finished in {time.perf_counter() - task_started:.0f}s")
        per_task[task.kind] = results
    table = cross_task_table(per_task, {t.kind: t for t in tasks})
    table["wall_seconds"] = time.perf_counter() - started
    table["load_average"] = {"start": load_before, "end": _load_average()}
    table["workers"] = workers
    everything = [r for results in per_task.values() for r in results]
    table["runs_trained"] = sum(not r.get("cached") for r in everything)
    table["runs_cached"] = sum(bool(r.get("cached")) for r in everything)
    # each run's own wall time as recorded when it trained (cached runs: back then)
    table["run_seconds"] = sum(r.get("wall_seconds", 0.0) for r in everything)
    return write_suite_outputs(table, output_dir)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without it
        return None


# --- the cross-task table -----------------------------------------------------------------------


def final_over_best(result: dict[str, Any]) -> float:
    """A run's final eval loss over its own best eval loss (every evaluation in its log history
    and the final one); infinite for a diverged run, NaN for a failed one."""
    if result.get("status") == "diverged":
        return math.inf
    final = result.get("final_eval_loss")
    if result.get("status") != "ok" or not isinstance(final, (int, float)):
        return math.nan
    evals = [h["eval_loss"] for h in result.get("log_history", []) if "eval_loss" in h]
    best = min([final, *evals])
    return final / best if best > 0 else math.nan


@dataclass
class SuiteRow:
    """One optimizer (or AdamW configuration) across tasks."""

    label: str
    role: str
    ratio: dict[str, float] = field(default_factory=dict)
    eval_loss: dict[str, float] = field(default_factory=dict)
    final_over_best: dict[str, float] = field(default_factory=dict)
    runs: int = 0
    runs_over_limit: int = 0
    errors: int = 0
    mean: float = math.nan
    worst: float = math.nan
    worst_final_over_best: float = math.nan


def _worst(values: list[float]) -> float:
    if any(math.isnan(v) for v in values) or not values:
        return math.nan
    return max(values)


def cross_task_table(
    per_task: dict[str, list[dict[str, Any]]], specs: dict[str, TaskSpec]
) -> dict[str, Any]:
    """The cross-task table from each task's run results (the runner's format), as JSON-able
    data: ``tasks`` (per task its best AdamW), ``rows`` (:class:`SuiteRow` fields)."""
    from hf_tuningfree.compare.results import aggregate, verdict

    rows: dict[str, SuiteRow] = {}
    tasks: dict[str, Any] = {}
    for kind, results in per_task.items():
        aggregated = aggregate(results)
        best = verdict(aggregated).best_adamw
        base = best.eval_loss if best is not None else math.nan
        grid = sorted(r.lr for r in aggregated if r.role == "adamw-grid")
        tasks[kind] = {
            "model": specs[kind].model,
            "data": specs[kind].data,
            "steps": specs[kind].max_steps,
            "best_adamw_lr": best.lr if best else None,
            "best_adamw_eval_loss": base,
            "best_at_grid_edge": bool(best and grid and best.lr in (grid[0], grid[-1])),
            "grid": grid,
            "seeds": max((r.seeds for r in aggregated), default=0),
        }
        spikes: dict[tuple, list[float]] = {}
        for result in results:
            run = result["run"]
            spikes.setdefault((run["optimizer"], run["lr"], run["role"]), []).append(
                final_over_best(result)
            )
        for agg in aggregated:
            key = (agg.optimizer, agg.lr, agg.role)
            labels = [agg.label] + ([BEST_ADAMW] if agg is best else [])
            for label in labels:
                row = rows.setdefault(
                    label, SuiteRow(label, "adamw-best" if label == BEST_ADAMW else agg.role)
                )
                row.eval_loss[kind] = agg.eval_loss
                row.ratio[kind] = agg.eval_loss / base
                row.final_over_best[kind] = _worst(spikes[key])
                row.runs += len(spikes[key])
                row.runs_over_limit += sum(s > SPIKE_LIMIT for s in spikes[key])
                row.errors += agg.errors
    for row in rows.values():
        if len(row.ratio) == len(per_task):
            ratios = list(row.ratio.values())
            row.mean = math.inf if any(math.isinf(r) for r in ratios) else sum(ratios) / len(ratios)
            row.worst = _worst(ratios)
        row.worst_final_over_best = _worst(list(row.final_over_best.values()))
    lrs = {r["label"]: r["run"]["lr"] or 0.0 for res in per_task.values() for r in res}
    return {
        "tasks": tasks,
        "rows": [asdict(r) for r in sorted(rows.values(), key=lambda r: _rank(r, lrs))],
        "spike_limit": SPIKE_LIMIT,
        "baseline": f"{ADAMW}, best learning rate of each task's grid by mean over seeds",
    }


_ROLE_ORDER = {"tuning-free": 0, "adamw-best": 1, "adamw-grid": 2, "adamw-default": 3}


def _rank(row: SuiteRow, lrs: dict[str, float]) -> tuple:
    """Tuning-free rows by mean ratio (incomplete ones last), then AdamW's best, grid (by lr) and
    stock rows."""
    if row.role == "tuning-free":
        return (0, math.isnan(row.mean), 0.0 if math.isnan(row.mean) else row.mean, row.label)
    return (_ROLE_ORDER[row.role], False, lrs.get(row.label, 0.0), row.label)


def _cell(x: float | None, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "diverged"
    if math.isnan(x):
        return "n/a"
    return format(x, spec)


def markdown_suite(table: dict[str, Any]) -> str:
    """The cross-task table in markdown: ratios to each task's best AdamW, then final/own best."""
    kinds = list(table["tasks"])
    limit = table["spike_limit"]
    lines = [
        "# Compare suite: final eval loss / the best AdamW of each task's grid",
        "",
        "| optimizer | " + " | ".join(kinds) + " | mean | worst | worst final / own best "
        f"| runs > {limit}x own best |",
        "|---" * (len(kinds) + 5) + "|",
    ]
    for row in table["rows"]:
        cells = [_cell(row["ratio"].get(kind)) for kind in kinds]
        lines.append(
            f"| {row['label']} | " + " | ".join(cells) + f" | {_cell(row['mean'])} | "
            f"{_cell(row['worst'])} | {_cell(row['worst_final_over_best'], '.4f')} | "
            f"{row['runs_over_limit']} of {row['runs']} |"
        )
    lines += ["", "| task | model | data | steps | seeds | best AdamW lr | its eval loss |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, info in table["tasks"].items():
        edge = " (grid edge!)" if info["best_at_grid_edge"] else ""
        lines.append(
            f"| {kind} | {info['model']} | {info['data']} | {info['steps']} | {info['seeds']} | "
            f"{_cell(info['best_adamw_lr'], '.3g')}{edge} | "
            f"{_cell(info['best_adamw_eval_loss'], '.4f')} |"
        )
    errors = [r["label"] for r in table["rows"] if r["errors"]]
    lines += [
        "",
        "Ratio: final eval loss (mean over seeds) / that of the best AdamW of the task's grid "
        "(by mean over seeds); diverged: a seed's loss became NaN/Inf. Final / own best: a "
        f"run's final eval loss over its best eval loss during the run (worst over tasks and "
        f"seeds); above {limit} the run ended on a spike. Per-task files: <task>/results.*.",
    ]
    if errors:
        lines.append(f"Runs that failed (left out of the means): {', '.join(errors)}.")
    if "wall_seconds" in table:
        load = table.get("load_average") or {}
        lines.append(
            f"This invocation: {table['wall_seconds'] / 60:.1f} min wall time with "
            f"{table.get('workers')} worker(s), {table.get('runs_trained')} runs trained and "
            f"{table.get('runs_cached')} reused from the cache; load average (1/5/15 min) "
            f"{load.get('start')} at the start, {load.get('end')} at the end. The runs' own "
            f"wall times add up to {table.get('run_seconds', 0.0) / 60:.1f} min."
        )
    return "\n".join(lines) + "\n"


def write_suite_outputs(table: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    """``suite.md``, ``suite.csv`` (one line per optimizer, full-precision numbers) and
    ``suite.json`` (everything) in ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / file for name, file in SUITE_FILES.items()}
    paths["json"].write_text(json.dumps(table, indent=1), encoding="utf-8")
    paths["markdown"].write_text(markdown_suite(table), encoding="utf-8")
    kinds = list(table["tasks"])
    fields = ["label", "role", *(f"ratio:{k}" for k in kinds), "mean", "worst",
              *(f"final_over_best:{k}" for k in kinds), "worst_final_over_best",
              "runs_over_limit", "runs", "errors"]  # fmt: skip
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in table["rows"]:
            line = {k: row[k] for k in fields if k in row}
            for kind in kinds:
                line[f"ratio:{kind}"] = row["ratio"].get(kind, "")
                line[f"final_over_best:{kind}"] = row["final_over_best"].get(kind, "")
            writer.writerow(line)
    return paths


__all__ = [
    "SPIKE_LIMIT",
    "SUITE",
    "add_suite_arguments",
    "compare_suite",
    "cross_task_table",
    "final_over_best",
    "requested_tasks",
    "run_suite",
]
