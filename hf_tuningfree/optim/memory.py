"""How much memory an optimizer's state takes: the counter behind ``state_bytes()``.

Learning-rate-free methods keep extra parameter-sized tensors (Prodigy ``m, v, s, x0`` against
AdamW's ``m, v``), and on a GPU that decides whether a model fits (dadaptation issue #36, prodigy
PRs #22, #23, #32). :func:`state_bytes` counts what an optimizer holds, for any
``torch.optim.Optimizer`` (the project's and torch's, so a report can set one beside the other):

* every tensor in ``optimizer.state`` (per-parameter state) and, for this project's optimizers,
  in ``global_state`` (the model-wide 0-dim scalars), counted by the bytes of its storage, each
  storage once (two views of one buffer are one allocation; a view that keeps a larger buffer
  alive counts the whole buffer, as the allocator does);
* of a ``DTensor`` (FSDP2) the rank-local shard, which is what this process allocates;
* per parameter element: the per-parameter bytes over the elements of the parameters in the
  optimizer's groups (rank-local for sharded ones), so AdamW's fp32 state reads 8.0.

It is a count of tensors, not of the allocator: the transient buffers of a step (working copies,
the C path's none) are not state and are not counted; tests check the count against the bytes
the allocator actually retains after the first step (``torch.profiler``'s memory events).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .distributed import local_view

__all__ = ["StateBytes", "state_bytes"]


@dataclass(frozen=True)
class StateBytes:
    """What :func:`state_bytes` measured.

    Attributes:
        per_parameter: bytes of the per-parameter state (``optimizer.state``), each storage once.
        global_state: bytes of the model-wide scalars (``global_state``; 0 for torch's optimizers).
        elements: elements of the parameters in the optimizer's groups (rank-local).
        by_key: ``per_parameter`` split by state key (a storage shared by two keys counts under
            the first one met).
    """

    per_parameter: int
    global_state: int
    elements: int
    by_key: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All of the optimizer's state, in bytes."""
        return self.per_parameter + self.global_state

    @property
    def per_element(self) -> float:
        """Per-parameter state bytes per parameter element (AdamW in fp32: 8.0)."""
        return self.per_parameter / self.elements if self.elements else 0.0


def _storage_key(t: torch.Tensor) -> tuple[Any, int]:
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr())


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [local_view(value)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def state_bytes(optimizer: torch.optim.Optimizer) -> StateBytes:
    """The bytes of ``optimizer``'s state (see the module docstring); reads no device value."""
    seen: set[tuple[Any, int]] = set()

    def count(t: torch.Tensor) -> int:
        if t.numel() == 0:
            return 0
        key = _storage_key(t)
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    by_key: dict[str, int] = {}
    for st in optimizer.state.values():
        if not isinstance(st, dict):
            continue
        for name, value in st.items():
            for t in _tensors(value):
                by_key[str(name)] = by_key.get(str(name), 0) + count(t)
    glob = sum(count(t) for t in _tensors(getattr(optimizer, "global_state", {})))
    elements = sum(local_view(p).numel() for g in optimizer.param_groups for p in g["params"])
    return StateBytes(sum(by_key.values()), glob, elements, by_key)
