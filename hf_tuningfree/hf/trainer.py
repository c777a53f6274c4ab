"""``TuningFreeTrainer``: the transformers ``Trainer`` with the registry's optimizers.

On top of the stock Trainer it
- builds registry optimizers from ``args.optim`` with the Trainer's decay/no-decay grouping;
- adds the optimizer's own statistics (``optimizer.stats()``: D-Adaptation's ``d``, DoG's ``eta``,
  the learned hyper-step sizes, ...) to every training log under ``optim/...`` keys, so they reach
  ``state.log_history`` and every ``report_to`` integration; ``learning_rate`` stays the schedule's
  multiplier;
- watches steps the optimizer skipped for NaN/Inf gradients: logs them and stops with a clear
  error after ``max_consecutive_skipped_steps`` in a row (:mod:`hf_tuningfree.hf.callback`);
- optionally keeps a polynomial-decay iterate average (Ivgi et al., ICML 2023) and uses it for
  evaluation, ``save_model`` and checkpoints, while training continues on the training weights;
  checkpoints carry the averager and the training weights, so a resume is exact; a checkpoint
  another optimizer wrote is refused with a message instead of a ``KeyError`` in ``step()``;
- writes the optimizer, its hyperparameters, its final adapted values and the paper into the model
  card.

All of it lives in :class:`TuningFreeTrainerMixin`: :class:`TuningFreeTrainer` is the mixin on
``Trainer``, and :func:`hf_tuningfree.hf.install` gives it to the stock ``Trainer`` and its
subclasses, so the two routes behave the same.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer

from hf_tuningfree.hf.callback import (
    DEFAULT_MAX_CONSECUTIVE_SKIPPED,
    TuningFreeCallback,
    unwrap_optimizer,
)
from hf_tuningfree.hf.errors import ResumeError
from hf_tuningfree.hf.model_card import optimizer_card_section, rewrite_optimizer_line
from hf_tuningfree.hf.recommend import (
    is_registry_optimizer,
    optim_name,
    registry_optimizer_cls_and_kwargs,
)
from hf_tuningfree.hf.schedule_free import ScheduleFreeCallback, eval_mode
from hf_tuningfree.optim.registry import get_optimizer_spec

AVERAGER_FILE = "averager.pt"
TRAINING_WEIGHTS_FILE = "training_weights.pt"


def optimizer_log_values(optimizer: Any) -> dict[str, float]:
    """``optimizer.stats()`` as ``optim/<key>`` entries (empty for optimizers without stats)."""
    inner = unwrap_optimizer(optimizer)
    stats = getattr(inner, "stats", None)
    if stats is None:
        return {}
    return {f"optim/{k}": float(v) for k, v in stats().items()}


#: Written into each checkpoint by the tuning-free trainers: which optimizer wrote it.
OPTIMIZER_FILE = "hf_tuningfree_optimizer.json"
#: Group keys ``torch.optim.Optimizer.load_state_dict`` never restores (torch 2.13 drops
#: ``differentiable`` from loaded groups), so their absence says nothing about the checkpoint.
_NOT_RESTORED = frozenset({"differentiable"})


class TuningFreeTrainerMixin:
    """What the tuning-free trainers add to a ``transformers.Trainer`` (class or subclass).

    :class:`TuningFreeTrainer` is this mixin on ``Trainer``; :func:`hf_tuningfree.hf.install`
    puts it on the class of every stock ``Trainer`` (or subclass, e.g. TRL's ``SFTTrainer``)
    created with a registry ``optim``, so both routes behave the same: the optimizer's
    statistics in the logs, skipped steps watched (:class:`~hf_tuningfree.hf.callback.
    TuningFreeCallback`), the iterate average for evaluation and saving, exact resume, the
    optimizer section in the model card.
    """

    def _setup_tuning_free(
        self,
        *,
        max_consecutive_skipped_steps: int | None = None,
        average_weights: bool | None = None,
    ) -> None:
        """Create the averager (when wanted) and register the callback; call once, after
        ``Trainer.__init__``. The arguments are used where ``self.args`` has no such field (a
        stock ``TrainingArguments``)."""
        self.add_callback(ScheduleFreeCallback())  # schedule-free: x for saving, after training
        self.averager: Any = None
        if self._wants_averaging(average_weights):
            from hf_tuningfree.optim.averaging import PolynomialDecayAverager

            gamma = float(getattr(self.args, "averaging_gamma", 8.0))
            self.averager = PolynomialDecayAverager(self.model, gamma=gamma)
        limit = getattr(self.args, "max_consecutive_skipped_steps", None)
        if limit is None:
            limit = (
                DEFAULT_MAX_CONSECUTIVE_SKIPPED
                if max_consecutive_skipped_steps is None
                else max_consecutive_skipped_steps
            )
        self.tuning_free_callback = TuningFreeCallback(limit, averager=self.averager)
        self.add_callback(self.tuning_free_callback)

    # ------------------------------------------------------------------ optimizer
    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if is_registry_optimizer(args.optim):
            return registry_optimizer_cls_and_kwargs(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.optimizer is not None:
            logs.update(optimizer_log_values(self.optimizer))
        super().log(logs, start_time)

    # ------------------------------------------------------------------ iterate averaging
    def _wants_averaging(self, default: bool | None = None) -> bool:
        requested = getattr(self.args, "average_weights", default)
        if requested is not None:
            return bool(requested)
        if is_registry_optimizer(self.args.optim):
            spec = get_optimizer_spec(optim_name(self.args))
            return bool(spec.trainer_defaults.get("average_weights", False))
        return False

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
        if self.args.should_save and is_registry_optimizer(self.args.optim):
            inner = unwrap_optimizer(self.optimizer)
            marker = {"optim": optim_name(self.args), "class": type(inner).__name__}
            with open(os.path.join(output_dir, OPTIMIZER_FILE), "w", encoding="utf-8") as fh:
                json.dump(marker, fh)
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
        if checkpoint is not None:
            check_checkpoint_optimizer(checkpoint, self.args, self.optimizer, before_load=True)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            check_checkpoint_optimizer(checkpoint, self.args, self.optimizer, before_load=False)
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


class TuningFreeTrainer(TuningFreeTrainerMixin, Trainer):
    """``transformers.Trainer`` that understands ``optim="<registry name>"``.

    Use it with :class:`~hf_tuningfree.hf.training_args.TuningFreeTrainingArguments` (or stock
    ``TrainingArguments`` after :func:`hf_tuningfree.hf.install`). Everything else is the stock
    Trainer; see :class:`TuningFreeTrainerMixin` for what it adds.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_tuning_free()


def check_checkpoint_optimizer(
    checkpoint: str, args: Any, optimizer: Any, *, before_load: bool
) -> None:
    """Refuse to resume a registry optimizer from a checkpoint another optimizer wrote.

    Before loading: the checkpoint's :data:`OPTIMIZER_FILE` names the optimizer that wrote it.
    After loading (checkpoints without that file, e.g. from the stock Trainer): the loaded param
    groups must carry every hyperparameter the optimizer defines; another optimizer's groups lack
    some and would fail later inside ``step()`` with a ``KeyError``.

    Raises:
        ResumeError: one line naming the checkpoint, both optimizers and what to do.
    """
    if not is_registry_optimizer(args.optim):
        return
    name = optim_name(args)
    inner = unwrap_optimizer(optimizer)
    this = f"optim={name!r} ({type(inner).__name__})"
    advice = (
        "resume with the optimizer that wrote it, or start this optimizer from the checkpoint's "
        "weights without resume_from_checkpoint (model_name_or_path=CHECKPOINT)"
    )
    if before_load:
        path = os.path.join(checkpoint, OPTIMIZER_FILE)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            written = json.load(fh)
        if written.get("optim") != name:
            raise ResumeError(
                f"checkpoint {checkpoint} was written with optim={written.get('optim')!r} "
                f"({written.get('class')}); this run uses {this}: {advice}"
            )
        return
    groups = getattr(inner, "param_groups", None) or []
    defaults = getattr(inner, "defaults", {}) or {}
    # the package's optimizers fill what a loaded state dict lacks and list it
    lacking = getattr(inner, "keys_filled_on_load", None)
    if lacking is None:
        lacking = set(defaults) - set(groups[0]) if groups else set()
    missing = sorted(set(lacking) - _NOT_RESTORED)
    if missing:
        raise ResumeError(
            f"checkpoint {checkpoint} holds the state of another optimizer (its param groups lack "
            f"{', '.join(missing)}, which {this} needs): {advice}"
        )
