"""One public factory for ``Trainer(optimizers=...)`` and ``Trainer(optimizer_cls_and_kwargs=...)``.

::

    factory = OptimizerFactory("dadapt_adam", args)          # args: any TrainingArguments
    Trainer(model, args, optimizer_cls_and_kwargs=factory.cls_and_kwargs(), ...)
    # or, with the recommended schedule built in:
    Trainer(model, args, optimizers=factory.optimizers(model, num_training_steps), ...)

Both give the Trainer's own decay/no-decay grouping and the registry's recommended values where
``args`` still holds the stock defaults (``args`` itself is not modified). With
``optimizer_cls_and_kwargs`` the Trainer still builds its scheduler from ``args``;
``optimizers(...)`` returns the recommended scheduler too.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, get_scheduler

from hf_tuningfree.hf.recommend import apply_recommended_defaults, optimizer_cls_and_kwargs
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


class OptimizerFactory:
    """Builds registry optimizer ``name`` the way ``TuningFreeTrainer`` would.

    Args:
        name: registry name.
        args: the run's ``TrainingArguments`` (any class); None means the stock defaults.
        **overrides: hyperparameters that win over ``args`` and ``optim_args``.
    """

    def __init__(self, name: str, args: TrainingArguments | None = None, **overrides: Any) -> None:
        self.spec = get_optimizer_spec(name)
        effective = copy.copy(args) if args is not None else TrainingArguments("unused")
        effective.optim = name  # type: ignore[assignment]
        if getattr(effective, "tuning_free_defaults", True):
            apply_recommended_defaults(effective)
        self.args = effective
        self.overrides = overrides

    def cls_and_kwargs(self) -> tuple[type, dict[str, Any]]:
        """For ``Trainer(optimizer_cls_and_kwargs=...)``."""
        return optimizer_cls_and_kwargs(self.args, **self.overrides)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        cls, kwargs = self.cls_and_kwargs()
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
        opt = self.optimizer(model)
        return opt, self.scheduler(opt, num_training_steps)
