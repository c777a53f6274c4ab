"""Everything a comparison writes: JSON, CSV, a markdown table, the summary in plain words, plots.

The summary answers the project's question for this model and data: did the best untuned
optimizer match AdamW at its best learning rate, and how much worse is AdamW at the stock default?
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_tuningfree.compare.spec import STOCK_LR, TaskSpec

#: The project's goals (issue "the main job"): best tuning-free <= 1.01x best AdamW, every
#: tuning-free <= 1.05x, AdamW at the stock lr clearly worse.
BEST_RATIO_GOAL = 1.01
EVERY_RATIO_GOAL = 1.05


#: ``optim/...`` statistics that hold an optimizer's effective step size, in order of preference:
#: D-Adaptation/Prodigy ``d*lr``, DoG's ``eta`` (L-DoG: the median over tensors), the learned
#: step size of hypergradient descent. Optimizers without one (AdamW, ADOPT) step by the
#: scheduled ``learning_rate``.
STEP_SIZE_KEYS = (
    "optim/d_lr",
    "optim/eta",
    "optim/eta_median",
    "optim/hyper/level0/lr",
    "learning_rate",
)


def curves(result: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Training loss, eval loss and effective step size over steps, from a run's log history."""
    out: dict[str, list[tuple[float, float]]] = {"train": [], "eval": [], "step_size": []}
    for h in result.get("log_history", []):
        if "loss" in h:
            out["train"].append((h["step"], h["loss"]))
            key = next((k for k in STEP_SIZE_KEYS if k in h), None)
            if key is not None:
                out["step_size"].append((h["step"], h[key]))
        if "eval_loss" in h:
            out["eval"].append((h["step"], h["eval_loss"]))
    return out


@dataclass
class Row:
    """One configuration (a run, or the mean over seeds of identical runs)."""

    label: str
    role: str
    optimizer: str
    lr: float | None
    learning_rate: float | None
    schedule: str
    eval_loss: float
    eval_loss_spread: float
    perplexity: float
    mc_accuracy: float | None
    wall_seconds: float
    peak_rss_mb: float
    optimizer_state_mb: float
    seeds: int
    diverged: int
    errors: int


def _mean(values: list[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def aggregate(results: list[dict[str, Any]]) -> list[Row]:
    """Group runs that differ only by seed; mean and spread (max - min) of the final eval loss.
    A diverged seed makes the configuration's loss infinite."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        run = r["run"]
        groups[(run["optimizer"], run["lr"], run["role"])].append(r)
    rows = []
    for (optimizer, lr, role), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        diverged = sum(r.get("status") == "diverged" for r in rs)
        errors = sum(r.get("status") == "error" for r in rs)
        losses = [r["final_eval_loss"] for r in ok]
        loss = float("inf") if diverged else _mean(losses) if losses else float("nan")
        spread = (max(losses) - min(losses)) if len(losses) > 1 else 0.0
        rows.append(
            Row(
                label=rs[0]["label"],
                role=role,
                optimizer=optimizer,
                lr=lr,
                learning_rate=ok[0].get("learning_rate") if ok else lr,
                schedule=ok[0].get("lr_scheduler_type", "") if ok else "",
                eval_loss=loss,
                eval_loss_spread=spread,
                perplexity=math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf"),
                mc_accuracy=_mean([r["mc_accuracy"] for r in ok if "mc_accuracy" in r])
                if any("mc_accuracy" in r for r in ok)
                else None,
                wall_seconds=_mean([r.get("wall_seconds", float("nan")) for r in rs]),
                peak_rss_mb=_mean([r.get("peak_rss_mb", float("nan")) for r in rs]),
                optimizer_state_mb=_mean([r.get("optimizer_state_mb", float("nan")) for r in ok]),
                seeds=len(rs),
                diverged=diverged,
                errors=errors,
            )
        )
    return rows


@dataclass
class Verdict:
    best_tuning_free: Row | None
    best_adamw: Row | None
    stock_adamw: Row | None
    best_ratio: float
    every_ratio: dict[str, float]
    goals: dict[str, bool]
    runs_tuning_free: int
    runs_adamw: int


def verdict(rows: list[Row]) -> Verdict:
    tf = [r for r in rows if r.role == "tuning-free"]
    grid = [r for r in rows if r.role in ("adamw-grid", "adamw-default")]
    finite_tf = [r for r in tf if math.isfinite(r.eval_loss)]
    finite_grid = [r for r in grid if math.isfinite(r.eval_loss) and r.role == "adamw-grid"]
    best_tf = min(finite_tf, key=lambda r: r.eval_loss, default=None)
    best_adamw = min(finite_grid, key=lambda r: r.eval_loss, default=None)
    stock = next((r for r in grid if r.lr == STOCK_LR), None)
    base = best_adamw.eval_loss if best_adamw else float("nan")
    ratio = best_tf.eval_loss / base if best_tf and best_adamw else float("nan")
    every = {r.optimizer: r.eval_loss / base for r in tf} if best_adamw else {}
    stock_ratio = stock.eval_loss / base if stock and best_adamw else float("nan")
    goals = {
        f"best tuning-free <= {BEST_RATIO_GOAL}x best AdamW": ratio <= BEST_RATIO_GOAL,
        f"every tuning-free <= {EVERY_RATIO_GOAL}x best AdamW": bool(every)
        and all(v <= EVERY_RATIO_GOAL for v in every.values()),
        "AdamW at the stock lr clearly worse (> 1.05x best AdamW)": stock_ratio > 1.05,
    }
    return Verdict(
        best_tf,
        best_adamw,
        stock,
        ratio,
        every,
        goals,
        runs_tuning_free=sum(1 for r in tf) and max(r.seeds for r in tf),
        runs_adamw=sum(r.seeds for r in grid if r.role == "adamw-grid"),
    )


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
