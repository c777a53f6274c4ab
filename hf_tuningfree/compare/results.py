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

from hf_tuningfree.compare.spec import STOCK_LR, VARIANT_SEPARATOR

#: The project's goals (issue "the main job"): best tuning-free <= 1.01x best AdamW, every
#: tuning-free <= 1.05x, AdamW at the stock lr clearly worse.
BEST_RATIO_GOAL = 1.01
EVERY_RATIO_GOAL = 1.05


def step_size_key(optimizer: str) -> str:
    """The log-history key of a run's effective step size: ``optim/<key>`` with the key its
    registry entry declares (``OptimizerSpec.step_size_key``: D-Adaptation's ``d_lr``, DoG's
    ``eta``, ...), else the scheduled ``learning_rate`` (AdamW, ADOPT). ``optimizer`` is a run's
    registry name or variant ``name:key=value,...``."""
    from hf_tuningfree.optim import available_optimizers, get_optimizer_spec

    name = optimizer.partition(VARIANT_SEPARATOR)[0]
    if name in available_optimizers():
        key = get_optimizer_spec(name).step_size_key
        if key is not None:
            return f"optim/{key}"
    return "learning_rate"


def curves(result: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Training loss, eval loss and effective step size over steps, from a run's log history."""
    out: dict[str, list[tuple[float, float]]] = {"train": [], "eval": [], "step_size": []}
    key = step_size_key(result.get("run", {}).get("optimizer", ""))
    for h in result.get("log_history", []):
        if "loss" in h:
            out["train"].append((h["step"], h["loss"]))
            if key in h:
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
    state_bytes_per_param: float
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
                state_bytes_per_param=_mean(
                    [r.get("optimizer_state_bytes_per_param", float("nan")) for r in ok]
                ),
                seeds=len(rs),
                diverged=diverged,
                errors=errors,
            )
        )
    return rows


@dataclass
class Verdict:
    """What a comparison found.

    ``goals`` maps each goal to True (met), False (not met) or None (not measured: nothing to
    compare, e.g. no AdamW at the stock lr with ``--no-stock-adamw``, or runs that failed).
    ``every_ratio`` holds the finite ratios only; ``failed`` names the tuning-free configurations
    without a result (``"diverged"`` or ``"error"``).
    """

    best_tuning_free: Row | None
    best_adamw: Row | None
    stock_adamw: Row | None
    best_ratio: float
    every_ratio: dict[str, float]
    goals: dict[str, bool | None]
    seeds: int
    runs_adamw: int
    failed: dict[str, str]
    grid_edge: str | None

    @property
    def runs_tuning_free(self) -> int:
        """Runs per tuning-free optimizer: one per seed (kept for earlier callers)."""
        return self.seeds


def outcome(row: Row) -> str:
    """``"ok"``, ``"diverged"`` (a seed's loss went NaN/Inf or its steps kept being skipped) or
    ``"error"`` (a run failed: bad input, a crash; no loss to report)."""
    if row.diverged:
        return "diverged"
    if math.isfinite(row.eval_loss):
        return "ok"
    return "error" if row.errors else "diverged"


def grid_edge(rows: list[Row]) -> str | None:
    """``"low"`` or ``"high"`` when the best AdamW of the grid is its lowest or highest learning
    rate (then a learning rate beyond it may be better, and the tuned baseline stronger than the
    grid shows); None when it is inside, or the grid has fewer than 3 points."""
    grid = sorted((r for r in rows if r.role == "adamw-grid" and r.lr), key=lambda r: r.lr or 0.0)
    finite = [r for r in grid if math.isfinite(r.eval_loss)]
    if len(grid) < 3 or not finite:
        return None
    best = min(finite, key=lambda r: r.eval_loss)
    if best is grid[-1]:
        return "high"
    if best is grid[0]:
        return "low"
    return None


def _goal(values: list[bool | None]) -> bool | None:
    """False if any part failed the goal, else None if any could not be measured, else True."""
    if any(v is False for v in values):
        return False
    if any(v is None for v in values) or not values:
        return None
    return True


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
    every = {r.optimizer: r.eval_loss / base for r in finite_tf} if best_adamw else {}
    failed = {r.optimizer: outcome(r) for r in tf if outcome(r) != "ok"}
    stock_ratio = (
        stock.eval_loss / base
        if stock and best_adamw and math.isfinite(stock.eval_loss)
        else float("nan")
    )

    def at_most(value: float, goal: float) -> bool | None:
        return value <= goal if math.isfinite(value) else None

    every_parts: list[bool | None] = [at_most(v, EVERY_RATIO_GOAL) for v in every.values()]
    every_parts += [False if why == "diverged" else None for why in failed.values()]
    if not best_adamw:
        every_parts = [None]
    stock_goal: bool | None
    if stock is not None and outcome(stock) == "diverged":
        stock_goal = True  # diverging at the stock lr is "clearly worse"
    else:
        stock_goal = stock_ratio > 1.05 if math.isfinite(stock_ratio) else None
    goals = {
        f"best tuning-free <= {BEST_RATIO_GOAL}x best AdamW": at_most(ratio, BEST_RATIO_GOAL),
        f"every tuning-free <= {EVERY_RATIO_GOAL}x best AdamW": _goal(every_parts),
        "AdamW at the stock lr clearly worse (> 1.05x best AdamW)": stock_goal,
    }
    return Verdict(
        best_tf,
        best_adamw,
        stock,
        ratio,
        every,
        goals,
        seeds=max((r.seeds for r in tf), default=0),
        runs_adamw=sum(r.seeds for r in grid if r.role == "adamw-grid"),
        failed=failed,
        grid_edge=grid_edge(rows),
    )
