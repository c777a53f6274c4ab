"""``TrainingArguments`` accepting the registry's optimizers: ``optim="adopt"``, ``--optim adopt``.

Stock ``TrainingArguments.__post_init__`` converts ``optim`` with ``OptimizerNames(optim)``, which
rejects any other name, and the stock ``HfArgumentParser`` turns the Enum into a fixed ``choices``
list. This subclass redeclares ``optim`` as a string whose ``choices`` container reads the registry
(so names registered later are accepted too), swaps a stock placeholder in around the parent's
``__post_init__`` and restores the registry name afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from hf_tuningfree.hf.callback import DEFAULT_MAX_CONSECUTIVE_SKIPPED
from hf_tuningfree.hf.errors import OptimizerArgumentError
from hf_tuningfree.hf.recommend import (
    RECOMMENDABLE,
    apply_recommended_defaults,
    check_compatible,
    check_optimizer_arguments,
    is_registry_optimizer,
    mark_set,
    mark_unset,
    stock_default,
)
from hf_tuningfree.optim.registry import available_optimizers

_PLACEHOLDER = OptimizerNames.ADAMW_TORCH.value


class OptimChoices:
    """Every stock ``OptimizerNames`` value plus every registry name, read at lookup time.

    Used as argparse ``choices``: ``in`` validates, iteration lists the valid names in errors.
    """

    def __contains__(self, item: object) -> bool:
        value = getattr(item, "value", item)
        return value in available_optimizers() or value in {o.value for o in OptimizerNames}

    def __iter__(self) -> Iterator[str]:
        yield from available_optimizers()
        yield from (o.value for o in OptimizerNames if o.value not in available_optimizers())

    def __repr__(self) -> str:
        return f"OptimChoices({list(self)})"


def _optim_help() -> str:
    return (
        "The optimizer: a tuning-free one from hf_tuningfree ("
        + ", ".join(available_optimizers())
        + ") or any stock transformers OptimizerNames value (e.g. adamw_torch_fused)."
    )


_NOT_SET_HELP = (
    " Default: the optimizer's recommendation for registry optimizers (see `hf-tuningfree "
    "optimizers` and the registry's trainer_defaults), else {stock!r} as in TrainingArguments; an "
    "explicit value always wins, even one equal to {stock!r}."
)


def _not_set_metadata(name: str, text: str, **metadata: Any) -> dict[str, Any]:
    """Metadata of a field that defaults to ``None`` ("not set"), so that an explicit value equal
    to the stock default can be told apart from no value at all."""
    stock = stock_default(name)
    return {"help": text + _NOT_SET_HELP.format(stock=getattr(stock, "value", stock)), **metadata}


@dataclass
class TuningFreeTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the hf_tuningfree optimizers and their recommendations.

    ``learning_rate``, ``lr_scheduler_type``, ``warmup_steps`` and ``max_grad_norm`` default to
    ``None``, meaning "not set": after construction they hold a value, the registry's
    recommendation for a registry optimizer (``tuning_free_defaults``) or the stock default, and
    the object remembers which ones it filled in. So ``--learning_rate 5e-5`` given explicitly
    stays 5e-5 with ``--optim dog``, while leaving it out gives DoG's 1.0; one log line names
    exactly what was filled in.

    Extra fields:
        tuning_free_defaults: fill the fields that were not set with the registry's recommended
            values (False: with the stock defaults). One log line says what was filled in.
        average_weights: evaluate and save the iterate average (``None``: the optimizer's
            recommendation, on for the DoG family).
        averaging_gamma: ``gamma`` of the polynomial-decay average (Ivgi et al. 2023 use 8).
        max_consecutive_skipped_steps: stop training with an error after this many consecutive
            optimizer steps skipped for NaN/Inf gradients (0: never stop); see
            :class:`~hf_tuningfree.hf.callback.TuningFreeCallback`.

    The optimizer's own checks (ranges of ``lr``, ``betas``, ``eps``, ``weight_decay``, unknown
    ``optim_args`` keys) run when the arguments are built, so a bad value fails before any model
    is loaded (:class:`~hf_tuningfree.hf.errors.OptimizerArgumentError`).
    """

    optim: str = field(  # type: ignore[assignment]
        default=stock_default("optim").value
        if hasattr(stock_default("optim"), "value")
        else stock_default("optim"),
        metadata={"help": _optim_help(), "choices": OptimChoices(), "metavar": "NAME"},
    )
    learning_rate: float | None = field(  # type: ignore[assignment]
        default=None,
        metadata=_not_set_metadata(
            "learning_rate", "The initial learning rate (D-Adaptation, Prodigy, DoG: a multiplier)."
        ),
    )
    lr_scheduler_type: SchedulerType | str | None = field(  # type: ignore[assignment]
        default=None,
        metadata=_not_set_metadata(
            "lr_scheduler_type",
            "The learning-rate scheduler.",
            choices=[s.value for s in SchedulerType],
        ),
    )
    warmup_steps: float | None = field(  # type: ignore[assignment]
        default=None,
        metadata=_not_set_metadata(
            "warmup_steps", "Linear warm-up: steps (>= 1) or a fraction of all steps (< 1)."
        ),
    )
    max_grad_norm: float | None = field(  # type: ignore[assignment]
        default=None,
        metadata=_not_set_metadata("max_grad_norm", "Gradient clipping norm (0: no clipping)."),
    )
    tuning_free_defaults: bool = field(
        default=True,
        metadata={
            "help": "Fill learning_rate, lr_scheduler_type, warmup_steps and max_grad_norm, "
            "where they were not set, with the optimizer's recommendations (false: the stock "
            "defaults)."
        },
    )
    average_weights: bool | None = field(
        default=None,
        metadata={
            "help": "Evaluate and save the polynomial-decay iterate average (default: the "
            "optimizer's recommendation, on for DoG/L-DoG/T-DoG)."
        },
    )
    averaging_gamma: float = field(
        default=8.0, metadata={"help": "gamma of the polynomial-decay iterate average."}
    )
    max_consecutive_skipped_steps: int = field(
        default=DEFAULT_MAX_CONSECUTIVE_SKIPPED,
        metadata={
            "help": "Stop training with an error after this many consecutive optimizer steps "
            "skipped because a gradient held NaN/Inf (hf_tuningfree optimizers skip such steps "
            "and leave the weights unchanged); 0 never stops. On CUDA the count is read at "
            "logging steps (no extra host sync), so the stop can come up to logging_steps later."
        },
    )

    def __post_init__(self) -> None:
        name = getattr(self.optim, "value", self.optim)
        if name not in OptimChoices():
            raise OptimizerArgumentError(
                f"Unknown optim {name!r}; valid names: {', '.join(OptimChoices())}"
            )
        if self.max_consecutive_skipped_steps < 0:
            raise OptimizerArgumentError(
                "max_consecutive_skipped_steps must be >= 0 (0: never stop), got "
                f"{self.max_consecutive_skipped_steps}"
            )
        filled = {key: stock_default(key) for key in RECOMMENDABLE if getattr(self, key) is None}
        for key, value in filled.items():
            setattr(self, key, value)
        mark_unset(self, filled)
        if not is_registry_optimizer(name):
            super().__post_init__()
            return
        self.optim = name
        check_compatible(self)  # before the parent, which would start DeepSpeed's set-up
        self.optim = _PLACEHOLDER
        try:
            super().__post_init__()
        finally:
            self.optim = name
        if self.tuning_free_defaults:
            apply_recommended_defaults(self)
        check_optimizer_arguments(self)

    def set_optimizer(self, name: str | OptimizerNames = "adamw_torch", **kwargs: Any) -> Any:
        """As ``TrainingArguments.set_optimizer``, also for registry names; a ``learning_rate``
        left out counts as not set (the stock method would reset it to 5e-5)."""
        value = getattr(name, "value", name)
        if not is_registry_optimizer(value):
            return super().set_optimizer(name=name, **kwargs)
        super().set_optimizer(name=_PLACEHOLDER, **kwargs)
        self.optim = value
        if "learning_rate" in kwargs:
            mark_set(self, "learning_rate")
        else:
            mark_unset(self, {"learning_rate": self.learning_rate})
        check_compatible(self)
        if self.tuning_free_defaults:
            apply_recommended_defaults(self)
        check_optimizer_arguments(self)
        return self
