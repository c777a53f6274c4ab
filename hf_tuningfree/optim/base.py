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

What the base also guarantees every optimizer, as torch.optim does for its own (pytorch's
``test/test_optim.py`` states the contract; ``tests/test_optimizer_contract.py`` holds every
registry optimizer and every code path to it):

* **Odd parameters.** A non-contiguous parameter (a strided view into a larger buffer) is
  updated through a contiguous copy written back after the step, so every path, fused and C
  ones included, sees contiguous memory and the result is bit-identical to a contiguous
  parameter's, with the memory around the view untouched. Non-contiguous gradients are read
  through a contiguous copy; state is created contiguous. Complex parameters are optimized as
  ``torch.view_as_real`` of themselves (as torch.optim does): every optimizer sees the real and
  imaginary parts as two real coordinates, which is what their maths needs (norms and dot
  products of C^n as R^2n: ``||z||`` and ``Re <g, s>``), and the result equals the same optimizer
  run on the ``view_as_real`` tensors exactly. Zero-size and 0-dim parameters work.
* **State that does not fit.** ``load_state_dict`` (and unpickling) checks every per-parameter
  state tensor against its parameter before anything changes: the keys in
  ``SCALAR_STATE_KEYS`` hold one number, every other tensor has the parameter's shape; otherwise
  a ``ValueError`` names the parameter (group and index) and the key. The fused and C paths check
  again at every step (:func:`~hf_tuningfree.optim.kernels.fast_path_accepts`) and raise a
  ``RuntimeError`` naming both, so a state changed by hand cannot make them read or write past a
  tensor.
* **Autograd.** After a step, the version counter of every parameter and state tensor is bumped
  (``torch.autograd.graph.increment_version``): the C loops write behind autograd's back, and a
  step between a forward and its backward must raise "modified by an inplace operation" on every
  path, as it does on the torch paths.
* **Copies.** ``copy.deepcopy`` and pickling keep ``global_state`` and the constructor-only
  options (``_PICKLED_ATTRIBUTES``), so a copy steps exactly as the original would.
  ``__setstate__`` (also run by ``load_state_dict``) fills group keys that an older state dict
  lacks (``maximize``, ``implementation``, ...) from the constructor's defaults, as torch.optim
  does for ``maximize`` and ``foreach``.
* **Tensor lr.** A one-element tensor ``lr`` (shape ``[]``, ``[1]``, ``[1, 1]``) given to the
  constructor or ``add_param_group`` (or found in a loaded state dict) is read once, as the
  number it holds; torch's schedulers then write numbers. A tensor assigned to ``group["lr"]``
  later is used as a 0-dim view of its memory (no host read; a schedule may fill it in place).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch.optim.optimizer import ParamsT

from .batching import (
    GroupBatch,
    StepBatch,
    _common_dtype,
    bucket_by_device_and_dtype,
    compute_dtype,
    foreach_norms,
    real_dtype,
    statistic_dtype,
    working_view,
)
from .distributed import (
    ReducePlan,
    all_reduce_sum,
    is_dtensor,
    local_view,
    plan_reduction,
    validate_global_reduce,
)
from .kernels import AutoOrder, StateShapeError, check_implementation, choose_path
from .memory import StateBytes, state_bytes
from .rounding import LOW_PRECISION, RoundingStream, stochastic_round
from .validation import check_betas, check_bool, check_nonnegative, check_positive, scalar_value

#: The names of this module other modules import; the batching and dtype helpers live in
#: :mod:`.batching` and are re-exported here, so ``from .base import GroupBatch`` keeps working.
__all__ = [
    "GLOBAL_STATE_KEY",
    "ROUNDING_STATE_KEY",
    "GroupBatch",
    "StepBatch",
    "TuningFreeOptimizer",
    "bucket_by_device_and_dtype",
    "compute_dtype",
    "foreach_norms",
    "real_dtype",
    "scalar_state",
    "statistic_dtype",
    "working_view",
]

GLOBAL_STATE_KEY = "global_state"
#: Where ``state_dict()`` keeps the stochastic-rounding stream's seed and call count.
ROUNDING_STATE_KEY = "stochastic_rounding_stream"

