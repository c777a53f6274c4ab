"""Teach the stock ``transformers.Trainer`` (and subclasses such as TRL's ``SFTTrainer``) the
registry's optimizers with one explicit call::

    import hf_tuningfree.hf
    hf_tuningfree.hf.install()
    args = TrainingArguments("out", optim="dadapt_adam")   # or SFTConfig(..., optim=...)
    trainer = Trainer(model, args, ...)                      # builds DAdaptAdam

It uses the optimizer handler table transformers exposes (``trainer_optimizer._OPTIMIZER_HANDLERS``)
and adds the registry names to ``OptimizerNames`` so that ``TrainingArguments`` and
``HfArgumentParser`` (``--optim dadapt_adam``) accept them. Call it before creating the arguments
or the parser. Where the installed transformers has no handler table, it raises and says what to
use instead; it never half-works.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import transformers
from transformers.training_args import OptimizerNames

from hf_tuningfree.hf.recommend import (
    apply_recommended_defaults,
    check_compatible,
    optimizer_cls_and_kwargs,
)
from hf_tuningfree.optim.registry import available_optimizers


def _handler_table() -> dict[Any, Any]:
    try:
        from transformers import trainer_optimizer
    except ImportError:
        trainer_optimizer = None  # type: ignore[assignment]
    table = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(table, dict):
        raise RuntimeError(
            f"transformers {transformers.__version__} has no optimizer handler table "
            "(transformers.trainer_optimizer._OPTIMIZER_HANDLERS), so hf_tuningfree.hf.install() "
            "cannot teach the stock Trainer new optimizers. Use "
            "hf_tuningfree.TuningFreeTrainer with TuningFreeTrainingArguments, or pass "
            "Trainer(optimizers=OptimizerFactory(name, args).optimizers(model, steps))."
        )
    return table


def _add_enum_member(enum_cls: type[Enum], value: str) -> Enum:
    """Add ``value`` as a member of a ``str`` Enum (what ``aenum.extend_enum`` does)."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    name = value.upper()
    member = str.__new__(enum_cls, value)  # type: ignore[call-overload]
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls  # type: ignore[attr-defined]
    member._sort_order_ = len(enum_cls._member_names_)  # type: ignore[attr-defined]
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)  # type: ignore[attr-defined]
    return member


def _registry_handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    """Handler for the stock Trainer: the same construction as ``TuningFreeTrainer``."""
    args = ctx.args
    check_compatible(args)
    if getattr(args, "tuning_free_defaults", True):
        apply_recommended_defaults(args)
    return optimizer_cls_and_kwargs(args)


def install() -> list[str]:
    """Register every registry optimizer with the stock Trainer; returns the names. Idempotent;
    call again after registering optimizers of your own."""
    table = _handler_table()
    names = available_optimizers()
    for name in names:
        table[_add_enum_member(OptimizerNames, name)] = _registry_handler
    return names


def is_installed(name: str) -> bool:
    table = _handler_table()
    return name in OptimizerNames._value2member_map_ and table.get(name) is _registry_handler
