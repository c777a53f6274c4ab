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

It also wraps ``Trainer.__init__`` once: a trainer whose ``args.optim`` is a registry name gets
what :class:`~hf_tuningfree.hf.trainer.TuningFreeTrainer` adds (its class becomes a subclass
combining :class:`~hf_tuningfree.hf.trainer.TuningFreeTrainerMixin` with the trainer's own class,
so ``isinstance(trainer, SFTTrainer)`` still holds, and the
:class:`~hf_tuningfree.hf.callback.TuningFreeCallback` is registered): ``optim/...`` statistics in
``log_history`` and every ``report_to`` integration, skipped steps watched, the iterate average for
evaluation, ``save_model`` and checkpoints (the DoG family), exact resume, the optimizer section in
the model card. Trainers with stock optimizers are left untouched.

Differences from ``TuningFreeTrainer`` with ``TuningFreeTrainingArguments``, both because a stock
``TrainingArguments`` has no fields for them:

- recommendations replace values *equal to the class defaults* (``learning_rate`` 5e-5, or
  SFTConfig's 2e-5, ``lr_scheduler_type`` linear, ``warmup_steps`` 0, ``max_grad_norm`` 1.0), as
  a stock class cannot tell an explicit 5e-5 from none; the log line says so.
  ``install(recommended_defaults=False)`` keeps every value as given;
- they are applied, and the optimizer's hyperparameters checked, when the Trainer creates the
  optimizer (``trainer.train()``), not when the arguments are built;
- ``average_weights``, ``averaging_gamma`` and ``max_consecutive_skipped_steps`` come from
  ``install()``'s arguments (the registry's recommendation, 8.0 and 5 by default) unless the
  arguments object has those attributes.
"""

from __future__ import annotations

import functools
from enum import Enum
from typing import Any

import transformers
from transformers.training_args import OptimizerNames

from hf_tuningfree.hf import recommend
from hf_tuningfree.hf.callback import DEFAULT_MAX_CONSECUTIVE_SKIPPED
from hf_tuningfree.hf.recommend import is_registry_optimizer, registry_optimizer_cls_and_kwargs
from hf_tuningfree.hf.trainer import TuningFreeTrainerMixin
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
    return registry_optimizer_cls_and_kwargs(ctx.args)


#: What :func:`install` was last called with, read by the wrapped ``Trainer.__init__``.
_SETTINGS: dict[str, Any] = {
    "extend_trainers": True,
    "max_consecutive_skipped_steps": DEFAULT_MAX_CONSECUTIVE_SKIPPED,
    "average_weights": None,
}
_ORIGINAL_INIT = "_hf_tuningfree_original_init"
_CLASSES: dict[type, type] = {}


def tuning_free_class(cls: type) -> type:
    """``cls`` with :class:`TuningFreeTrainerMixin` in front (one class per ``cls``)."""
    if issubclass(cls, TuningFreeTrainerMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"TuningFree{cls.__name__}",
            (TuningFreeTrainerMixin, cls),
            {"__module__": cls.__module__, "__doc__": cls.__doc__},
        )
    return _CLASSES[cls]


def extend_trainer(trainer: Any) -> Any:
    """Give a stock ``Trainer`` (or subclass) instance what ``TuningFreeTrainer`` adds; a no-op
    for tuning-free trainers and for stock optimizers. Returns ``trainer``."""
    if isinstance(trainer, TuningFreeTrainerMixin) or not is_registry_optimizer(trainer.args.optim):
        return trainer
    trainer.__class__ = tuning_free_class(type(trainer))
    trainer._setup_tuning_free(
        max_consecutive_skipped_steps=_SETTINGS["max_consecutive_skipped_steps"],
        average_weights=_SETTINGS["average_weights"],
    )
    return trainer


def _wrap_trainer_init() -> None:
    if hasattr(transformers.Trainer, _ORIGINAL_INIT):
        return
    original = transformers.Trainer.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if _SETTINGS["extend_trainers"]:
            extend_trainer(self)

    setattr(transformers.Trainer, _ORIGINAL_INIT, original)
    transformers.Trainer.__init__ = __init__  # type: ignore[method-assign]


def install(
    *,
    recommended_defaults: bool = True,
    extend_trainers: bool = True,
    max_consecutive_skipped_steps: int = DEFAULT_MAX_CONSECUTIVE_SKIPPED,
    average_weights: bool | None = None,
) -> list[str]:
    """Register every registry optimizer with the stock Trainer; returns the names. Idempotent;
    call again after registering optimizers of your own (the last call's settings apply).

    Args:
        recommended_defaults: replace values equal to the arguments class's defaults by the
            registry's recommendations (arguments with a ``tuning_free_defaults`` field use it).
        extend_trainers: give every ``Trainer`` with a registry ``optim`` what
            ``TuningFreeTrainer`` adds (see the module docstring); False: only the names.
        max_consecutive_skipped_steps: stop after this many consecutive skipped steps (0: never).
        average_weights: iterate averaging for evaluation and saving; None: the registry's
            recommendation (on for the DoG family).
    """
    if not isinstance(max_consecutive_skipped_steps, int) or max_consecutive_skipped_steps < 0:
        raise ValueError(
            "max_consecutive_skipped_steps must be an int >= 0 (0: never stop), got "
            f"{max_consecutive_skipped_steps!r}"
        )
    table = _handler_table()
    names = available_optimizers()
    for name in names:
        table[_add_enum_member(OptimizerNames, name)] = _registry_handler
    recommend.STOCK_ARGUMENTS_GET_RECOMMENDATIONS = bool(recommended_defaults)
    _SETTINGS.update(
        extend_trainers=bool(extend_trainers),
        max_consecutive_skipped_steps=max_consecutive_skipped_steps,
        average_weights=average_weights,
    )
    _wrap_trainer_init()
    return names


def is_installed(name: str) -> bool:
    table = _handler_table()
    return name in OptimizerNames._value2member_map_ and table.get(name) is _registry_handler