#: Group keys torch.optim's ``__setstate__`` adds to ``defaults`` for its own optimizers; not ours.
_TORCH_ONLY_DEFAULTS = frozenset({"differentiable"})


class _NonfiniteNotice:
    """Warns that steps were skipped, and again each time the count has doubled (1, 2, 4, 8, ...
    skipped steps), without stalling the device.

    On CPU the skipped-step counter is read directly (a host read of host memory). On CUDA a copy
    to pinned memory is queued behind the step and read at a later step once an event says it
    landed (one copy in flight at a time); ``stats()`` reads it synchronously.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.reported = 0  # the count the last warning gave
        self._pending: tuple[torch.Tensor, Any] | None = None

    def _warn(self, count: int) -> None:
        if count <= 0 or count < 2 * self.reported:
            return
        self.reported = count
        warnings.warn(
            f"{self.owner}: skipped {count} step(s) so far because a gradient contained NaN or "
            "Inf; parameters and optimizer state were left unchanged. The count is in "
            f"stats()['skipped_steps']; the next warning comes at {2 * count} skipped steps.",
            RuntimeWarning,
            stacklevel=4,
        )

    def watch(self, counter: torch.Tensor) -> None:
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
            ``stats()["skipped_steps"]``; a warning is issued at the first skipped step and
            again each time the count doubles.
        global_reduce: how model-wide sums are formed across processes: ``"auto"`` (detect FSDP2
            ``DTensor`` / FSDP1 flat shards; DDP and single process need no collective),
            ``"none"``, ``"world"`` (e.g. DeepSpeed ZeRO), or a ``ProcessGroup``.
        stochastic_rounding: if True (default), bf16/fp16 parameters are stepped as an fp32 copy
            that is written back with stochastic rounding (:mod:`~hf_tuningfree.optim.rounding`),
            so updates below half an ulp accumulate as in fp32 instead of being lost; the random
            bits follow torch's seed at construction and resume exactly. The copy lives for the
            step only (4 bytes per 16-bit parameter at the peak of ``step()``). False: the
            update is rounded to nearest, as before. fp32/fp64 parameters are unaffected.

    Class attributes a subclass may extend:

    * ``SCALAR_STATE_KEYS``: per-parameter state keys holding one number (every other state
      tensor has its parameter's shape; checked when a state dict is loaded);
    * ``_PICKLED_ATTRIBUTES``: attributes set by the constructor that ``copy.deepcopy`` and
      pickling must keep (``global_state`` and the constructor-only options);
    * ``_CONSTRUCTOR_ONLY``: constructor arguments that are not per-group settings (a param
      group naming one is an error rather than silently ignored);
    * ``PATHS``: the forms of ``implementation=`` the optimizer has (``"native"``,
      ``"compiled"``, ``"foreach"``, ``"loop"``; see :mod:`~hf_tuningfree.optim.kernels`), checked
      in the constructor and in ``add_param_group``; ``AUTO_ORDER``: what ``"auto"`` tries, per
      device kind. Both go to :func:`~hf_tuningfree.optim.kernels.choose_path`.
    """

    PATHS: tuple[str, ...] = ("loop",)
    AUTO_ORDER: AutoOrder = AutoOrder()

    SCALAR_STATE_KEYS: frozenset[str] = frozenset({"step"})
    _PICKLED_ATTRIBUTES: tuple[str, ...] = (
        "global_state",
        "skip_nonfinite",
        "global_reduce",
        "stochastic_rounding",
        "_rounding",
    )
    _CONSTRUCTOR_ONLY: tuple[str, ...] = ("skip_nonfinite", "global_reduce", "stochastic_rounding")
    #: True for an optimizer whose passes take no ``maximize`` flag (the DoG family): for the
    #: groups with ``maximize=True`` the step negates their gradients in place before its
    #: passes and negates them back afterwards (also when a pass raises). Negation is exact in
    #: floating point, so the step is the one on ``-grad`` bit for bit on every path, and the
    #: gradients the caller holds are unchanged after the step.
    MAXIMIZE_BY_NEGATION: ClassVar[bool] = False
    #: Per-group hyperparameters every optimizer that has them checks in ``add_param_group``
    #: (a group of the constructor's list or one added later), with the constructor's one-line
    #: errors: a group's ``weight_decay=-1`` must not wait for a step to go wrong.
    _GROUP_CHECKS: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "lr": check_nonnegative,
        "weight_decay": check_nonnegative,
        "eps": check_positive,
        "maximize": check_bool,
        "decoupled_weight_decay": check_bool,
        "betas": check_betas,
    }

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        check_implementation(
            type(self).__name__, defaults.get("implementation", "auto"), self.PATHS
        )
        self.skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        self.global_reduce = validate_global_reduce(global_reduce)
        self.stochastic_rounding = check_bool("stochastic_rounding", stochastic_rounding)
        # seeded from torch's seed now: the same seed gives the same roundings (and DDP ranks,
        # seeded alike, round alike)
        self._rounding = RoundingStream(torch.initial_seed())
        self.global_state: dict[str, torch.Tensor] = {}
        self._reset_transient()
        if "lr" in defaults:
            defaults = {**defaults, "lr": scalar_value("lr", defaults["lr"])}
        super().__init__(params, defaults)

    def _reset_transient(self) -> None:
        """Attributes that live for one process only (recreated by ``__setstate__``)."""
        self._notice = _NonfiniteNotice(type(self).__name__)
        self._last_ok: torch.Tensor | None = None
        # (parameter view, the fp32/contiguous copy stepped in its place, round stochastically)
        self._write_back: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self.keys_filled_on_load: tuple[str, ...] = ()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: its ``lr`` may be a one-element tensor (read once, as a number); the
        constructor-only options (``_CONSTRUCTOR_ONLY``) cannot be set per group."""
        for key in self._CONSTRUCTOR_ONLY:
            if key in param_group:
                raise ValueError(
                    f"{type(self).__name__}: {key} is a constructor argument that holds for the "
                    "whole optimizer; it cannot be set in a param group (pass it to the "
                    "constructor)"
                )
        if "lr" in param_group:
            param_group["lr"] = scalar_value("lr", param_group["lr"])
        for key, check in self._GROUP_CHECKS.items():
            if key in param_group and key in self.defaults:
                check(key, param_group[key])
        if "implementation" in param_group:
            check_implementation(type(self).__name__, param_group["implementation"], self.PATHS)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ copies and loading
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in self._PICKLED_ATTRIBUTES:
            state[name] = self.__dict__[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling / ``copy.deepcopy`` (the full state) and ``load_state_dict`` (``state`` and
        ``param_groups`` only): checks the per-parameter state against the parameters before
        anything changes, then fills what older state dicts lack."""
        if "state" in state and "param_groups" in state:
            self._check_state_shapes(state["state"], state["param_groups"])
        super().__setstate__(state)
        for name, default in (
            ("global_state", {}),
            ("skip_nonfinite", True),
            ("stochastic_rounding", True),
        ):
            self.__dict__.setdefault(name, default)
        if "_rounding" not in self.__dict__:
            self._rounding = RoundingStream(0)
        self.__dict__.setdefault("global_reduce", "auto")
        if "_notice" not in self.__dict__:
            self._reset_transient()
        for group in self.param_groups:
            self._fill_group(group)

    def _fill_group(self, group: dict[str, Any]) -> None:
        """Complete a group restored from a state dict: keys it lacks (an older version of the
        optimizer, a hand-written dict) take the constructor's values, as torch.optim fills
        ``maximize`` and ``foreach``; a tensor ``lr`` becomes the number it holds. Subclasses
        add keys that are not in ``defaults``."""
        for key, value in self.defaults.items():
            if key not in _TORCH_ONLY_DEFAULTS:
                group.setdefault(key, value)
        if "lr" in group:
            group["lr"] = scalar_value("lr", group["lr"])

    def _check_state_shapes(self, state: dict[Any, Any], groups: list[dict[str, Any]]) -> None:
        """Every per-parameter state tensor of a state dict being loaded must fit its parameter
        (:meth:`_misfit`); ``ValueError`` naming the parameter and the key otherwise."""
        for gi, group in enumerate(groups):
            for i, p in enumerate(group["params"]):
                saved = state.get(p) if isinstance(p, torch.Tensor) else None
                problem = self._misfit(p, saved) if isinstance(saved, dict) else None
                if problem is not None:
                    raise ValueError(
                        f"{type(self).__name__}: the state of param_groups[{gi}]['params'][{i}] "
                        f"does not fit it: {problem}; was the state dict saved for another model?"
                    )

    def _misfit(self, param: torch.Tensor, state: dict[str, Any]) -> str | None:
        """What in ``state`` does not fit ``param``, or None: the keys in ``SCALAR_STATE_KEYS``
        hold one number, every other tensor has the parameter's shape (that of its real view
        if complex; global or rank-local for a ``DTensor``)."""
        expected: list[torch.Size] | None = None
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key in self.SCALAR_STATE_KEYS:
                if value.numel() != 1:
                    return f"{key!r} has shape {list(value.shape)}, expected one number"
                continue
            if expected is None:
                expected = _state_shapes(param)
            if value.shape not in expected:
                return f"{key!r} has shape {list(value.shape)}, expected shape {list(expected[0])}"
        return None

    # ------------------------------------------------------------------ subclass hooks
    def _path(
        self,
        group: dict[str, Any],
        device: torch.device,
        numel: int,
        *,
        native: Callable[[], bool] | None = None,
        foreach: Callable[[], bool] | None = None,
        offered: Sequence[str] | None = None,
    ) -> str:
        """The form that runs a bucket of ``group`` on ``device`` (``numel`` elements):
        :func:`~hf_tuningfree.optim.kernels.choose_path` with this class's ``PATHS`` (or
        ``offered``, for a piece of the step with fewer forms) and ``AUTO_ORDER``."""
        return choose_path(
            group["implementation"],
            device,
            numel,
            offered=self.PATHS if offered is None else offered,
            order=self.AUTO_ORDER,
            native=native,
            foreach=foreach,
        )

    def _before_step(self) -> None:
        """Checks a subclass makes before anything of a step runs (the closure included).
        Subclasses extend this rather than ``step()``: torch wraps every class's ``step`` with
        the step hooks, so a ``step`` override calling ``super().step()`` runs them twice."""

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

    def state_bytes(self) -> StateBytes:
        """The optimizer's state in bytes (:func:`~hf_tuningfree.optim.memory.state_bytes`):
        ``.per_element`` is the per-parameter state per parameter element (AdamW, fp32: 8.0).
        Reads no device value."""
        return state_bytes(self)

    # ------------------------------------------------------------------ step machinery
    def _collect(self) -> StepBatch:
        groups: list[GroupBatch] = []
        device: torch.device | None = None
        write_back = self._write_back = []
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.dim() != 0:  # assigned after the setup
                group["lr"] = _zero_dim_lr(lr)
            gb = GroupBatch(group)
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; use dense "
                        "gradients (e.g. nn.Embedding(sparse=False))."
                    )
                state = self.state[p]
                local_p = local_view(p)
                local_g = local_view(grad)
                if local_p.is_complex():  # optimized as its real view (module docstring)
                    local_p = torch.view_as_real(local_p)
                    local_g = torch.view_as_real(local_g)
                fresh = len(state) == 0
                if fresh:
                    self._init_param_state(
                        torch.view_as_real(p) if p.is_complex() else p, state, group
                    )
                    _make_contiguous(state)

                rounded = self.stochastic_rounding and local_p.dtype in LOW_PRECISION
                if rounded or not local_p.is_contiguous():
                    # a strided view, or a bf16/fp16 parameter rounded stochastically: step a
                    # contiguous (fp32) copy, written back after the step
                    dtype = torch.float32 if rounded else local_p.dtype
                    work = local_p.to(dtype, memory_format=torch.contiguous_format, copy=True)
                    write_back.append((local_p, work, rounded))
                    local_p = work
                if not local_g.is_contiguous():
                    local_g = local_g.contiguous()
                gb.params.append(local_p)
                gb.grads.append(local_g)
                gb.states.append(state)
                gb.originals.append(p)
                gb.fresh.append(fresh)
                if device is None:
                    device = local_p.device
            self._check_fit(gb)  # a state changed by hand since it was loaded or created
            groups.append(gb)
        if device is None:  # no gradients on this rank: still take part in collectives
            first = next((p for g in self.param_groups for p in g["params"]), None)
            device = local_view(first).device if first is not None else torch.device("cpu")
        return StepBatch(groups, device)

    def _negate_for_maximize(self, batch: StepBatch) -> list[torch.Tensor]:
        """With ``MAXIMIZE_BY_NEGATION``: negate, in place, the gradients of the groups that
        maximize, and return them (the step negates them back); else nothing."""
        if not self.MAXIMIZE_BY_NEGATION:
            return []
        grads: list[torch.Tensor] = []
        seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
        for gb in batch.groups:
            if not gb.group.get("maximize", False):
                continue
            for g in gb.grads:
                # one gradient tensor shared by two parameters (or two views of the same
                # memory) is negated once: twice would hand the passes +grad
                where = (g.untyped_storage().data_ptr(), g.storage_offset(), g.shape, g.stride())
                if where not in seen:
                    seen.add(where)
                    grads.append(g)
        if grads:
            torch._foreach_neg_(grads)
        return grads

    def _check_fit(self, gb: GroupBatch) -> None:
        """``RuntimeError`` naming the parameter and the key if a state of the group does not fit
        its parameter (:meth:`_misfit`). This runs for every tensor at every step, so the common
        case (every parameter with the same keys, each state tensor of its parameter's shape or
        one number under ``SCALAR_STATE_KEYS``) is tested with whole-list comparisons; anything
        else (a complex or sharded parameter, a key some parameters lack) per parameter."""
        states = gb.states
        if not states:
            return
        keys = states[0].keys()
        try:
            if all(map(keys.__eq__, map(dict.keys, states))):
                shapes = list(map(_shape, gb.originals))
                fits = True
                for key in keys:
                    values = list(map(operator.itemgetter(key), states))
                    if key in self.SCALAR_STATE_KEYS:
                        fits = all(map((1).__eq__, map(torch.Tensor.numel, values)))
                    else:
                        fits = list(map(_shape, values)) == shapes
                    if not fits:
                        break
                if fits:
                    return
        except (AttributeError, TypeError):  # a state value that is not a tensor
            pass
        for p, state in zip(gb.originals, states, strict=True):
            problem = self._misfit(p, state)
            if problem is not None:
                gi, pi = next(
                    (gi, pi)
                    for gi, group in enumerate(self.param_groups)
                    for pi, q in enumerate(group["params"])
                    if q is p
                )
                raise RuntimeError(
                    f"{type(self).__name__}: the state of param_groups[{gi}]['params'][{pi}] "
                    f"does not fit it: {problem}; nothing was updated (was the state changed "
                    "by hand?)"
                )

    def _located(self, batch: StepBatch, exc: StateShapeError) -> RuntimeError:
        """``exc`` with the parameter it is about named by its group and index."""
        where = "a parameter"
        for gb in batch.groups:
            for t, p in zip(gb.params, gb.originals, strict=True):
                if t is exc.param:
                    where = next(
                        f"param_groups[{gi}]['params'][{i}]"
                        for gi, group in enumerate(self.param_groups)
                        for i, q in enumerate(group["params"])
                        if q is p
                    )
        return RuntimeError(
            f"{type(self).__name__}: {where}: {exc}, so the fused and C paths refuse it (was the "
            "state or the parameter changed by hand?)"
        )

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
        self._before_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last_ok = None
        self._rounding.begin_step()
        batch = self._collect()
        plan = plan_reduction(
            (p for g in self.param_groups for p in g["params"]), self.global_reduce
        )
        if batch.num_tensors == 0 and not plan.is_sharded:
            return loss
        negated = self._negate_for_maximize(batch)
        try:
            local = dict(self._local_statistics(batch))
            if self.skip_nonfinite:
                local["_grad_norm_sum"] = self._finiteness_statistic(batch)
            stats = self._reduce(local, plan, batch.device)
            if self.skip_nonfinite:
                ok = torch.isfinite(stats.pop("_grad_norm_sum"))
            else:
                ok = torch.ones((), dtype=torch.bool, device=batch.device)
            self._update(batch, stats, ok)
        except StateShapeError as exc:
            raise self._located(batch, exc) from exc
        finally:
            write_back, self._write_back = self._write_back, []
            if negated:
                torch._foreach_neg_(negated)  # the caller's gradients as they were
        for view, work, rounded in write_back:  # the stepped copies (see _collect)
            if rounded:
                work = stochastic_round(work, view.dtype, self._rounding.generator(work.device))
            view.copy_(work)
        _bump_versions(batch)
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
        ok = self._last_ok
        return False if ok is None else ~ok

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if sd["param_groups"]:
            sd["param_groups"][0][GLOBAL_STATE_KEY] = {
                k: v.clone() for k, v in self.global_state.items()
            }
            sd["param_groups"][0][ROUNDING_STATE_KEY] = self._rounding.state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, plus the model-wide state; group keys the saved groups lack take the
        constructor's values (``__setstate__``) and are listed in ``keys_filled_on_load`` (an
        older version of the optimizer lacks a few; another optimizer's state lacks many: the
        Trainer's resume check reads it)."""
        groups = [dict(g) for g in state_dict["param_groups"]]
        saved_global: dict[str, torch.Tensor] = {}
        rounding = None
        for g in groups:
            saved_global.update(g.pop(GLOBAL_STATE_KEY, None) or {})
            rounding = g.pop(ROUNDING_STATE_KEY, None) or rounding
        if rounding is not None:  # the same random bits from here on as without the resume
            self._rounding = RoundingStream.from_state(rounding)
        lacking = {k for g in groups for k in self.defaults if k not in g}
        super().load_state_dict({**state_dict, "param_groups": groups})
        self.keys_filled_on_load = tuple(sorted(lacking - _TORCH_ONLY_DEFAULTS))
        self.global_state = {
            k: (v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v))
            for k, v in saved_global.items()
        }
        self._notice = _NonfiniteNotice(type(self).__name__)


