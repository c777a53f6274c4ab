"""The ``TrainerCallback`` of every Trainer route: skipped steps watched, the iterate average kept.

Every optimizer here skips a step whose gradients hold NaN/Inf anywhere and leaves the weights
and state untouched (``optimizer.last_step_skipped``, ``stats()["skipped_steps"]``). That guard
is for the occasional bad batch; a run whose gradients stay non-finite has diverged (or its data
or loss produces NaN) and would otherwise go on "training" with frozen weights and exit 0.
:class:`TuningFreeCallback` therefore

- counts skipped steps, logs how many were skipped since the last logging step and in all, and
  stops training with :class:`NonFiniteGradientsError` after ``max_consecutive_skipped_steps``
  consecutive skips (default :data:`DEFAULT_MAX_CONSECUTIVE_SKIPPED`; 0 never stops);
- folds the weights into the polynomial-decay iterate average after every optimizer step that was
  not skipped (when the trainer keeps one).

No extra host synchronisation per step on an accelerator: the counters are 0-dim tensors on the
optimizer's device, updated with tensor operations. On CPU (host memory) they are read after every
step, so training stops exactly at the N-th consecutive skip. On CUDA and other devices they are
read at logging steps, where ``optimizer.stats()`` already synchronises, and at the end of
training: the stop then comes at the first logging step after the N-th skip (and the error names
the steps that were skipped).

``TuningFreeTrainer`` adds it itself; :func:`hf_tuningfree.hf.install` adds it to every stock
``Trainer`` (and subclass, e.g. TRL's ``SFTTrainer``) whose ``optim`` is a registry name.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger("hf_tuningfree")

#: Consecutive skipped steps after which training stops. The weights do not change while steps
#: are skipped, so five different batches in a row all gave non-finite gradients at the same
#: weights: the weights (or the loss) are broken, not one batch.
DEFAULT_MAX_CONSECUTIVE_SKIPPED = 5


class NonFiniteGradientsError(RuntimeError):
    """Training stopped: too many consecutive optimizer steps had NaN/Inf gradients."""


def unwrap_optimizer(optimizer: Any) -> Any:
    """The user-facing optimizer inside Accelerate/DeepSpeed wrappers."""
    seen = 0
    while optimizer is not None and not hasattr(optimizer, "stats") and seen < 4:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


class SkippedStepCounter:
    """Skipped optimizer steps as 0-dim int64 tensors on the skip flag's device: in all, in the
    current run of consecutive skips, and the longest run so far with the step it ended at.

    ``update()`` never reads device memory; ``read()`` does (call it where a sync is cheap).
    """

    def __init__(self) -> None:
        self._total: torch.Tensor | None = None
        self._run: torch.Tensor | None = None
        self._longest: torch.Tensor | None = None
        self._longest_end: torch.Tensor | None = None
        self.updates = 0

    def update(self, skipped: torch.Tensor | bool, step: int) -> None:
        """Count optimizer step ``step`` (1-based), skipped or not."""
        if not isinstance(skipped, torch.Tensor):  # no step taken: count it where we count
            device = self._total.device if self._total is not None else "cpu"
            skipped = torch.tensor(bool(skipped), device=device)
        flag = skipped.detach().reshape(()).to(torch.int64)
        if self._total is None or self._total.device != flag.device:
            zeros = [torch.zeros((), dtype=torch.int64, device=flag.device) for _ in range(4)]
            if self._total is not None:  # moved (e.g. after a checkpoint load): carry over
                zeros = [t.to(flag.device) for t in self.tensors()]
            self._total, self._run, self._longest, self._longest_end = zeros
        self._total = self._total + flag
        self._run = (self._run + 1) * flag
        longer = self._run > self._longest
        self._longest_end = torch.where(longer, step, self._longest_end)
        self._longest = torch.maximum(self._longest, self._run)
        self.updates += 1

    def tensors(self) -> list[torch.Tensor]:
        assert self._total is not None
        return [self._total, self._run, self._longest, self._longest_end]  # type: ignore[list-item]

    @property
    def on_host(self) -> bool:
        """Whether the counters live in host memory (reading them costs no device sync)."""
        return self._total is None or self._total.device.type == "cpu"

    def read(self) -> dict[str, int]:
        """``total``, ``run`` (current consecutive skips), ``longest`` and ``longest_end`` as
        ints (reads device memory)."""
        if self._total is None:
            return {"total": 0, "run": 0, "longest": 0, "longest_end": 0}
        values = torch.stack(self.tensors()).tolist()  # one transfer
        return dict(zip(("total", "run", "longest", "longest_end"), values, strict=True))


class TuningFreeCallback(TrainerCallback):
    """Watches skipped steps and keeps the iterate average up to date (see the module docstring).

    Args:
        max_consecutive_skipped_steps: stop with :class:`NonFiniteGradientsError` after this many
            consecutive skipped optimizer steps; 0 never stops.
        averager: a :class:`~hf_tuningfree.optim.averaging.PolynomialDecayAverager` to update
            after each optimizer step that was not skipped, or None.
    """

    def __init__(
        self,
        max_consecutive_skipped_steps: int = DEFAULT_MAX_CONSECUTIVE_SKIPPED,
        averager: Any = None,
    ) -> None:
        if not isinstance(max_consecutive_skipped_steps, int) or max_consecutive_skipped_steps < 0:
            raise ValueError(
                "max_consecutive_skipped_steps must be an int >= 0 (0: never stop), got "
                f"{max_consecutive_skipped_steps!r}"
            )
        self.limit = max_consecutive_skipped_steps
        self.averager = averager
        self.counter = SkippedStepCounter()
        self._logged_total = 0

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.counter = SkippedStepCounter()
        self._logged_total = 0

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if optimizer is None or getattr(optimizer, "step_was_skipped", False):
            return  # fp16 loss scaling skipped the step: not a non-finite-gradient skip of ours
        inner = unwrap_optimizer(optimizer)
        skipped = getattr(inner, "last_step_skipped", False)
        self.counter.update(skipped, state.global_step + 1)
        if self.averager is not None:
            self.averager.update(skipped=skipped)
        if self.limit and self.counter.on_host:
            self._check(state.global_step + 1)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if logs is None or "loss" not in logs or self.counter.updates == 0:
            return
        counts = self.counter.read()
        new = counts["total"] - self._logged_total
        if new:
            logger.warning(
                "hf_tuningfree: %d optimizer step(s) skipped since the last log because a gradient "
                "held NaN/Inf (%d of %d in all; weights and optimizer state unchanged on those "
                "steps)",
                new,
                counts["total"],
                self.counter.updates,
            )
            self._logged_total = counts["total"]
        if self.limit:
            self._check(state.global_step, counts)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.counter.updates == 0:
            return
        counts = self.counter.read()
        if self.limit:
            self._check(state.global_step, counts)
        if counts["total"]:
            logger.warning(
                "hf_tuningfree: %d of %d optimizer steps were skipped because a gradient held "
                "NaN/Inf (longest run: %d in a row, up to step %d)",
                counts["total"],
                self.counter.updates,
                counts["longest"],
                counts["longest_end"],
            )

    # ------------------------------------------------------------------ the stop
    def _check(self, step: int, counts: dict[str, int] | None = None) -> None:
        counts = counts or self.counter.read()
        if counts["longest"] < self.limit:
            return
        end = counts["longest_end"]
        start = end - counts["longest"] + 1
        raise NonFiniteGradientsError(
            f"hf_tuningfree: stopped training at step {step}: {counts['longest']} consecutive "
            f"optimizer steps (steps {start}-{end}) were skipped because a gradient held NaN/Inf "
            f"({counts['total']} skipped in all); the weights are those before step {start}. "
            "The run has diverged or the loss/data produce non-finite values: lower the learning "
            "rate, enable gradient clipping (max_grad_norm) or check the data. "
            f"max_consecutive_skipped_steps={self.limit} (0 never stops)."
        )
