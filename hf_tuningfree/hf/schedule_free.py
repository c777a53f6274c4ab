"""What a schedule-free optimizer needs from the Trainer: the averaged weights ``x`` in the model
whenever it is evaluated or saved, the training point ``y`` for every step.

Defazio et al. ("The Road Less Scheduled", NeurIPS 2024) train at ``y`` and evaluate at ``x``;
the optimizer moves the parameters between them with ``train()`` / ``eval()``
(:class:`hf_tuningfree.optim.schedule_free.ScheduleFreeModes`). transformers 5.x already calls
``optimizer.train()`` at every ``training_step`` and ``optimizer.eval()`` in ``evaluation_loop``
(duck typing, through Accelerate's ``AcceleratedOptimizer``, which forwards both); it calls
neither around saving. :class:`ScheduleFreeCallback` closes that gap:

- ``on_step_end``: when the step will save a checkpoint (``control.should_save``), ``eval()``
  first, so the checkpoint's model is ``x`` and its optimizer state says "eval mode"; the next
  ``training_step`` calls ``train()``, and a resume from the checkpoint makes the same call on
  the same values, so it continues bit-exactly;
- ``on_train_end``: ``eval()``, so the model after ``trainer.train()`` (what ``save_model``,
  ``push_to_hub`` and any later use see) is the average.

:func:`eval_mode` does the same for a direct ``trainer.save_model()``. Wrappers (Accelerate,
DeepSpeed) are looked through (:func:`schedule_free_optimizer`), so a wrapper without ``eval``
(huggingface/accelerate #4159) does not lose it.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from hf_tuningfree.optim.schedule_free import ScheduleFreeModes

__all__ = ["ScheduleFreeCallback", "eval_mode", "schedule_free_optimizer"]


def schedule_free_optimizer(optimizer: Any) -> ScheduleFreeModes | None:
    """The schedule-free optimizer inside ``optimizer`` (itself, or inside up to four
    ``.optimizer`` wrappers), or None."""
    for _ in range(5):
        if isinstance(optimizer, ScheduleFreeModes):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            return None
        optimizer = inner
    return None


def eval_mode(optimizer: Any) -> None:
    """Put the averaged weights into the model if ``optimizer`` is (or wraps) a schedule-free
    optimizer; a no-op otherwise."""
    inner = schedule_free_optimizer(optimizer)
    if inner is not None:
        inner.eval()


class ScheduleFreeCallback(TrainerCallback):
    """Averaged weights for every checkpoint and for the model after training (see the module
    docstring); a no-op for other optimizers."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            eval_mode(kwargs.get("optimizer"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        eval_mode(kwargs.get("optimizer"))