_shape = operator.attrgetter("shape")


def _state_shapes(param: torch.Tensor) -> list[torch.Size]:
    """The shapes a state tensor of ``param`` may have: the parameter's (of its real view if
    complex), and for a ``DTensor`` also its rank-local shard's."""
    shapes = [param.shape]
    if is_dtensor(param):
        shapes.append(local_view(param).shape)
    if param.is_complex():
        shapes = [torch.Size((*shape, 2)) for shape in shapes]
    return shapes


def _zero_dim_lr(lr: torch.Tensor) -> torch.Tensor:
    """A one-element tensor ``lr`` of shape ``[1]``, ``[1, 1]``, ... as a 0-dim view of the same
    memory (no host read: a schedule that fills the tensor in place still reaches the step)."""
    if lr.numel() != 1:
        raise ValueError(
            f"Invalid lr: a tensor of shape {list(lr.shape)}; allowed: a number or a "
            "one-element tensor"
        )
    return lr.reshape(())


def _make_contiguous(state: dict[str, Any]) -> None:
    """State created from a strided parameter (``preserve_format`` keeps a transposed layout) is
    stored contiguous: every path then takes it as it is."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not is_dtensor(value) and not value.is_contiguous():
            state[key] = value.contiguous()


def _bump_versions(batch: StepBatch) -> None:
    """Tell autograd that every parameter and state tensor of the step was written in place:
    the C loops write through raw pointers, which autograd does not see (the torch paths' own
    in-place ops have bumped them already; a second bump is harmless)."""
    tensors: list[torch.Tensor] = []
    for gb in batch.groups:
        tensors += gb.originals  # their views in gb.params share their version counters
        tensors += [v for st in gb.states for v in st.values() if isinstance(v, torch.Tensor)]
    if tensors:
        torch.autograd.graph.increment_version(tensors)


def scalar_state(device: torch.device, value: float = 0.0) -> torch.Tensor:
    """A 0-dim fp32 tensor for per-parameter scalar state (``step``-style)."""
    return torch.full((), value, dtype=torch.float32, device=device)
