"""Everything a comparison writes: JSON, CSV, a markdown table, the summary in plain words, plots.

The summary answers the project's question for this model and data: did the best untuned
optimizer match AdamW at its best learning rate, and how much worse is AdamW at the stock default?
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hf_tuningfree.compare.results import (
    BEST_RATIO_GOAL,
    EVERY_RATIO_GOAL,
    STEP_SIZE_KEYS,
    Row,
    Verdict,
    aggregate,
    curves,
    verdict,
)
from hf_tuningfree.compare.spec import STOCK_LR, TaskSpec

__all__ = [
    "BEST_RATIO_GOAL",
    "EVERY_RATIO_GOAL",
    "STEP_SIZE_KEYS",
    "Row",
    "Verdict",
    "aggregate",
    "curves",
    "markdown_table",
    "summary_text",
    "verdict",
    "write_outputs",
]


def _fmt(x: float | None, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "diverged"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return format(x, spec)


def markdown_table(rows: list[Row], v: Verdict) -> str:
    base = v.best_adamw.eval_loss if v.best_adamw else float("nan")
    lines = [
        "| run | lr | schedule | final eval loss | x best AdamW | perplexity | MC accuracy "
        "| wall (s) | peak RSS (MB) | opt. state (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"tuning-free": 0, "adamw-grid": 1, "adamw-default": 2}
    for r in sorted(rows, key=lambda r: (order[r.role], r.lr or 0, r.label)):
        loss = _fmt(r.eval_loss)
        if r.seeds > 1 and math.isfinite(r.eval_loss):
            loss += f" ± {r.eval_loss_spread / 2:.4f}"
        ratio = r.eval_loss / base if math.isfinite(base) and math.isfinite(r.eval_loss) else None
        label = r.label + (" (stock default)" if r.lr == STOCK_LR else "")
        if r is v.best_adamw:
            label += " (best AdamW)"
        if r is v.best_tuning_free:
            label += " (best tuning-free)"
        lines.append(
            f"| {label} | {_fmt(r.learning_rate, '.3g')} | {r.schedule} | {loss} | "
            f"{_fmt(ratio, '.3f')} | {_fmt(r.perplexity, '.1f')} | "
            f"{_fmt(r.mc_accuracy, '.3f')} | {_fmt(r.wall_seconds, '.0f')} | "
            f"{_fmt(r.peak_rss_mb, '.0f')} | {_fmt(r.optimizer_state_mb, '.2f')} |"
        )
    return "\n".join(lines)


def summary_text(rows: list[Row], v: Verdict, task: TaskSpec) -> str:
    """The closing summary in plain words."""
    out = [f"Task: {task.kind} ({task.model} on {task.data}), {task.max_steps} steps."]
    if v.best_tuning_free:
        out.append(
            f"Best tuning-free optimizer: {v.best_tuning_free.label}, final eval loss "
            f"{v.best_tuning_free.eval_loss:.4f}, with no tuning "
            f"({v.runs_tuning_free} run per seed)."
        )
    if v.best_adamw:
        out.append(
            f"Best tuned AdamW: lr={v.best_adamw.lr:.3g}, final eval loss "
            f"{v.best_adamw.eval_loss:.4f}, found with {v.runs_adamw} runs over the grid."
        )
    if v.best_tuning_free and v.best_adamw:
        out.append(
            f"The best tuning-free optimizer reaches {v.best_ratio:.3f}x the best AdamW loss."
        )
    if v.stock_adamw:
        ratio = (
            v.stock_adamw.eval_loss / v.best_adamw.eval_loss
            if v.best_adamw and math.isfinite(v.stock_adamw.eval_loss)
            else float("nan")
        )
        out.append(
            f"AdamW at the stock Trainer default lr={STOCK_LR:g}: final eval loss "
            f"{_fmt(v.stock_adamw.eval_loss)} ({_fmt(ratio, '.3f')}x the best AdamW)."
        )
    lagging = sorted(
        (k for k, r in v.every_ratio.items() if not r <= EVERY_RATIO_GOAL), key=v.every_ratio.get
    )
    if lagging:
        out.append(
            "Tuning-free optimizers above 1.05x the best AdamW: "
            + ", ".join(f"{k} ({_fmt(v.every_ratio[k], '.3f')}x)" for k in lagging)
            + "."
        )
    out.append(
        "Goals: " + "; ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in v.goals.items())
    )
    return "\n".join(out)


def write_outputs(
    results: list[dict[str, Any]], task: TaskSpec, output_dir: Path, *, plots: bool = True
) -> dict[str, Path]:
    """Write results.json, results.csv, results.md, summary.txt and the PNG plots."""
    rows = aggregate(results)
    v = verdict(rows)
    paths = {
        "json": output_dir / "results.json",
        "csv": output_dir / "results.csv",
        "markdown": output_dir / "results.md",
        "summary": output_dir / "summary.txt",
    }
    payload = {
        "task": task.to_dict(),
        "rows": [r.__dict__ for r in rows],
        "verdict": {
            "best_tuning_free": v.best_tuning_free.label if v.best_tuning_free else None,
            "best_adamw_lr": v.best_adamw.lr if v.best_adamw else None,
            "best_ratio": v.best_ratio,
            "every_ratio": v.every_ratio,
            "goals": v.goals,
        },
        "runs": results,
    }
    paths["json"].write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        for r in rows:
            writer.writerow(r.__dict__)
    summary = summary_text(rows, v, task)
    paths["markdown"].write_text(
        f"# Comparison: {task.kind}\n\n{markdown_table(rows, v)}\n\n{summary}\n", encoding="utf-8"
    )
    paths["summary"].write_text(summary + "\n", encoding="utf-8")
    if plots:
        from hf_tuningfree.compare.plots import plot_all

        paths.update(plot_all(results, rows, v, output_dir))
    return paths
