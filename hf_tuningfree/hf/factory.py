"""One public factory for ``Trainer(optimizers=...)`` and ``Trainer(optimizer_cls_and_kwargs=...)``.

::

    factory = OptimizerFactory("dadapt_adam", args)          # args: any TrainingArguments
    Trainer(model, args, optimizer_cls_and_kwargs=factory.cls_and_kwargs(), ...)
    # or, with the recommended schedule built in:
    Trainer(model, args, optimizers=factory.optimizers(model, num_training_steps), ...)

Both give the Trainer's own decay/no-decay grouping; ``args`` itself is not modified. The
registry's recommendations replace the values nobody set (see
:func:`~hf_tuningfree.hf.recommend.apply_recommended_defaults`) only where this route can apply
them, and the log line says exactly which:

- ``cls_and_kwargs()``: the learning rate only (it travels in the kwargs); the Trainer builds the
  scheduler, warm-up and clipping from ``args``;
- ``optimizers(...)``: the learning rate and the scheduler with its warm-up; clipping
  (``max_grad_norm``) is the Trainer's, from ``args``.

Recommendations the route cannot apply are named in a second line that says they were not
applied. The optimizer's hyperparameters are checked when the factory is created.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, get_scheduler

from hf_tuningfree.hf.recommend import (
    check_optimizer_arguments,
    describe_changes,
    optimizer_cls_and_kwargs,
    recommended_changes,
    set_recommended,
    wants_recommendations,
    warn_multiplier,
)
from hf_tuningfree.optim.registry import get_optimizer_spec

logger = logging.getLogger("hf_tuningfree")


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """The parameters the Trainer applies weight decay to (not biases, not norms)."""
    return Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]


def trainer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The Trainer's two groups: decayed weights, and biases/norms without decay (trainable
    parameters only, so a PEFT model gives only its adapters)."""
    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


#: The recommendable fields each route applies (the rest come from the Trainer's own args).
_APPLIED = {
    "cls_and_kwargs": ("learning_rate",),
    "optimizers": ("learning_rate", "lr_scheduler_type", "warmup_steps"),
}


class OptimizerFactory:
    """Builds registry optimizer ``name`` the way ``TuningFreeTrainer`` would.

    Args:
        name: registry name.
        args: the run's ``TrainingArguments`` (any class); None means the stock defaults.
        **overrides: hyperparameters that win over ``args`` and ``optim_args``.

    Raises:
        OptimizerArgumentError: a hyperparameter the optimizer rejects (checked at once).
    """

    def __init__(self, name: str, args: TrainingArguments | None = None, **overrides: Any) -> None:
        self.spec = get_optimizer_spec(name)
        effective = copy.copy(args) if args is not None else TrainingArguments("unused")
        effective.optim = name  # type: ignore[assignment]
        self.changes: dict[str, tuple[Any, Any]] = {}
        self._known = True
        if wants_recommendations(effective):
            self.changes, self._known = recommended_changes(effective)
        set_recommended(effective, self.changes)
        self.args = effective
        self.overrides = overrides
        check_optimizer_arguments(effective, **overrides)
        warn_multiplier(self.spec, effective.learning_rate)
        self._logged: set[str] = set()

    def _log(self, route: str) -> None:
        """One line for what ``route`` applies, one for the recommendations it cannot apply."""
        if route in self._logged or not self.changes:
            return
        self._logged.add(route)
        applied = {k: v for k, v in self.changes.items() if k in _APPLIED[route]}
        ignored = {k: v for k, v in self.changes.items() if k not in _APPLIED[route]}
        if applied:
            logger.warning(describe_changes(self.spec.name, applied, self._known, type(self.args)))
        if ignored:
            logger.warning(
                "hf_tuningfree: OptimizerFactory(%r).%s() does not apply the registry's "
                "recommendations %s: the Trainer takes them from its own TrainingArguments, which "
                "keep %s. Set them there to follow the recommendation.",
                self.spec.name,
                route,
                ", ".join(f"{k}={new!r}" for k, (_, new) in ignored.items()),
                ", ".join(f"{k}={old!r}" for k, (old, _) in ignored.items()),
            )

    def cls_and_kwargs(self) -> tuple[type, dict[str, Any]]:
        """For ``Trainer(optimizer_cls_and_kwargs=...)``."""
        self._log("cls_and_kwargs")
        return optimizer_cls_and_kwargs(self.args, **self.overrides)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        cls, kwargs = optimizer_cls_and_kwargs(self.args, **self.overrides)
        return cls(trainer_param_groups(model, self.args.weight_decay), **kwargs)

    def scheduler(
        self, optimizer: torch.optim.Optimizer, num_training_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        return get_scheduler(
            self.args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )

    def optimizers(
        self, model: torch.nn.Module, num_training_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """For ``Trainer(optimizers=(optimizer, scheduler))``."""
        self._log("optimizers")
        opt = self.optimizer(model)
        return opt, self.scheduler(opt, num_training_steps)
