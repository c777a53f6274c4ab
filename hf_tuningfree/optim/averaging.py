"""Polynomial-decay iterate averaging (Shamir & Zhang, ICML 2013), as DoG's paper uses it.

Ivgi, Hinder & Carmon (ICML 2023) report DoG and L-DoG with the averaged weights: DoG has no
decaying schedule, and the average plays that role. After the ``t``-th update (``t = 1, 2, ...``)::

    xbar_t = (1 - w_t) * xbar_{t-1} + w_t * x_t,      w_t = (gamma + 1) / (t + gamma)

so ``xbar_1 = x_1`` and the weight of old iterates decays polynomially (``gamma = 8``, the
paper's default, keeps roughly the last ``1/9`` of the run in view, growing with ``t``).

Usage::

    averager = PolynomialDecayAverager(model)          # trainable params + floating buffers
    for batch in loader:
        loss(model, batch).backward()
        optimizer.step()
        averager.update(skipped=optimizer.last_step_skipped)   # or averager.update()
        optimizer.zero_grad()
    with averager.swapped():                           # averaged weights in, for eval / saving
        evaluate(model)
        model.save_pretrained(out_dir)
    # training weights are back, bit for bit

``swap_in()``/``swap_out()`` exchange the contents of each model tensor and its average in place
(a three-way XOR of their bits): parameter objects, their storage and anything holding views of it
(FSDP2 shards, tied weights) stay as they are, no second copy of the model is allocated, and the
training weights come back bit-exactly. The average is stored in each tensor's own dtype unless
``dtype`` says otherwise (``dtype=torch.float32`` is advisable for bf16/fp16 parameters: averaging
in 16 bits loses the small late increments); tensors whose average has another dtype are swapped
through a temporary copy of that tensor instead.

Skipped optimizer steps: ``update()`` itself skips nothing. After a step that changed nothing
(NaN/Inf gradients, an AMP scaler's inf check), either do not call ``update()`` (the caller
decides: e.g. ``if not accelerator.optimizer_step_was_skipped: averager.update()``) or pass the
optimizer's flag, ``update(skipped=optimizer.last_step_skipped)``: a 0-dim bool tensor is
honoured on the device, without a host read, and then neither the average nor the update count
changes.

``torch.optim.swa_utils``: :func:`get_polynomial_decay_multi_avg_fn` makes
``AveragedModel(model, multi_avg_fn=...)`` compute the same average (in a separate model copy),
and ``swa_utils.update_bn(loader, model)`` may be run inside ``swapped()``.

State (``state_dict()``) holds tensors, a float and strings only, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .distributed import local_view
from .validation import check_nonnegative

__all__ = [
    "PolynomialDecayAverager",
    "get_polynomial_decay_avg_fn",
    "get_polynomial_decay_multi_avg_fn",
    "polynomial_decay_weight",
]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def polynomial_decay_weight(t: int | float | torch.Tensor, gamma: float) -> Any:
    """Weight of the ``t``-th iterate (``t >= 1``) in the average: ``(gamma+1)/(t+gamma)``."""
    return (gamma + 1.0) / (t + gamma)


def _xor_swap_(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the contents of two same-dtype, same-shape tensors in place, bit-exactly and
    without a temporary copy (``a ^= b; b ^= a; a ^= b`` on integer views)."""
    ints = _INT_VIEW[a.element_size()]
    ia, ib = a.view(ints), b.view(ints)
    ia.bitwise_xor_(ib)
    ib.bitwise_xor_(ia)
    ia.bitwise_xor_(ib)


