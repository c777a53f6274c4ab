"""A comparison's results in numbers: runs aggregated over seeds, the verdict, the curves.

:mod:`.report` writes these into files and :mod:`.plots` into pictures; both import from here,
and this module imports neither.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from hf_tuningfree.compare.spec import STOCK_LR

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
