"""What a comparison runs: one task, many runs (optimizer x learning rate x seed), each cached by
the hash of everything that determines its result."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: The stock Trainer learning rate: what an AdamW user who tunes nothing gets.
STOCK_LR = 5e-5

ADAMW = "adamw_torch"

#: The task kind of any model and data (``hf_tuningfree.compare.tasks.custom_task``).
CUSTOM = "custom"


@dataclass(frozen=True)
class TaskSpec:
    """One model + data set + training budget; every run of a comparison shares it.

    ``kind`` selects the builder in :mod:`hf_tuningfree.compare.tasks`; the other fields are
    passed to it. Steps, batch size, evaluation cadence and the multiple-choice scoring are
    identical for every run.
    """

    kind: str
    model: str
    data: str
    max_steps: int
    batch_size: int = 16
    block_size: int = 128
    eval_every: int = 25
    logging_every: int = 5
    mc_data: str | None = "synthetic"
    mc_shots: int = 0
    mc_questions_per_subject: int = 20
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return cls(**data)


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``optimizer`` (registry name or ``adamw_torch``), ``lr`` (None: the
    optimizer's recommended value), ``seed``."""

    optimizer: str
    lr: float | None
    seed: int
    role: str  # "tuning-free", "adamw-grid", "adamw-default"

    @property
    def label(self) -> str:
        if self.role == "tuning-free":
            return self.optimizer
        return f"adamw lr={self.lr:.0e}"

    def key(self, task: TaskSpec) -> str:
        """Cache key: a hash of the task and the run (and the library version)."""
        from hf_tuningfree import __version__

        payload = json.dumps(
            {"task": task.to_dict(), "run": asdict(self), "version": __version__},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**data)


def log_grid(low: float, high: float, points: int) -> list[float]:
    """``points`` learning rates spaced evenly in log space from ``low`` to ``high``, rounded to
    three significant digits (so labels and cache keys are stable)."""
    if points < 1 or low <= 0 or high < low:
        raise ValueError(f"Invalid grid: low={low}, high={high}, points={points}")
    if points == 1:
        return [float(f"{low:.3g}")]
    step = (math.log10(high) - math.log10(low)) / (points - 1)
    return [float(f"{10 ** (math.log10(low) + i * step):.3g}") for i in range(points)]


def build_runs(
    optimizers: list[str], adamw_lrs: list[float], seeds: list[int], include_stock: bool = True
) -> list[RunSpec]:
    """Every tuning-free optimizer at its defaults, AdamW over the grid, AdamW at the stock lr."""
    runs: list[RunSpec] = []
    for seed in seeds:
        runs += [RunSpec(name, None, seed, "tuning-free") for name in optimizers]
        runs += [RunSpec(ADAMW, lr, seed, "adamw-grid") for lr in adamw_lrs]
        if include_stock and STOCK_LR not in adamw_lrs:
            runs.append(RunSpec(ADAMW, STOCK_LR, seed, "adamw-default"))
    return runs
