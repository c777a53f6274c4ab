"""How a statistic defined over the whole model becomes a global sum.

Several optimizers here need scalars summed over *every* parameter of the model: the finiteness of
the gradient (all of them), D-Adaptation's numerator and ``||s||_1``, DoG's ``sum ||g||^2`` and
``||x - x0||^2``, the hypergradient dot products. How that sum is formed depends on how the
parameters are laid out across processes:

* single process, or DDP: every rank holds the full, already averaged gradient. The local sum *is*
  the global sum; reducing again would multiply it by the world size.
* FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor`` with ``Shard``
  placements; each rank holds a shard. Local sums must be added with one all-reduce over the mesh
  dimension(s) that shard.
* FSDP1 (``FullyShardedDataParallel``): the optimizer sees flat shards marked ``_fsdp_flattened``
  (possibly empty on some rank). Same all-reduce, over the default process group.
* DeepSpeed ZeRO and other setups that cannot be detected from the tensors: pass
  ``global_reduce="world"`` (or a process group) to the optimizer.

All scalars of one step are stacked into one tensor and reduced with ONE collective, on the
tensors' own device (gloo on CPU, NCCL on GPU). A rank whose shard has no gradient still takes part
in the collective with zeros, otherwise the other ranks would wait forever.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

try:  # torch >= 2.4 has the public DTensor API
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - very old torch
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

#: Accepted values of the optimizers' ``global_reduce`` argument besides a ProcessGroup.
GLOBAL_REDUCE_CHOICES = ("auto", "none", "world")


@dataclass(frozen=True)
class ReducePlan:
    """Where the local sums of one step are added up. ``groups == ()`` means no collective."""

    kind: str  # "local", "fsdp2", "fsdp1" or "explicit"
    groups: tuple[Any, ...] = ()

    @property
    def is_sharded(self) -> bool:
        return bool(self.groups)


LOCAL = ReducePlan("local")


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor behind ``t`` (itself for plain tensors). In-place updates of the
    result update ``t``."""
    if is_dtensor(t):
        return t.to_local()
    return t


def validate_global_reduce(value: object) -> object:
    """Check the ``global_reduce`` constructor argument."""
    if isinstance(value, str):
        if value not in GLOBAL_REDUCE_CHOICES:
            raise ValueError(
                f"Invalid global_reduce: {value!r}; allowed: one of {list(GLOBAL_REDUCE_CHOICES)} "
                "or a torch.distributed ProcessGroup"
            )
        return value
    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return value
    raise ValueError(
        f"Invalid global_reduce: {value!r}; allowed: one of {list(GLOBAL_REDUCE_CHOICES)} "
        "or a torch.distributed ProcessGroup"
    )


def _dtensor_shard_groups(params: Iterable[torch.Tensor]) -> tuple[Any, ...] | None:
    """Process groups of the mesh dims that shard the DTensor parameters, or None if none are
    DTensors. All sharded DTensors must be sharded over the same mesh dims."""
    pattern: tuple[int, ...] | None = None
    mesh = None
    for p in params:
        if not is_dtensor(p):
            continue
        dims = tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))
        if pattern is None:
            pattern, mesh = dims, p.device_mesh
        elif dims != pattern or p.device_mesh != mesh:
            raise NotImplementedError(
                "DTensor parameters are sharded over different device-mesh dimensions "
                f"({pattern} and {dims}); global sums cannot be formed automatically. Pass "
                "global_reduce=<ProcessGroup> to the optimizer to say which group to sum over."
            )
    if pattern is None:
        return None
    return tuple(mesh.get_group(d) for d in pattern)


def plan_reduction(params: Iterable[torch.Tensor], override: object = "auto") -> ReducePlan:
    """Decide how this step's global sums are formed (see the module docstring)."""
    if isinstance(override, str) and override == "none":
        return LOCAL
    if isinstance(override, str) and override == "world":
        if not (dist.is_available() and dist.is_initialized()):
            return LOCAL
        return ReducePlan("explicit", (dist.group.WORLD,))
    if not isinstance(override, str):  # a ProcessGroup
        return ReducePlan("explicit", (override,))
    params = list(params)
    groups = _dtensor_shard_groups(params)
    if groups:
        return ReducePlan("fsdp2", groups)
    flat_shards = any(getattr(p, "_fsdp_flattened", False) for p in params)
    if flat_shards and dist.is_available() and dist.is_initialized():
        return ReducePlan("fsdp1", (dist.group.WORLD,))
    return LOCAL


def all_reduce_sum(stacked: torch.Tensor, plan: ReducePlan) -> torch.Tensor:
    """Sum a 1-D tensor of local statistics over the plan's process groups, in place.

    One ``all_reduce`` per sharding mesh dimension (one in every common case). Never reads the
    tensor on the host.
    """
    for group in plan.groups:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return stacked
