"""The base optimizer's two passes over the parameters, and where each runs:
:class:`ParameterPasses`, the part of
:class:`~hf_tuningfree.optim.hypergradient.tower.HypergradientOptimizer` that forms the
per-tensor dots ``<g, du/dh>`` and applies the base update.

It holds the hooks a base optimizer implements for those passes (``_group_dots``,
``_group_update`` and their C forms ``_native_bucket_dots``, ``_native_update``), the choice
of path for each group (the C loops of :mod:`hf_tuningfree.optim._native`, torch's fused
multi-tensor kernel, the compiled kernels or the loop) and the non-finite guard's own pass when
nothing is learned. The tower itself (its levels, their parametrised values and state, the
hyper-updates) is :mod:`.tower`'s.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _native
from ..base import StepBatch, bucket_by_device_and_dtype, foreach_norms
from .kernels import _stored_dots


def _native_loaded() -> bool:
    return _native.load() is not None


class ParameterPasses:
    """The per-parameter passes of a hypergradient optimizer (mixed into
    :class:`~hf_tuningfree.optim.hypergradient.tower.HypergradientOptimizer`, whose ``learn``,
    ``STORED_DERIVATIVES``, ``PATHS``, ``_step_cache`` and ``_path`` it reads).

    Where the update stores ``du/dh`` per element, ``STORED_DERIVATIVES`` names the state key of
    each, and the default ``_dot_names`` / ``_group_dots`` dot the gradient with them.
    """

    # ------------------------------------------------------------------ subclass hooks
    def _stored_derivatives(self) -> list[str]:
        """State keys of the stored derivatives of the learned hyperparameters."""
        return [key for name, key in self.STORED_DERIVATIVES if name in self.learn]

    def _dot_names(self, group: dict[str, Any]) -> list[str]:
        """Names of the per-group dot products, in the order ``_group_dots`` returns them."""
        return [name for name, _ in self.STORED_DERIVATIVES if name in self.learn]

    def _group_dots(
        self, gb: Any, values: dict[str, torch.Tensor], impl: str
    ) -> list[torch.Tensor]:
        """Per tensor of ``gb``, a 1-D tensor of the dot products named by ``_dot_names``."""
        return _stored_dots(gb, [gb.state_list(k) for k in self._stored_derivatives()], impl)

    def _group_update(
        self,
        gb: Any,
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
        impl: str,
    ) -> None:
        """The base optimizer's update of ``gb`` with hyperparameter ``values`` (0-dim tensors)
        and effective step size ``lr``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the C path
    # On CPU (``"auto"``, ``"compiled"``; fp32/fp64 contiguous tensors; a C compiler) both passes
    # of a group are C loops of :mod:`._native`, one call per device/dtype bucket: the dots
    # (``_native_bucket_dots``) and the update (``_native_update``). Subclasses say which state
    # they need (``_native_state_keys``; ``NATIVE_COUNTER``: a per-parameter fp32 step counter the
    # C code reads and advances) and whether a configuration is covered (``_native_covers``).
    NATIVE_COUNTER: str | None = None

    def _native_covers(self, group: dict[str, Any]) -> bool:
        """Whether the C loops implement this configuration (default: yes)."""
        return True

    def _native_state_keys(self, group: dict[str, Any]) -> list[str]:
        """Per-parameter state tensors the C loops read or write, in their argument order."""
        raise NotImplementedError

    def _native_ok(self, gb: Any) -> bool:
        """Whether group batch ``gb`` runs on the C loops this step."""
        return self._native_plan(gb) is not None

    def _native_plan(self, gb: Any) -> list[tuple[list[_native.Addresses], list[int]]] | None:
        """The C path's view of ``gb`` for this step, formed once (both passes share it): per
        device/dtype bucket, the addresses of ``[params, grads, *state lists, counters]`` and the
        bucket's indices in ``gb``; None when the group takes the torch paths."""
        cache = self._step_cache.setdefault("native", {})
        key = id(gb)
        if key not in cache:
            cache[key] = self._native_check(gb)
        return cache[key]

    def _native_check(self, gb: Any) -> list[tuple[list[_native.Addresses], list[int]]] | None:
        group = gb.group
        if not gb.params or not self._native_covers(group):
            return None
        device = gb.params[0].device
        # whether the C form is the one to run; the buckets it takes are worked out below
        if self._path(group, device, gb.numel, native=_native_loaded) != "native":
            return None
        lists = [gb.params, gb.grads, *(gb.state_list(k) for k in self._native_state_keys(group))]
        whole = self._native_addresses(gb, lists, list(range(len(gb.params))))
        if whole is not None:
            return [whole]  # the usual case: one bucket
        if len({(p.device, p.dtype) for p in gb.params}) == 1:
            return None
        plan = []
        for bucket, idx in bucket_by_device_and_dtype(lists).values():
            part = self._native_addresses(gb, bucket, idx)
            if part is None:
                return None
            plan.append(part)
        return plan

    def _native_addresses(
        self, gb: Any, lists: list[list[torch.Tensor]], idx: list[int]
    ) -> tuple[list[_native.Addresses], list[int]] | None:
        counters = []
        if self.NATIVE_COUNTER is not None:
            counters.append([gb.states[i][self.NATIVE_COUNTER] for i in idx])
        names = ["param", "grad", *self._native_state_keys(gb.group)]
        addrs = _native.hyper_addresses(lists, counters, names)
        return None if addrs is None else (addrs, idx)

    def _native_dots(self, gb: Any, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dots of ``_group_dots`` for every tensor of ``gb`` as one ``(n, len(names))``
        fp64 CPU tensor, from one C pass per bucket over the gradients."""
        plan = self._native_plan(gb)
        assert plan is not None
        out = torch.empty(len(gb.params), len(self._dot_names(gb.group)), dtype=torch.float64)
        if len(plan) == 1:
            self._native_bucket_dots(gb, plan[0][0], out)
            return out
        for addrs, idx in plan:
            part = torch.empty(len(idx), out.shape[1], dtype=torch.float64)
            self._native_bucket_dots(gb, addrs, part)
            out[torch.tensor(idx)] = part
        return out

    def _native_bucket_dots(
        self, gb: Any, addrs: list[_native.Addresses], out: torch.Tensor
    ) -> None:
        """Default: ``<g, D>`` with the stored derivatives (state keys of
        ``_stored_derivatives``, after the parameters and gradients in ``addrs``)."""
        keys = self._native_state_keys(gb.group)
        stored = [addrs[2 + keys.index(k)] for k in self._stored_derivatives()]
        _native.hyper_direction_dots(addrs[1], stored, out)

    def _native_update(
        self,
        gb: Any,
        addrs: list[_native.Addresses],
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        """The base update of one bucket of ``gb`` (``addrs``: ``[params, grads, *state lists,
        counters]``) by the C loop; it writes nothing unless ``ok``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ paths and the guard
    def _finiteness_statistic(self, batch: StepBatch) -> torch.Tensor:
        # NaN/Inf in any gradient element makes some dot product NaN/Inf (0 * inf is NaN too).
        if self._finite_term is not None:
            return self._finite_term
        # Nothing learned (height 0): the guard's own pass, one C loop per bucket where the
        # group runs on the C path (``_native.sum_sq``), else the gradient norms.
        parts: list[torch.Tensor] = []
        for gb in batch.groups:
            if not gb.params:
                continue
            plan = self._native_plan(gb)
            if plan is not None:
                for addrs, _ in plan:
                    total = torch.empty((), dtype=torch.float64)
                    _native.sum_sq(addrs[1].tensors, total)
                    parts.append(total)
            else:
                parts.extend(foreach_norms(gb.grads))
        return batch.sum_on_device(parts)

    def _fused_form(
        self, group: dict[str, Any], bucket: list[list[torch.Tensor]], fused: Any
    ) -> bool:
        """Whether the update of ``bucket`` runs as its ``"foreach"`` form, torch's fused
        multi-tensor kernel (``fused()``: whether the kernel takes the bucket), where the group
        does not take the C loops."""
        offered = tuple(p for p in self.PATHS if p != "native")
        numel = sum(p.numel() for p in bucket[0])
        device = bucket[0][0].device
        return self._path(group, device, numel, offered=offered, foreach=fused) == "foreach"

    #: Whether ``"foreach"`` means both passes as foreach ops over a bucket (HyperAdaGrad,
    #: HyperRMSProp: the update's per-tensor function on TensorLists, :func:`._update_each`, and
    #: the dots as segmented sums, :func:`._stored_dots`); HyperSGD's and HyperAdam's
    #: ``"foreach"`` is torch's fused kernel for the update instead (``_fused_form``).
    FOREACH_PASSES = False

    def _impl(self, gb: Any, device: torch.device, *, update: bool) -> str:
        """The form of the per-tensor pieces (the dots, an update the fused kernels do not run)
        where the group does not take the C loops: compiled or the loop, and foreach for a
        ``FOREACH_PASSES`` optimizer (elsewhere a requested ``"native"`` / ``"foreach"`` runs
        these pieces on the loop)."""
        forms = ("compiled", "foreach", "loop") if self.FOREACH_PASSES else ("compiled", "loop")
        offered = tuple(p for p in self.PATHS if p in forms)
        return self._path(gb.group, device, gb.numel, offered=offered)
