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
from transformers.training_args import OptimizerNames

from hf_tuningfree.hf.recommend import (
    apply_recommended_defaults,
    check_compatible,
    is_registry_optimizer,
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


@dataclass
class TuningFreeTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the hf_tuningfree optimizers and their recommendations.

    Extra fields:
        tuning_free_defaults: apply the registry's recommended ``learning_rate``,
            ``lr_scheduler_type``, ``warmup_steps`` and ``max_grad_norm`` wherever they are still
            at the stock defaults (explicit values always win). One log line says what changed.
        average_weights: evaluate and save the iterate average (``None``: the optimizer's
            recommendation, on for the DoG family).
        averaging_gamma: ``gamma`` of the polynomial-decay average (Ivgi et al. 2023 use 8).
    """

    optim: str = field(  # type: ignore[assignment]
        default=stock_default("optim").value
        if hasattr(stock_default("optim"), "value")
        else stock_default("optim"),
        metadata={"help": _optim_help(), "choices": OptimChoices(), "metavar": "NAME"},
    )
    tuning_free_defaults: bool = field(
        default=True,
        metadata={
            "help": "Apply the optimizer's recommended learning rate, scheduler, warm-up and "
            "gradient clipping where the stock defaults are still in place."
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

    def __post_init__(self) -> None:
        name = getattr(self.optim, "value", self.optim)
        if name not in OptimChoices():
            raise ValueError(f"Unknown optim {name!r}; valid names: {', '.join(OptimChoices())}")
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

    def set_optimizer(self, name: str | OptimizerNames = "adamw_torch", **kwargs: Any) -> Any:
        """As ``TrainingArguments.set_optimizer``, also for registry names."""
        value = getattr(name, "value", name)
        if not is_registry_optimizer(value):
            return super().set_optimizer(name=name, **kwargs)
        super().set_optimizer(name=_PLACEHOLDER, **kwargs)
        self.optim = value
        check_compatible(self)
        if self.tuning_free_defaults:
            apply_recommended_defaults(self)
        return self
