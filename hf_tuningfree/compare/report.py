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
    Row,
    Verdict,
    aggregate,
    curves,
    outcome,
    verdict,
)
from hf_tuningfree.compare.spec import STOCK_LR, TaskSpec

__all__ = [
    "BEST_RATIO_GOAL",
    "EVERY_RATIO_GOAL",
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
    """A number for the table; ``-`` where there is none (no result, no baseline to divide
    by)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _times(ratio: float | None) -> str:
    """``1.234x``, or ``-`` when there is no ratio (never ``n/ax``)."""
    return "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.3f}x"


def _loss(row: Row) -> str:
    """The final eval loss, or what happened instead: ``diverged`` (the loss went NaN/Inf) or
    ``error`` (the run failed, e.g. bad input; its message is in results.json and the log)."""
    kind = outcome(row)
    if kind != "ok":
        return kind
    text = f"{row.eval_loss:.4f}"
    if row.seeds > 1:
        text += f" ± {row.eval_loss_spread / 2:.4f}"
    return text


def markdown_table(rows: list[Row], v: Verdict) -> str:
    base = v.best_adamw.eval_loss if v.best_adamw else float("nan")
    lines = [
        "| run | lr | schedule | final eval loss | x best AdamW | perplexity | MC accuracy "
        "| wall (s) | peak RSS (MB) | opt. state (MB) | state B/param |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"tuning-free": 0, "adamw-grid": 1, "adamw-default": 2}
    for r in sorted(rows, key=lambda r: (order[r.role], r.lr or 0, r.label)):
        ratio = r.eval_loss / base if math.isfinite(base) and math.isfinite(r.eval_loss) else None
        label = r.label + (" (stock default)" if r.lr == STOCK_LR else "")
        if r is v.best_adamw:
            label += " (best AdamW)"
        if r is v.best_tuning_free:
            label += " (best tuning-free)"
        lines.append(
            f"| {label} | {_fmt(r.learning_rate, '.3g')} | {r.schedule} | {_loss(r)} | "
            f"{_fmt(ratio, '.3f')} | {_fmt(r.perplexity, '.1f')} | "
            f"{_fmt(r.mc_accuracy, '.3f')} | {_fmt(r.wall_seconds, '.0f')} | "
            f"{_fmt(r.peak_rss_mb, '.0f')} | {_fmt(r.optimizer_state_mb, '.2f')} | "
            f"{_fmt(r.state_bytes_per_param, '.2f')} |"
        )
    return "\n".join(lines)


def _goal_word(value: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[value]


def _seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n != 1 else "")


def summary_text(rows: list[Row], v: Verdict, task: TaskSpec) -> str:
    """The closing summary in plain words."""
    out = [f"Task: {task.kind} ({task.model} on {task.data}), {task.max_steps} steps."]
    if v.best_tuning_free:
        out.append(
            f"Best tuning-free optimizer: {v.best_tuning_free.label}, final eval loss "
            f"{v.best_tuning_free.eval_loss:.4f}, with no tuning "
            f"(one run per seed, {_seeds(v.seeds)})."
        )
    if v.best_adamw:
        out.append(
            f"Best tuned AdamW: lr={v.best_adamw.lr:.3g}, final eval loss "
            f"{v.best_adamw.eval_loss:.4f}, found with {v.runs_adamw} runs over the grid."
        )
    if v.grid_edge and v.best_adamw:
        word = "highest" if v.grid_edge == "high" else "lowest"
        option = "--grid-high" if v.grid_edge == "high" else "--grid-low"
        out.append(
            f"WARNING: the best AdamW lr ({v.best_adamw.lr:.3g}) is the {word} point of the grid: "
            "a learning rate beyond it may do better, so the tuned baseline may be stronger "
            f"than this grid shows. Extend the grid ({option}, or --extend-grid to do it "
            "automatically)."
        )
    if v.best_tuning_free and v.best_adamw:
        out.append(
            f"The best tuning-free optimizer reaches {v.best_ratio:.3f}x the best AdamW loss."
        )
    if v.stock_adamw:
        stock = v.stock_adamw
        ratio = (
            stock.eval_loss / v.best_adamw.eval_loss
            if v.best_adamw and math.isfinite(stock.eval_loss)
            else None
        )
        what = _loss(stock) if outcome(stock) != "ok" else f"final eval loss {_loss(stock)}"
        times = f" ({_times(ratio)} the best AdamW)" if ratio is not None else ""
        out.append(f"AdamW at the stock Trainer default lr={STOCK_LR:g}: {what}{times}.")
    lagging = sorted(
        (k for k, r in v.every_ratio.items() if not r <= EVERY_RATIO_GOAL), key=v.every_ratio.get
    )
    if lagging:
        out.append(
            f"Tuning-free optimizers above {EVERY_RATIO_GOAL}x the best AdamW: "
            + ", ".join(f"{k} ({_times(v.every_ratio[k])})" for k in lagging)
            + "."
        )
    if v.failed:
        out.append(
            "Without a result: "
            + ", ".join(f"{k} ({why})" for k, why in sorted(v.failed.items()))
            + " (see results.json and each run's log under logs/)."
        )
    errors = [r for r in rows if r.errors and r.role != "tuning-free"]
    if errors:
        out.append("AdamW runs that failed: " + ", ".join(r.label for r in errors) + ".")
    out.append("Goals: " + "; ".join(f"{k}: {_goal_word(ok)}" for k, ok in v.goals.items()))
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
            "without_result": v.failed,
            "best_adamw_at_grid_edge": v.grid_edge,
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
