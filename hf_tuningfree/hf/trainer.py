"""``TuningFreeTrainer``: the transformers ``Trainer`` with the registry's optimizers.

On top of the stock Trainer it
- builds registry optimizers from ``args.optim`` with the Trainer's decay/no-decay grouping;
- adds the optimizer's own statistics (``optimizer.stats()``: D-Adaptation's ``d``, DoG's ``eta``,
  the learned hyper-step sizes, ...) to every training log under ``optim/...`` keys, so they reach
  ``state.log_history`` and every ``report_to`` integration; ``learning_rate`` stays the schedule's
  multiplier;
- optionally keeps a polynomial-decay iterate average (Ivgi et al., ICML 2023) and uses it for
  evaluation, ``save_model`` and checkpoints, while training continues on the training weights;
  checkpoints carry the averager and the training weights, so a resume is exact;
- writes the optimizer, its hyperparameters, its final adapted values and the paper into the model
  card.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from hf_tuningfree.hf.model_card import optimizer_card_section, rewrite_optimizer_line
from hf_tuningfree.hf.recommend import (
    is_registry_optimizer,
    optim_name,
    optimizer_cls_and_kwargs,
)
from hf_tuningfree.hf.schedule_free import ScheduleFreeCallback, eval_mode
from hf_tuningfree.optim.registry import get_optimizer_spec

AVERAGER_FILE = "averager.pt"
TRAINING_WEIGHTS_FILE = "training_weights.pt"


def unwrap_optimizer(optimizer: Any) -> Any:
    """The user-facing optimizer inside Accelerate/DeepSpeed wrappers."""
    seen = 0
    while optimizer is not None and not hasattr(optimizer, "stats") and seen < 4:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def optimizer_log_values(optimizer: Any) -> dict[str, float]:
    """``optimizer.stats()`` as ``optim/<key>`` entries (empty for optimizers without stats)."""
    inner = unwrap_optimizer(optimizer)
    stats = getattr(inner, "stats", None)
    if stats is None:
        return {}
    return {f"optim/{k}": float(v) for k, v in stats().items()}


class _AveragingCallback(TrainerCallback):
    """Folds the weights into the average after every optimizer step that was not skipped."""

    def __init__(self, trainer: TuningFreeTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._update_average()


class TuningFreeTrainer(Trainer):
    """``transformers.Trainer`` that understands ``optim="<registry name>"``.

    Use it with :class:`~hf_tuningfree.hf.args.TuningFreeTrainingArguments` (or stock
    ``TrainingArguments`` after :func:`hf_tuningfree.hf.install`). Everything else is the stock
    Trainer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(ScheduleFreeCallback())  # schedule-free: x for saving, after training
        self.averager: Any = None
        if self._wants_averaging():
            from hf_tuningfree.optim.averaging import PolynomialDecayAverager

            gamma = float(getattr(self.args, "averaging_gamma", 8.0))
            self.averager = PolynomialDecayAverager(self.model, gamma=gamma)
            self.add_callback(_AveragingCallback(self))

    # ------------------------------------------------------------------ optimizer
    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if is_registry_optimizer(args.optim):
            return optimizer_cls_and_kwargs(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.optimizer is not None:
            logs.update(optimizer_log_values(self.optimizer))
        super().log(logs, start_time)

    # ------------------------------------------------------------------ iterate averaging
    def _wants_averaging(self) -> bool:
        requested = getattr(self.args, "average_weights", None)
        if requested is not None:
            return bool(requested)
        if is_registry_optimizer(self.args.optim):
            spec = get_optimizer_spec(optim_name(self.args))
            return bool(spec.trainer_defaults.get("average_weights", False))
        return False

    def _update_average(self) -> None:
        if self.averager is None:
            return
        wrapped = self.optimizer
        if getattr(wrapped, "step_was_skipped", False):  # fp16 GradScaler skipped the step
            return
        inner = unwrap_optimizer(wrapped)
        self.averager.update(skipped=getattr(inner, "last_step_skipped", False))

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Swap the iterate average into the model for the duration (no-op without averaging or
        before the first update, and when already swapped in)."""
        averager = self.averager
        if averager is None or averager.num_updates == 0 or averager.is_swapped:
            yield
            return
        with averager.swapped():
            yield

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with self.averaged_weights():
            return super().evaluate(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        eval_mode(self.optimizer)  # schedule-free optimizers: save the average x
        with self.averaged_weights():
            super().save_model(output_dir, _internal_call=_internal_call)

    def _averager_file(self, name: str) -> str:
        if self.args.world_size > 1 and self.is_fsdp_enabled:
            stem, ext = os.path.splitext(name)
            return f"{stem}_rank{self.args.process_index}{ext}"
        return name

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.averager is None or self.averager.num_updates == 0:
            return
        if not (self.args.should_save or self.is_fsdp_enabled):
            return
        # The checkpoint's model file holds the average; keep the training weights beside it.
        training = {n: t.detach().clone() for n, t in self.averager.tracked_tensors().items()}
        torch.save(
            self.averager.state_dict(), os.path.join(output_dir, self._averager_file(AVERAGER_FILE))
        )
        torch.save(training, os.path.join(output_dir, self._averager_file(TRAINING_WEIGHTS_FILE)))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.averager is None:
            return
        avg_path = os.path.join(checkpoint, self._averager_file(AVERAGER_FILE))
        weights_path = os.path.join(checkpoint, self._averager_file(TRAINING_WEIGHTS_FILE))
        if not os.path.exists(avg_path):
            return
        self.averager.load_state_dict(torch.load(avg_path, weights_only=True))
        training = torch.load(weights_path, weights_only=True, map_location="cpu")
        with torch.no_grad():
            for name, tensor in self.averager.tracked_tensors().items():
                tensor.copy_(training[name])

    # ------------------------------------------------------------------ model card
    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero() or not is_registry_optimizer(self.args.optim):
            return
        path = os.path.join(self.args.output_dir, "README.md")
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        inner = unwrap_optimizer(self.optimizer)
        text = rewrite_optimizer_line(text, optim_name(self.args), inner)
        text = (
            text.rstrip("\n")
            + "\n\n"
            + optimizer_card_section(
                optim_name(self.args), inner, averaged=self.averager is not None
            )
        )
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
