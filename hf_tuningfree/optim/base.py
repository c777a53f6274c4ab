"""What every optimizer in this package shares.

``TuningFreeOptimizer`` is a ``torch.optim.Optimizer`` that runs each ``step()`` in four phases:

1. **collect**: for every param group, the parameters that have a gradient, as rank-local views
   (``DTensor`` shards are unwrapped), with their state created lazily on first use
   (``_init_param_state``); sparse gradients raise.
2. **local statistics**: 0-dim tensors summed over this rank's tensors (``_local_statistics``), plus
   the sum of gradient norms used by the non-finite guard.
3. **global reduction**: the statistics stacked into one tensor and, only when parameters are
   sharded (FSDP2/FSDP1/explicit), added across ranks with one collective.
4. **update**: ``_update(batch, stats, ok)`` with ``ok`` a 0-dim bool tensor that is False when any
   gradient anywhere held NaN/Inf. Subclasses make every write conditional on ``ok`` so a skipped
   step leaves every parameter and state tensor bit-identical.

Rules that keep the hot path free of host synchronisation: no ``.item()``, ``float(tensor)`` or
``if tensor:`` in ``step()``; global scalars live in ``self.global_state`` as 0-dim tensors on the
parameters' device; ``group["lr"]`` is the schedule's multiplier and is never written here.

``self.global_state`` is saved inside ``state_dict()["param_groups"][0]["global_state"]``: param
groups travel through every checkpoint path (Trainer, Accelerate, torch.distributed.checkpoint),
so a resume restores it exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .distributed import (
    ReducePlan,
    all_reduce_sum,
    local_view,
    plan_reduction,
    validate_global_reduce,
)
from .kernels import IMPLEMENTATIONS
from .validation import check_bool, check_choice

GLOBAL_STATE_KEY = "global_state"


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


class _NonfiniteNotice:
    """Warns once that steps were skipped, without stalling the device.

    On CPU the skipped-step counter is read directly (a host read of host memory). On CUDA a copy
    to pinned memory is queued behind the step and read at a later step once an event says it
    landed; ``stats()`` reads it synchronously.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.warned = False
        self._pending: tuple[torch.Tensor, Any] | None = None

    def _warn(self, count: int) -> None:
        if count > 0 and not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.owner}: skipped {count} step(s) because a gradient contained NaN or Inf; "
                "parameters and optimizer state were left unchanged. Further skips are counted in "
                "stats()['skipped_steps'].",
                RuntimeWarning,
                stacklevel=4,
            )

    def watch(self, counter: torch.Tensor) -> None:
        if self.warned:
            return
        if counter.device.type == "cpu":
            self._warn(int(counter))
            return
        if counter.device.type != "cuda":
            return  # read by stats()
        if self._pending is not None:
            host, event = self._pending
            if not event.query():
                return
            self._pending = None
            self._warn(int(host))
            if self.warned:
                return
        host = torch.empty((), dtype=counter.dtype, pin_memory=True)
        host.copy_(counter, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)

    def check_now(self, counter: torch.Tensor) -> None:
        self._pending = None
        self._warn(int(counter))


