"""What a comparison runs: one task, many runs (optimizer x learning rate x seed), each cached by
the hash of everything that determines its result.

Optimizers are named by registry name or by a *variant*, ``name:key=value,key=value``
(``prodigy:d_coef=2,beta3=0.99``): the registry optimizer with those hyperparameters, typed by the
registry (:func:`parse_optimizer`). A variant is written in one canonical form (keys sorted,
values as parsed: ``d_coef=2`` is ``d_coef=2.0``), which is its label in every table and part of
its cache key.

Cache keys (:meth:`RunSpec.key`) hash the task, the run and the package version. A tuning-free
run's key also hashes the source of the optimizer package (every file under
``hf_tuningfree/optim/``, C sources included: :func:`optim_source_hash`), so editing an optimizer
re-runs its runs; the AdamW baselines (torch's AdamW) do not depend on that code and stay cached,
until the task (model, data, budget, the task's ``version`` option) or the package version changes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The stock Trainer learning rate: what an AdamW user who tunes nothing gets.
STOCK_LR = 5e-5

ADAMW = "adamw_torch"

#: The task kind of any model and data (``hf_tuningfree.compare.tasks.custom_task``).
CUSTOM = "custom"

#: AdamW grids (lowest, highest learning rate) per fixed task kind: training from scratch wants
#: larger steps than fine-tuning. Chosen so that the best AdamW is inside the grid (the suite's
#: table marks a best at either end).
TASK_GRIDS = {
    "offline-gpt2": (1e-4, 1e-1),
    "smollm2-lora": (1e-5, 1e-2),
    "gpt2-long": (1e-4, 1e-1),
    "gpt2-shift-ft": (1e-5, 1e-2),
    "gpt2-shift-lora": (1e-4, 1e-1),
    "gpt2-shift-lora-short": (1e-4, 1e-1),
}

#: ``name:key=value,...``: a registry optimizer with other hyperparameters.
VARIANT_SEPARATOR = ":"

#: The optimizer package whose source enters the keys of tuning-free runs.
OPTIM_PACKAGE = Path(__file__).resolve().parent.parent / "optim"
_NOT_SOURCE = (".pyc", ".pyo", ".so", ".o", ".dll", ".dylib")


def optim_source_hash() -> str:
    """A digest of every source file under ``hf_tuningfree/optim/`` (names and contents; caches,
    compiled objects and hidden files left out), computed afresh on each call."""
    digest = hashlib.sha256()
    for path in sorted(OPTIM_PACKAGE.rglob("*")):
        relative = path.relative_to(OPTIM_PACKAGE)
        if not path.is_file() or path.name.endswith(_NOT_SOURCE):
            continue
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class OptimizerVariant:
    """A registry optimizer and the hyperparameters a variant sets (sorted by key)."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def text(self) -> str:
        """The canonical spelling: ``name`` or ``name:key=value,...`` (keys sorted)."""
        if not self.overrides:
            return self.name
        return self.name + VARIANT_SEPARATOR + self.optim_args

    @property
    def optim_args(self) -> str:
        """The overrides as ``TrainingArguments.optim_args`` text (``key=value,...``)."""
        return ",".join(f"{key}={value}" for key, value in self.overrides)

    def kwargs(self) -> dict[str, Any]:
        return dict(self.overrides)


def parse_optimizer(text: str) -> OptimizerVariant:
    """``name`` or ``name:key=value,key=value`` -> :class:`OptimizerVariant`, values typed by the
    registry (:func:`hf_tuningfree.optim.registry.parse_hyperparameter`) and checked by building
    the optimizer on a dummy tensor, so an out-of-range value fails here, not in a worker.

    Raises:
        ValueError: one line naming the variant and what is wrong (unknown optimizer or key, a
            value of the wrong type or out of range, a key given twice, a malformed entry).
    """
    import torch

    from hf_tuningfree.optim import available_optimizers, get_optimizer_spec
    from hf_tuningfree.optim.registry import parse_hyperparameter

    name, sep, rest = text.strip().partition(VARIANT_SEPARATOR)
    if name not in available_optimizers():
        raise ValueError(
            f"unknown optimizer {name!r} in {text!r}; valid: {', '.join(available_optimizers())}"
        )
    if sep and not rest.strip():
        raise ValueError(
            f"{text!r}: nothing after {VARIANT_SEPARATOR!r}; expected {name}:key=value"
        )
    overrides: dict[str, Any] = {}
    for item in rest.replace(" ", "").split(",") if rest else []:
        key, eq, value = item.partition("=")
        if not key or not eq or not value or "=" in value:
            raise ValueError(
                f"{text!r}: entry {item!r} is not key=value "
                f"(e.g. {name}:beta2=0.99,weight_decay=0.01)"
            )
        if key in overrides:
            raise ValueError(f"{text!r}: {key!r} is given twice")
        try:
            overrides[key] = parse_hyperparameter(name, key, value)
        except (ValueError, TypeError) as error:
            hint = " (set one entry of a tuple with beta1=..., beta2=...)" if key == "betas" else ""
            raise ValueError(f"{text!r}: {error}{hint}") from None
    try:
        get_optimizer_spec(name).build([torch.nn.Parameter(torch.zeros(2))], **overrides)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{text!r}: {error}") from None
    return OptimizerVariant(name, tuple(sorted(overrides.items())))


def parse_optimizers(texts: list[str]) -> list[str]:
    """The canonical spellings of ``texts`` (see :func:`parse_optimizer`), duplicates refused."""
    out: list[str] = []
    for text in texts:
        canonical = parse_optimizer(text).text
        if canonical in out:
            raise ValueError(f"optimizer {canonical!r} is listed twice")
        out.append(canonical)
    return out


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
    """One training run: ``optimizer`` (a registry name, a variant ``name:key=value,...`` in
    canonical form, or ``adamw_torch``), ``lr`` (None: the optimizer's recommended value),
    ``seed``."""

    optimizer: str
    lr: float | None
    seed: int
    role: str  # "tuning-free", "adamw-grid", "adamw-default"

    @property
    def label(self) -> str:
        if self.role == "tuning-free":
            return self.optimizer
        return f"adamw lr={self.lr:.0e}"

    @property
    def variant(self) -> OptimizerVariant:
        """The registry name and hyperparameter overrides (none for AdamW)."""
        if self.role != "tuning-free":
            return OptimizerVariant(self.optimizer)
        return parse_optimizer(self.optimizer)

    def key(self, task: TaskSpec) -> str:
        """Cache key: a hash of the task, the run and the library version; for tuning-free runs
        also of the optimizer package's source (:func:`optim_source_hash`)."""
        from hf_tuningfree import __version__

        payload: dict[str, Any] = {
            "task": task.to_dict(),
            "run": asdict(self),
            "version": __version__,
        }
        if self.role == "tuning-free":
            payload["optim_source"] = optim_source_hash()
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
        return digest.hexdigest()[:16]

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