class PolynomialDecayAverager:
    """Polynomial-decay average of a model's weights, swappable into the model in place.

    Args:
        model: an ``nn.Module`` (its parameters with ``requires_grad`` — only the adapters of a
            PEFT model — and, with ``include_buffers``, its floating persistent buffers such as
            batch-norm statistics) or an iterable of tensors to average.
        gamma: the decay parameter (default 8, the paper's); ``>= 0`` (0 is the uniform average).
        include_buffers: average floating buffers too (default True; modules only).
        dtype: dtype of the stored average (default: each tensor's own dtype).

    The tensors are looked up at the first ``update()``/``swap_in()``/``load_state_dict()``,
    so the averager may be created before ``accelerator.prepare`` or ``fully_shard`` replaces
    the parameters. Under FSDP2 each rank averages its own shards.
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.Tensor],
        gamma: float = 8.0,
        *,
        include_buffers: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.gamma = check_nonnegative("gamma", gamma)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"Invalid dtype: {dtype!r}; allowed: a floating torch.dtype or None")
        self.dtype = dtype
        self.include_buffers = include_buffers
        if isinstance(model, torch.nn.Module):
            self._module: torch.nn.Module | None = model
            self._given: list[torch.Tensor] | None = None
        else:
            self._module = None
            self._given = list(model)
            for i, t in enumerate(self._given):
                if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                    raise TypeError(f"tensor {i}: only floating tensors can be averaged, got {t!r}")
        self._tensors: dict[str, torch.Tensor] | None = None
        self._avg: dict[str, torch.Tensor] = {}
        self._count: torch.Tensor | None = None  # updates applied (0-dim int64, on device)
        self._swapped = False
        self._backups: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ what is averaged
    def _tracked(self) -> dict[str, torch.Tensor]:
        if self._tensors is not None:
            return self._tensors
        if self._given is not None:
            tensors = {str(i): t for i, t in enumerate(self._given)}
        else:
            assert self._module is not None
            tensors = {n: p for n, p in self._module.named_parameters() if p.requires_grad}
            if self.include_buffers:
                persistent = set(self._module.state_dict(keep_vars=True))
                tensors.update(
                    (n, b)
                    for n, b in self._module.named_buffers()
                    if b.is_floating_point() and n in persistent
                )
        if not tensors:
            raise ValueError("PolynomialDecayAverager: nothing to average (no trainable tensors)")
        self._tensors = tensors
        return tensors

    def tracked_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors being averaged (the model's, not the average), by name."""
        return dict(self._tracked())

    @property
    def names(self) -> list[str]:
        """Names of the averaged tensors (parameter/buffer names; indices for a tensor list)."""
        return list(self._tracked())

    @property
    def num_updates(self) -> int:
        """How many iterates are in the average (reads device memory)."""
        return 0 if self._count is None else int(self._count)

    @property
    def is_swapped(self) -> bool:
        """True between ``swap_in()`` and ``swap_out()``."""
        return self._swapped

    def _device(self) -> torch.device:
        return local_view(next(iter(self._tracked().values()))).device

    # ------------------------------------------------------------------ averaging
    @torch.no_grad()
    def update(self, skipped: bool | torch.Tensor = False) -> None:
        """Fold the current weights into the average (call after each optimizer step).

        ``skipped``: True, or a 0-dim bool tensor that is True, leaves the average and the count
        unchanged (pass ``optimizer.last_step_skipped``; a tensor is never read on the host).
        """
        if self._swapped:
            raise RuntimeError(
                "update() while the averaged weights are swapped in; swap_out() first"
            )
        if skipped is True:
            return
        tensors = self._tracked()
        if not self._avg:  # first update: x_1 itself (the weight of the first iterate is 1)
            self._avg = {n: self._new_average(t) for n, t in tensors.items()}
        device = self._device()
        if self._count is None:
            self._count = torch.zeros((), dtype=torch.int64, device=device)
        flag = isinstance(skipped, torch.Tensor)
        inc = (~skipped.to(device, torch.bool)).to(torch.int64) if flag else 1
        count = self._count + inc
        weight = polynomial_decay_weight(count.to(torch.float64), self.gamma)
        if flag:
            weight = torch.where(skipped.to(device, torch.bool), 0.0, weight)
        buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for name, t in tensors.items():
            avg = local_view(self._avg[name])
            cur = local_view(t).detach()
            if cur.dtype != avg.dtype:
                cur = cur.to(avg.dtype)
            lists = buckets.setdefault((avg.device, avg.dtype), ([], []))
            lists[0].append(avg)
            lists[1].append(cur)
        for (dev, dtype), (avgs, curs) in buckets.items():
            torch._foreach_lerp_(avgs, curs, weight.to(dev, dtype))
        self._count = count

    def _new_average(self, t: torch.Tensor) -> torch.Tensor:
        avg = t.detach().clone(memory_format=torch.preserve_format)
        return avg if self.dtype is None else avg.to(self.dtype)

    # ------------------------------------------------------------------ swapping
    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the averaged weights into the model (for evaluation or saving); the training
        weights are kept in the average's place. A no-op before the first ``update()``."""
        if self._swapped:
            raise RuntimeError("swap_in() twice: the averaged weights are already in the model")
        for name, t in self._tracked().items() if self._avg else ():
            cur, avg = local_view(t).detach(), local_view(self._avg[name])
            if cur.dtype == avg.dtype:
                _xor_swap_(cur, avg)
            else:
                self._backups[name] = cur.clone()
                cur.copy_(avg)
        self._swapped = True

    @torch.no_grad()
    def swap_out(self) -> None:
        """Restore the training weights, bit-exactly, after ``swap_in()``. What was written to
        the model while swapped in (e.g. batch-norm statistics recomputed by
        ``swa_utils.update_bn``) goes back into the average."""
        if not self._swapped:
            raise RuntimeError("swap_out() without swap_in()")
        for name, t in self._tracked().items() if self._avg else ():
            cur, avg = local_view(t).detach(), local_view(self._avg[name])
            if cur.dtype == avg.dtype:
                _xor_swap_(cur, avg)
            else:
                cur.copy_(self._backups.pop(name))
        self._swapped = False

    @contextmanager
    def swapped(self) -> Iterator[PolynomialDecayAverager]:
        """``with averager.swapped(): ...`` runs the block with the averaged weights in the
        model and restores the training weights afterwards, also on an exception."""
        self.swap_in()
        try:
            yield self
        finally:
            self.swap_out()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """``{"gamma", "num_updates", "averages": {name: tensor}}``. The tensors are references
        (as ``nn.Module.state_dict``); while swapped in, the averages are read from the model."""
        averages: dict[str, torch.Tensor] = {}
        tensors = self._tracked() if self._avg else {}
        for name, avg in self._avg.items():
            t = tensors[name]
            holds_average = self._swapped and t.dtype == avg.dtype
            averages[name] = t.detach() if holds_average else avg
        count = self._count if self._count is not None else torch.zeros((), dtype=torch.int64)
        return {"gamma": self.gamma, "num_updates": count, "averages": averages}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the averages go to the devices of the model's tensors."""
        if self._swapped:
            raise RuntimeError("load_state_dict() while swapped in; swap_out() first")
        tensors = self._tracked()
        averages = state_dict["averages"]
        if averages and set(averages) != set(tensors):
            missing = sorted(set(tensors) - set(averages))[:5]
            extra = sorted(set(averages) - set(tensors))[:5]
            raise ValueError(
                "PolynomialDecayAverager state does not match the model: "
                f"missing {missing}, unexpected {extra}"
            )
        new: dict[str, torch.Tensor] = {}
        for name, value in averages.items():
            t = tensors[name]
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(
                    f"{name}: saved average has shape {tuple(value.shape)}, "
                    f"the model tensor {tuple(t.shape)}"
                )
            target = self._avg.get(name)
            if target is None:
                target = self._new_average(t)
            target.copy_(value.to(target.device))
            new[name] = target
        self._avg = new
        self.gamma = check_nonnegative("gamma", state_dict["gamma"])
        count = state_dict["num_updates"]
        count = count if isinstance(count, torch.Tensor) else torch.tensor(count)
        self._count = count.detach().clone().to(self._device(), torch.int64) if new else None