class TuningFreeOptimizer(torch.optim.Optimizer):
    """Base class: lazy state, non-finite guard, global statistics, ``stats()``, checkpointing.

    Subclasses implement ``_init_param_state``, ``_update`` and optionally ``_local_statistics``
    and ``stats``. Constructor arguments shared by all subclasses:

    Args:
        skip_nonfinite: if True (default), a step whose gradients contain NaN/Inf anywhere (over
            all groups and, when sharded, all ranks) changes nothing and is counted in
            ``stats()["skipped_steps"]``; a warning is issued once.
        global_reduce: how model-wide sums are formed across processes: ``"auto"`` (detect FSDP2
            ``DTensor`` / FSDP1 flat shards; DDP and single process need no collective),
            ``"none"``, ``"world"`` (e.g. DeepSpeed ZeRO), or a ``ProcessGroup``.
    """

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
    ) -> None:
        check_choice("implementation", defaults.get("implementation", "auto"), IMPLEMENTATIONS)
        self.skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        self.global_reduce = validate_global_reduce(global_reduce)
        self.global_state: dict[str, torch.Tensor] = {}
        self._notice = _NonfiniteNotice(type(self).__name__)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ subclass hooks
    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        """Create the state of ``param`` at its first step with a gradient."""
        raise NotImplementedError

    def _local_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """Model-wide sums this rank contributes (fp32/fp64 tensors on ``batch.device``): 0-dim,
        or 1-D for per-tensor statistics; each is summed elementwise across ranks."""
        return {}

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        """Apply the update; every write must be a no-op where ``ok`` is False."""
        raise NotImplementedError

    def _finiteness_statistic(self, batch: StepBatch) -> torch.Tensor:
        """A 0-dim tensor on ``batch.device`` that is finite iff every gradient of this rank is
        (it is summed over ranks when sharded). Default: the sum of the gradient norms. A subclass
        whose ``_local_statistics`` already reads every gradient element (e.g. in a dot product)
        may return a sum of those statistics instead and save a pass over the gradients."""
        return batch.sum_on_device(n for norms in batch.grad_norms() for n in norms)

    def stats(self) -> dict[str, float]:
        """Values worth logging, as Python floats. Reads device memory: call at logging time,
        not every step."""
        skipped = self.global_state.get("skipped_steps")
        count = int(skipped) if skipped is not None else 0
        if skipped is not None:
            self._notice.check_now(skipped)
        return {"skipped_steps": float(count)}

    # ------------------------------------------------------------------ step machinery
    def _collect(self) -> StepBatch:
        groups: list[GroupBatch] = []
        device: torch.device | None = None
        for group in self.param_groups:
            gb = GroupBatch(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; use dense "
                        "gradients (e.g. nn.Embedding(sparse=False))."
                    )
                state = self.state[p]
                if len(state) == 0:
                    self._init_param_state(p, state, group)
                local_p = local_view(p)
                gb.params.append(local_p)
                gb.grads.append(local_view(p.grad))
                gb.states.append(state)
                gb.originals.append(p)
                if device is None:
                    device = local_p.device
            groups.append(gb)
        if device is None:  # no gradients on this rank: still take part in collectives
            first = next((p for g in self.param_groups for p in g["params"]), None)
            device = local_view(first).device if first is not None else torch.device("cpu")
        return StepBatch(groups, device)

    def global_tensor(
        self, name: str, device: torch.device, init: Callable[[torch.device], torch.Tensor]
    ) -> torch.Tensor:
        """A 0-dim tensor of ``global_state`` on ``device``, created by ``init`` the first time and
        moved there after a checkpoint load (a no-op when it is already there)."""
        t = self.global_state.get(name)
        if t is None:
            t = init(device)
        elif t.device != device:
            t = t.to(device)
        self.global_state[name] = t
        return t

    def _reduce(
        self, local: dict[str, torch.Tensor], plan: ReducePlan, device: torch.device
    ) -> dict[str, torch.Tensor]:
        if not local:
            return {}
        names = sorted(local)
        dtype = _common_dtype(list(local.values()))
        # 0-dim sums and per-tensor vectors (layer-wise statistics) travel in one flat tensor
        flat = [local[n].to(device, dtype).reshape(-1) for n in names]
        stacked = torch.cat(flat)
        if plan.is_sharded:
            # The local dtype can differ between ranks (a rank without gradients sums to fp32
            # zeros where the others hold fp64 sums), and a collective with mismatched dtypes
            # aborts: reduce in fp64 on every rank, then come back to the local dtype.
            stacked = all_reduce_sum(stacked.to(torch.float64), plan).to(dtype)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for n, f in zip(names, flat, strict=True):
            out[n] = stacked[start : start + f.numel()].reshape(local[n].shape)
            start += f.numel()
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (see the module docstring for the phases)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last_ok = None
        batch = self._collect()
        plan = plan_reduction(
            (p for g in self.param_groups for p in g["params"]), self.global_reduce
        )
        if batch.num_tensors == 0 and not plan.is_sharded:
            return loss
        local = dict(self._local_statistics(batch))
        if self.skip_nonfinite:
            local["_grad_norm_sum"] = self._finiteness_statistic(batch)
        stats = self._reduce(local, plan, batch.device)
        if self.skip_nonfinite:
            ok = torch.isfinite(stats.pop("_grad_norm_sum"))
        else:
            ok = torch.ones((), dtype=torch.bool, device=batch.device)
        self._update(batch, stats, ok)
        self._last_ok = ok
        skipped = self.global_tensor(
            "skipped_steps",
            batch.device,
            lambda d: torch.zeros((), dtype=torch.int64, device=d),
        )
        skipped.add_((~ok).to(torch.int64))
        self._notice.watch(skipped)
        return loss

    @property
    def last_step_skipped(self) -> torch.Tensor | bool:
        """Whether the last ``step()`` was skipped for a NaN/Inf gradient: a 0-dim bool tensor on
        the parameters' device (reading it on the host syncs), or False before any step and after
        a step that had no gradients to apply. Pass it to
        ``PolynomialDecayAverager.update(skipped=...)`` to keep the average sync-free."""
        ok = getattr(self, "_last_ok", None)
        return False if ok is None else ~ok

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if sd["param_groups"]:
            sd["param_groups"][0][GLOBAL_STATE_KEY] = {
                k: v.clone() for k, v in self.global_state.items()
            }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = [dict(g) for g in state_dict["param_groups"]]
        saved_global: dict[str, torch.Tensor] = {}
        for g in groups:
            saved_global.update(g.pop(GLOBAL_STATE_KEY, None) or {})
        super().load_state_dict({**state_dict, "param_groups": groups})
        self.global_state = {
            k: (v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v))
            for k, v in saved_global.items()
        }
        self._notice = _NonfiniteNotice(type(self).__name__)


def scalar_state(device: torch.device, value: float = 0.0) -> torch.Tensor:
    """A 0-dim fp32 tensor for per-parameter scalar state (``step``-style)."""
    return torch.full((), value, dtype=torch.float32, device=device)
