"""``DAdaptationBase``: what the D-Adaptation family and Prodigy share: the model-wide ``d`` (one
estimate, or one per named group with ``d_groups``), the order of a step (statistics, reduction,
update, ``d``; the fused form where no collective is made), the fast start, the ``slice_p`` state
layout and the logged values.

How each described pass runs over the tensors (paths, packing, the sliced and fused forms) is
:mod:`.runner`'s; the pass descriptions and their helpers are :mod:`.passes`'. See
:mod:`hf_tuningfree.optim.dadapt` for how a step runs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .. import _native
from ..base import (
    GroupBatch,
    StepBatch,
    TuningFreeOptimizer,
    _state_shapes,
    real_dtype,
)
from ..distributed import local_view, plan_reduction
from ..kernels import AutoOrder, check_implementation
from ..validation import (
    check_bool,
    check_choice,
    check_nonnegative,
)
from .passes import (
    D_GROUPS,
    TensorPass,
    _kept,
    _kept_count,
    _scoped,
    _sq_sum,
)
from .runner import PassRunner, _fusable


class DAdaptationBase(PassRunner, TuningFreeOptimizer):
    """What the D-Adaptation family (and Prodigy) share: the model-wide ``d`` and step counter in
    ``global_state``, the statistics and update passes over (packed) tensors, and the checks that
    model-wide hyperparameters agree across groups.

    A subclass sets ``_MODEL_WIDE`` (group keys that must agree) and implements:

    * ``_statistics_pass(gb, d, step)``: ``(TensorPass, scalars, static)`` of the read-only pass
      whose first sum is ``g_sq`` (``||g||^2`` of the raw gradient);
    * ``_combine_statistics(batch, per_group, d, step)``: this rank's sums from the per-group
      sums of that pass (plus ``_idle_contribution`` of parameters without a gradient);
    * ``_update_pass(gb, d, step, stats, ok)``: ``(TensorPass, scalars, static)`` of the update;
      every write must be a no-op where ``ok`` is False;
    * ``_finish(stats, ok, d, step)``: the new ``d`` and global scalars from the reduced sums.

    The passes run through :class:`~.runner.PassRunner` (``PACK_BELOW``: tensors smaller than it
    are packed into one call).
    """

    _MODEL_WIDE: tuple[str, ...] = ("d0", "growth_rate")
    #: Whether a step may run in the fused form (see ``_fuses``); tests switch it off to compare.
    FUSE = True
    #: the C kernels, the compiled passes, the passes as foreach ops over a bucket
    #: (:mod:`~hf_tuningfree.optim.multitensor`) and the loop
    PATHS = ("native", "compiled", "foreach", "loop")
    #: CUDA: the multi-tensor form first (O(1) launches per op whatever the number of tensors;
    #: the compiled form launches one kernel per tensor). Not yet measured on a GPU:
    #: benchmarks/gpu_step_time.py compares the two when one is lent.
    AUTO_ORDER = AutoOrder(cuda=("foreach", "compiled", "loop"))
    _fused_step = False
    #: The estimate being worked on: "" (the model's, or the unnamed groups' with
    #: ``d_groups="group"``) or "@<name>"; it suffixes every ``global_state`` key (``_global``).
    _scope = ""

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; model-wide hyperparameters must equal the first group's, per-group ones
        are validated like the constructor's."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(merged)
        if self.param_groups:
            first = self.param_groups[0]
            for key in (*self._MODEL_WIDE, "d_groups", "d0_rel"):
                if key in merged and merged[key] != first[key]:
                    raise ValueError(
                        f"{type(self).__name__}: {key}={merged[key]!r} in a param group differs "
                        f"from {first[key]!r} in the first group; {key} defines the one "
                        "model-wide step size d and must be the same in every group"
                    )
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's per-group hyperparameters (subclasses extend)."""
        check_nonnegative("lr", group["lr"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])
        check_implementation(type(self).__name__, group["implementation"], self.PATHS)
        check_choice("d_groups", group.get("d_groups", "model"), D_GROUPS)
        check_nonnegative("d0_rel", group.get("d0_rel", 0.0))
        name = group.get("name")
        if (
            group.get("d_groups") == "group"
            and name is not None
            and (not isinstance(name, str) or not name or "@" in name)
        ):
            raise ValueError(
                f"Invalid param group name {name!r}; allowed with d_groups='group': a non-empty "
                "string without '@' (groups with the same name share one d)"
            )

    # ------------------------------------------------------------------ subclass hooks
    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def _combine_statistics(
        self,
        batch: StepBatch,
        per_group: list[dict[str, torch.Tensor]],
        d: torch.Tensor,
        step: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _update_pass(
        self,
        gb: GroupBatch,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        raise NotImplementedError

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Contributions to the sums of a parameter that has state but no gradient this step (its
        ``s`` is unchanged and still part of the model's ``||s||``)."""
        return {}

    def _guard_statistics(
        self, batch: StepBatch, g_sq: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """In a fused step, the sums that ``_update_pass`` reads, formed from the guard's
        per-group ``||g||^2`` alone (DAdaptSGD's ``||g_0||``); none by default."""
        return {}

    # ------------------------------------------------------------------ the step
    def _scalar_dtype(self) -> torch.dtype:
        """fp64 if any parameter is fp64, else fp32: the dtype of ``d`` and of every model-wide
        sum. Derived from all parameters, not from this rank's gradients, so that every rank
        computes ``d`` in the same dtype (bit-identical across ranks). Found once per step (it is
        asked for dozens of times)."""
        cached = getattr(self, "_step_scalar_dtype", None)
        if cached is not None:
            return cached
        params = (p for g in self.param_groups for p in g["params"])
        fp64 = any(real_dtype(p.dtype) == torch.float64 for p in params)
        return torch.float64 if fp64 else torch.float32

    def _global(self, name: str, device: torch.device, value: float = 0.0) -> torch.Tensor:
        """The current estimate's ``name`` in ``global_state`` (see ``_scope``)."""
        dtype = self._scalar_dtype()
        return self.global_tensor(
            name + self._scope, device, lambda dev: torch.full((), value, dtype=dtype, device=dev)
        )

    def _estimates(self, batch: StepBatch) -> list[tuple[str, StepBatch]]:
        """``(scope, the groups it covers)`` for every estimate of ``d``: the whole batch with
        ``d_groups="model"``; with ``"group"`` one per distinct group ``name`` (groups without a
        name share the unnamed one, so the Trainer's decay/no-decay split stays one estimate),
        in the order of the param groups (the same on every rank)."""
        if self.param_groups[0].get("d_groups", "model") != "group":
            return [("", batch)]
        scopes: dict[str, list[GroupBatch]] = {}
        for gb in batch.groups:
            name = gb.group.get("name")
            scopes.setdefault("" if name is None else f"@{name}", []).append(gb)
        return [(scope, StepBatch(gbs, batch.device)) for scope, gbs in scopes.items()]

    def _d_and_step(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._global("d", device, self.param_groups[0]["d0"]), self._global("step", device)

    def _fuses(self, batch: StepBatch) -> bool:
        """Whether this step runs in the fused form: the guard's pass (``||g||^2``, one read of
        the gradients) as the local statistics, then one C kernel per group that computes the
        other sums from the state before the step while it updates it. That needs no collective
        between the sums and the update, so only where none is made (one process, DDP, not
        sharded) and where every group is one bucket the C kernels take; it reads the model's
        state once per step where the two-pass form reads most of it twice."""
        if not self.FUSE or _native.load() is None:
            return False
        # slice_p > 1: the fused *_sliced kernels take s (and x0) at 1/k size, checked there
        withheld = self.SLICED_KEYS if self._slice_p() > 1 else frozenset()
        params = (p for g in self.param_groups for p in g["params"])
        if plan_reduction(params, self.global_reduce).is_sharded:
            return False
        for gb in batch.groups:
            if not gb.params:
                continue
            numel = sum(p.numel() for p in gb.params)
            takes = functools.partial(_fusable, gb, withheld)
            if self._path(gb.group, batch.device, numel, native=takes) != "native":
                return False
        return True

    def _settle_fresh_state(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """Complete the state created in this step (``batch``'s ``fresh`` parameters) before
        any pass reads it; returns sums that must travel in the step's reduction for that (none
        by default). Prodigy decides its implicit ``x0`` here."""
        return {}

    def _settled(self, batch: StepBatch, stats: dict[str, torch.Tensor]) -> None:
        """After the reduction: use (and remove from ``stats``) what ``_settle_fresh_state``
        put into it."""

    def _local_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        self._step_scalar_dtype = None
        self._step_scalar_dtype = self._scalar_dtype()  # until the end of _update
        settling = self._settle_fresh_state(batch)
        self._fused_step = self._fuses(batch)
        self._guard_by_scope: dict[str, list[torch.Tensor]] = {}
        local: dict[str, torch.Tensor] = {}
        finite = []
        try:
            for scope, sub in self._estimates(batch):
                self._scope = scope
                sums = self._estimate_statistics(sub)
                local.update({name + scope: value for name, value in sums.items()})
                finite.append(self._finite_term)
        finally:
            self._scope = ""
        self._finite_term = torch.stack(finite).sum()
        return {**local, **settling}

    def _estimate_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """This rank's sums for the current estimate (the groups in ``batch``)."""
        dtype = self._step_scalar_dtype
        start = self._start_statistics(batch)
        if self._fused_step:
            # only the guard's sums now; the others come out of the fused update (_fused_update)
            guard = [self._grad_sq(gb) for gb in batch.groups]
            self._guard_by_scope[self._scope] = guard
            self._finite_term = torch.stack(guard).sum().to(dtype)
            return start
        d, step = self._d_and_step(batch.device)
        per_group = self._run_pass(batch, lambda gb: self._statistics_pass(gb, d, step))
        local = self._with_idle_sums(batch, self._combine_statistics(batch, per_group, d, step))
        # ||g||^2 is NaN/Inf exactly when a gradient is (short of |g| > 1e19): the guard's sum,
        # so the guard needs no pass of its own (see _finiteness_statistic).
        self._finite_term = torch.stack([g["g_sq"].to(dtype) for g in per_group]).sum()
        return {**local, **start}

    # ------------------------------------------------------------------ fast start
    #: How the weights' scale is measured for the fast start: ``"rms"`` (per coordinate, for the
    #: Adam and AdaGrad forms, whose d is a per-coordinate step) or ``"norm"`` (SGD's d is an
    #: L2 distance).
    _X0_SCALE = "rms"
    #: Global keys raised to the start value with ``d`` (Prodigy adds ``d_max``).
    _START_KEYS: tuple[str, ...] = ("d",)

    def _start_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """At the first ``step()`` (before any ``x0_scale`` exists) and with ``d0_rel > 0``, this
        rank's ``||x_0||^2`` and element count of the estimate's parameters with a gradient, in
        the groups with ``lr > 0`` (frozen groups stay out of ``d``; all groups when every
        ``lr`` is 0, as at the first step of a warm-up); they travel in the step's one
        reduction. Nothing afterwards."""
        if self.param_groups[0]["d0_rel"] == 0 or "x0_scale" + self._scope in self.global_state:
            return {}
        live = [gb for gb in batch.groups if gb.group["lr"] > 0] or batch.groups
        params = [p for gb in live for p in gb.params]
        sq = sum((_sq_sum(p, True) for p in params), torch.zeros((), dtype=torch.float64))
        # an FSDP1 flat shard ends in zero padding that is no weight: leave it out of the count
        padded = (getattr(o, "_shard_numel_padded", 0) for gb in live for o in gb.originals)
        count = float(sum(p.numel() for p in params) - sum(padded))
        return {"x0_sq": sq.to(batch.device), "x0_count": torch.tensor(count, device=batch.device)}

    def _x0_scale(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weights' scale from the first step's sums: ``sqrt(||x_0||^2 / n)`` (``"rms"``)
        or ``||x_0||`` (``"norm"``); an estimate whose weights are all zero (LoRA's B alone)
        takes the mean square of all the estimates' weights together: their RMS, or
        ``RMS sqrt(n)``, the norm its ``n`` weights would have at that RMS."""
        totals = getattr(self, "_x0_totals", None)
        sq, count = stats["x0_sq"], stats["x0_count"]
        if totals is not None:  # all zero: the model's mean square times this estimate's size
            sq = torch.where(sq > 0, sq, totals[0] / totals[1].clamp_min(1.0) * count)
        if self._X0_SCALE == "norm":
            return sq.sqrt()
        return torch.where(count > 0, (sq / count.clamp_min(1.0)).sqrt(), 0.0)

    def _fast_start(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        """After the first applied step, raise ``d`` to ``d0_rel`` times the weights' scale.

        The first step is a probe at ``d0``; no estimator can raise ``d`` there (its numerator
        is 0 at ``x = x_0``), and growing from ``d0 = 1e-6`` took Prodigy and D-Adapt Adam
        20-50 steps to half their final ``d`` on the suite's tasks, D-Adapt SGD and AdaGrad
        35-610 (README, "Fast start"). Starting from the weights' scale makes the start
        equivariant to a rescaling of the parameters (as DoG's ``r_eps`` relative to
        ``||x_0||``) and leaves ``d`` a lower bound where ``d0_rel`` is below the ratio
        ``d / scale`` a task settles at: 0.012-0.85 measured on the suite (the smallest on the
        pretrained full fine-tune, whose LayerNorm weights of ~1 raise the RMS), against the
        default 1e-2. ``d`` never decreases, so a start above that ratio would stay."""
        rel = self.param_groups[0]["d0_rel"]
        if rel == 0:
            return
        if "x0_sq" in stats:
            self._global("x0_scale", d.device).copy_(self._x0_scale(stats).to(d.dtype))
        start = rel * self._global("x0_scale", d.device)
        first = ok & (step == 0)
        for key in self._START_KEYS:
            value = d if key == "d" else self._global(key, d.device)
            value.copy_(torch.where(first, torch.maximum(value, start), value))

    def _with_idle_sums(
        self, batch: StepBatch, local: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        dtype = self._scalar_dtype()
        for name, values in self._idle_sums(batch).items():
            local[name] = local[name] + batch.sum_on_device(values).to(dtype)
        return local

    def _fused_update(
        self, batch: StepBatch, d: torch.Tensor, step: torch.Tensor, ok: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The update of a fused step, one C kernel per group (``_run_fused``); returns this
        step's sums as the two-pass form's statistics would have them (the fused kernels write
        zero sums and nothing else when ``ok`` is False)."""
        guard = self._guard_by_scope[self._scope]
        before = self._guard_statistics(batch, guard)
        per_group = []
        for gb, g_sq in zip(batch.groups, guard, strict=True):
            tensor_pass, scalars, static = self._update_pass(gb, d, step, before, ok)
            per_group.append({"g_sq": g_sq, **self._run_fused(gb, tensor_pass, scalars, static)})
        return self._with_idle_sums(batch, self._combine_statistics(batch, per_group, d, step))

    def _finiteness_statistic(self, batch: StepBatch) -> torch.Tensor:
        term = getattr(self, "_finite_term", None)
        self._finite_term = None
        return term if term is not None else super()._finiteness_statistic(batch)

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        stats = dict(stats)
        self._settled(batch, stats)
        sq = [v for k, v in stats.items() if k.partition("@")[0] == "x0_sq"]
        count = [v for k, v in stats.items() if k.partition("@")[0] == "x0_count"]
        self._x0_totals = (sum(sq), sum(count)) if len(sq) > 1 else None
        try:
            for scope, sub in self._estimates(batch):
                self._scope = scope
                self._update_estimate(sub, _scoped(stats, scope), ok)
        finally:
            self._scope = ""
            self._step_scalar_dtype = None

    def _update_estimate(
        self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor
    ) -> None:
        """Update the groups of the current estimate, then its ``d``."""
        self._scope_groups = [gb.group for gb in batch.groups]
        d, step = self._d_and_step(batch.device)
        reduced = stats
        if self._fused_step:
            stats = self._fused_update(batch, d, step, ok)
        else:
            self._run_pass(batch, lambda gb: self._update_pass(gb, d, step, stats, ok))
        self._finish(stats, ok, d, step)
        self._fast_start(reduced, ok, d, step)
        step.add_(ok.to(step.dtype))

    def _store_unless_skipped(self, ok: torch.Tensor, **values: torch.Tensor) -> None:
        """Write this step's model-wide scalars into ``global_state``; a skipped step (``ok``
        False) keeps the old ones."""
        for name, value in values.items():
            kept = self._global(name, value.device)
            kept.copy_(torch.where(ok, value, kept))

    def _idle_sums(self, batch: StepBatch) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        for gb in batch.groups:
            active = {id(p) for p in gb.originals}
            for p in gb.group["params"]:
                if id(p) in active or p not in self.state or not self.state[p]:
                    continue
                for name, value in self._idle_contribution(self.state[p]).items():
                    out.setdefault(name, []).append(value)
        return out

    # ------------------------------------------------------------------ slice_p
    #: State keys stored on every ``slice_p``-th element only (``slice_p > 1``): the ones that
    #: serve only the estimate of ``d``.
    SLICED_KEYS: frozenset[str] = frozenset()
    #: Whether the subsampled sums are scaled by ``slice_p`` (estimates of the full sums): needed
    #: where ``d_hat`` is a ratio of sums of different degree (SGD's ``N / ||s||_2``); the ratios
    #: of the Adam forms (``r / ||s||_1``) are unchanged by it, and their sums are left plain.
    _SCALE_SLICED_SUMS = False

    def _slice_p(self) -> int:
        return self.param_groups[0].get("slice_p", 1) if self.param_groups else 1

    def _stat_zeros(self, param: torch.Tensor) -> torch.Tensor:
        """A zero state tensor for a key of ``SLICED_KEYS``: the parameter's shape, or with
        ``slice_p = k > 1`` a 1-D tensor for the kept elements (of the rank-local shard)."""
        k = self._slice_p()
        if k == 1:
            return torch.zeros_like(param, memory_format=torch.preserve_format)
        local = local_view(param)
        return local.new_zeros(_kept_count(local.numel(), k))

    def _stat_copy(self, param: torch.Tensor) -> torch.Tensor:
        """A copy of the parameter for a key of ``SLICED_KEYS`` (Prodigy's ``x0``)."""
        k = self._slice_p()
        if k == 1:
            return param.detach().clone(memory_format=torch.preserve_format)
        return _kept(local_view(param).detach().contiguous(), k).clone()

    def _misfit(self, param: torch.Tensor, state: dict[str, Any]) -> str | None:
        """As the base's, but with ``slice_p = k > 1`` the keys of ``SLICED_KEYS`` are 1-D with
        ``ceil(n / k)`` elements (``n`` the parameter's, or its rank-local shard's, size)."""
        k = getattr(self, "_loading_slice_p", None) or self._slice_p()
        sliced = [key for key in self.SLICED_KEYS if isinstance(state.get(key), torch.Tensor)]
        if k > 1 and sliced:
            sizes = [_kept_count(math.prod(shape), k) for shape in _state_shapes(param)]
            for key in sliced:
                shape = list(state[key].shape)
                if len(shape) != 1 or shape[0] not in sizes:
                    return (
                        f"{key!r} has shape {shape}, expected [{sizes[0]}] (slice_p={k}: every "
                        f"{k}-th element of a parameter of shape {list(param.shape)})"
                    )
            state = {key: v for key, v in state.items() if key not in sliced}
        return super()._misfit(param, state)

    def _check_fit(self, gb: GroupBatch) -> None:
        """The base's check, with ``slice_p = k > 1`` first as whole-list comparisons (every
        parameter with the same keys, the sliced keys 1-D with ``ceil(n / k)`` elements, the
        others of the parameter's shape); anything else goes to the base's per-parameter check
        (through :meth:`_misfit`)."""
        k = self._slice_p()
        states = gb.states
        if k == 1 or not states or any(map(torch.Tensor.is_complex, gb.originals)):
            return super()._check_fit(gb)
        keys = states[0].keys()
        try:
            if all(map(keys.__eq__, map(dict.keys, states))):
                shapes = [local_view(p).shape for p in gb.originals]
                kept = [torch.Size((_kept_count(math.prod(s), k),)) for s in shapes]
                for key in keys:
                    values = [local_view(st[key]).shape for st in states]
                    if key in self.SCALAR_STATE_KEYS or values != (
                        kept if key in self.SLICED_KEYS else shapes
                    ):
                        break
                else:
                    return
        except (AttributeError, TypeError):  # a state value that is not a tensor
            pass
        super()._check_fit(gb)

    def _check_state_shapes(self, state: dict[Any, Any], groups: list[dict[str, Any]]) -> None:
        # the state being loaded follows the slice_p of the groups it comes with
        self._loading_slice_p = groups[0].get("slice_p", 1) if groups else None
        try:
            super()._check_state_shapes(state, groups)
        finally:
            self._loading_slice_p = None

    # ------------------------------------------------------------------ logging
    def _global_float(self, name: str, default: float = 0.0) -> float:
        t = self.global_state.get(name)
        return float(t) if t is not None else default

    def stats(self) -> dict[str, float]:
        out = super().stats()
        d0 = self.param_groups[0]["d0"]
        out["d"] = self._global_float("d", d0)
        names = [g.get("name") for g in self.param_groups]
        if self.param_groups[0].get("d_groups", "model") == "group":
            named = list(dict.fromkeys(n for n in names if n is not None))
            for name in named:  # d/<name> per named estimate; d stays the unnamed groups'
                out[f"d/{name}"] = self._global_float(f"d@{name}", d0)
            if named and None not in names:
                out["d"] = out[f"d/{named[0]}"]
        out["step"] = self._global_float("step")
        out["lr"] = max((g["lr"] for g in self.param_groups), default=0.0)
        return out