# ---------------------------------------------------------------------- torch.optim.swa_utils
def get_polynomial_decay_multi_avg_fn(
    gamma: float = 8.0,
) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor | int], None]:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` computing the same
    polynomial-decay average (``AveragedModel`` copies the first iterate and passes the number of
    iterates already averaged)."""
    gamma = check_nonnegative("gamma", gamma)

    @torch.no_grad()
    def update(
        averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any
    ) -> None:
        t = num_averaged + 1  # this iterate's index
        if isinstance(t, torch.Tensor):
            weight = polynomial_decay_weight(t.to(torch.float64), gamma).to(averaged[0].dtype)
        else:
            weight = polynomial_decay_weight(float(t), gamma)
        torch._foreach_lerp_(averaged, current, weight)

    return update


def get_polynomial_decay_avg_fn(
    gamma: float = 8.0,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor]:
    """The per-tensor ``avg_fn`` form of :func:`get_polynomial_decay_multi_avg_fn`."""
    gamma = check_nonnegative("gamma", gamma)

    @torch.no_grad()
    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: Any) -> torch.Tensor:
        t = num_averaged + 1
        if isinstance(t, torch.Tensor):
            weight = polynomial_decay_weight(t.to(torch.float64), gamma).to(averaged.dtype)
        else:
            weight = polynomial_decay_weight(float(t), gamma)
        return torch.lerp(averaged, current, weight)

    return avg
