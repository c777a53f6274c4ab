"""What one ``step()`` works on, and the dtype rules every path shares.

:class:`GroupBatch` (one param group's parameters that have a gradient this step, as rank-local
views, with their gradients and state) and :class:`StepBatch` (all groups of the step) are what
:class:`~hf_tuningfree.optim.base.TuningFreeOptimizer` collects and hands to an optimizer's
``_local_statistics`` and ``_update``. :func:`bucket_by_device_and_dtype` splits parallel tensor
lists into the device/dtype buckets a ``torch._foreach_*``, fused or C path takes;
:func:`foreach_norms` is the gradient norms of the non-finite guard, one ``_foreach_norm`` per
bucket. The dtype rules: statistics in fp64 for fp64 tensors, else fp32
(:func:`statistic_dtype`); arithmetic of the compiled and per-tensor kernels in fp32 for 16-bit
floats (:func:`compute_dtype`); a complex parameter optimized as its real view
(:func:`working_view`, :func:`real_dtype`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .distributed import local_view

__all__ = [
    "GroupBatch",
    "StepBatch",
    "bucket_by_device_and_dtype",
    "compute_dtype",
    "foreach_norms",
    "real_dtype",
    "statistic_dtype",
    "working_view",
]


def bucket_by_device_and_dtype(
    tensorlists: Sequence[Sequence[torch.Tensor]],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[torch.Tensor]], list[int]]]:
    """Split parallel tensor lists into buckets sharing the first list's device and dtype, the
    unit a ``torch._foreach_*`` fast path needs. Returns ``{(device, dtype): (lists, indices)}``."""
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[list[torch.Tensor]], list[int]]] = {}
    for i, ref in enumerate(tensorlists[0]):
        key = (ref.device, ref.dtype)
        if key not in buckets:
            buckets[key] = ([[] for _ in tensorlists], [])
        lists, idx = buckets[key]
        for out, src in zip(lists, tensorlists, strict=True):
            out.append(src[i])
        idx.append(i)
    return buckets


def statistic_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of model-wide statistics: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common_dtype(values: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32


def working_view(t: torch.Tensor) -> torch.Tensor:
    """What the optimizers compute on for a parameter (or its state, gradient): the rank-local
    tensor, as ``torch.view_as_real`` when complex (sharing its memory)."""
    t = local_view(t)
    return torch.view_as_real(t) if t.is_complex() else t


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter of ``dtype`` is optimized in (complex: its real parts')."""
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for the compiled and per-tensor kernels: fp32 for 16-bit floats."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass
class GroupBatch:
    """The parameters of one param group that have a gradient this step (rank-local views)."""

    group: dict[str, Any]
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    originals: list[torch.Tensor] = field(default_factory=list)
    #: Whether each parameter's state was created in this step (its first step with a gradient).
    fresh: list[bool] = field(default_factory=list)

    def state_list(self, key: str) -> list[torch.Tensor]:
        """``state[key]`` of every parameter in the batch, as rank-local views."""
        return [local_view(s[key]) for s in self.states]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass
class StepBatch:
    """Everything one ``step()`` works on, over all param groups."""

    groups: list[GroupBatch]
    device: torch.device
    _grad_norms: list[list[torch.Tensor]] | None = None

    @property
    def num_tensors(self) -> int:
        return sum(len(g.params) for g in self.groups)

    def grad_norms(self) -> list[list[torch.Tensor]]:
        """Per group, the fp32 L2 norm of each gradient (0-dim tensors), computed once per step
        with ``torch._foreach_norm`` per device/dtype bucket."""
        if self._grad_norms is None:
            self._grad_norms = [foreach_norms(g.grads) for g in self.groups]
        return self._grad_norms

    def sum_on_device(self, values: Iterable[torch.Tensor]) -> torch.Tensor:
        """Sum 0-dim tensors onto the batch device (fp32, or fp64 if any is; 0 if none)."""
        values = list(values)
        dtype = _common_dtype(values)
        if not values:
            return torch.zeros((), dtype=dtype, device=self.device)
        return torch.stack([v.to(self.device, dtype) for v in values]).sum()


def foreach_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 L2 norms of ``tensors`` (0-dim each), one ``_foreach_norm`` per device/dtype bucket."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for (_, _), ([ts], idx) in bucket_by_device_and_dtype([tensors]).items():
        norms = torch._foreach_norm(ts, 2, dtype=statistic_dtype(ts[0].dtype))
        for i, n in zip(idx, norms, strict=True):
            out[i] = n
    return out  # type: ignore[return-value]
