"""DoG: the model-wide distance-over-gradients step (the base of T-DoG and L-DoG).

See :mod:`hf_tuningfree.optim.dog` for the algorithm and the code paths.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .. import _native
from ..base import (
    GroupBatch,
    StepBatch,
    TuningFreeOptimizer,
    bucket_by_device_and_dtype,
    compute_dtype,
    foreach_norms,
    statistic_dtype,
    working_view,
)
from ..distributed import is_dtensor, local_view
from ..kernels import AutoOrder, StateShapeError
from ..validation import (
    check_bool,
    check_nonnegative,
    check_positive,
)
from .kernels import (
    _SCALAR_STATE_KEYS,
    _c_takes,
    _check_slice_p,
    _distance_sq,
    _foreach_distances,
    _fused_sgd_available,
    _make_x0,
    _missing,
    _read_flags,
    _safe_div,
    _sgd_step_,
    _slice_geometry,
    _stored_x0,
    _x0_kind,
    _x0_source,
    dog_tensor_update,
)


# --------------------------------------------------------------------------- optimizers
class DoG(TuningFreeOptimizer):
    r"""DoG (Ivgi, Hinder & Carmon, ICML 2023): one step size for the whole model.

    .. math::
        \eta_t = \frac{\bar r_t}{\sqrt{G_t + \epsilon}},\quad
        \bar r_t = \max\big(r_\epsilon, \max_{i\le t}\|x_i - x_0\|\big),\quad
        G_t = \sum_{i\le t}\|g_i\|^2,\quad
        x_{t+1} = x_t - \mathrm{lr}\cdot\eta_t\, g_t

    with :math:`r_\epsilon = \texttt{reps\_rel}\,(1 + \|x_0\|)` and
    :math:`g_t = \nabla + \texttt{weight\_decay}\cdot x_t` (coupled decay, as the paper).

    Use it with iterate averaging (:class:`~hf_tuningfree.optim.averaging.PolynomialDecayAverager`):
    DoG has no decaying schedule, and the paper's results are for the averaged weights.

    Args:
        params: parameters or param groups.
        lr: multiplier of the DoG step (default 1.0, the paper's; schedules and warm-up multiply
            it). Not a learning rate to tune.
        reps_rel: ``r_eps`` relative to ``1 + ||x_0||`` (default 1e-3, measured on the suite's
            tasks; the paper's is 1e-6). It sets the first step; the authors suggest 1e-4 for
            models with batch normalisation and smaller values if the first steps diverge. Must
            be > 0 and the same in every param group (it defines one model-wide quantity).
        weight_decay: coupled weight decay (added to the gradient, also in ``G``), per group.
        eps: added to ``G`` for numerical safety (default 1e-8, as the authors); must be the same
            in every param group.
        implementation: ``"auto"`` (CPU: ``"native"``, else ``"foreach"``), ``"native"`` (on
            CPU, fp32/fp64: the fused C loops of :mod:`hf_tuningfree.optim._native`, built once
            per machine with the system C compiler), ``"foreach"`` (torch's fused SGD kernel and
            multi-tensor norms) or ``"loop"`` (tensor by tensor, the reference); there is no
            compiled form. A bucket a form cannot take runs ``"loop"``. The environment variable
            ``HF_TUNINGFREE_IMPL`` overrides ``"auto"``.
        maximize: maximize the objective (per group): the step is the one on ``-grad``, bit
            for bit on every path (the gradients are negated in place for the step's passes
            and restored after it); ``G``, ``rbar`` and the step size are those of ``-grad``.
        implicit_zero_x0: True (default): no stored ``x0`` for a tensor that is all zero at its
            first step (its distance is ``||x||``; the same ``rbar`` and ``eta``, bit for bit,
            as with a stored copy); one batched host read at the step that creates state (see
            the module docstring). False: every tensor stores its copy, as before.
        slice_p: ``k >= 1`` (int, per group; default 1): with ``k > 1`` store ``x0`` for every
            ``k``-th element only (``x0`` is then 1-D, ``ceil(n / k)`` elements) and estimate
            each tensor's distance from them, scaled by ``sqrt(n / ceil(n / k))``: ``1/k`` of the
            memory, ``rbar`` and ``eta`` from an estimate whose bias the module docstring
            states. Saved with the param groups; changing it after the state exists raises.
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    Per-parameter state: ``x0`` (the parameter at its first step with a gradient; absent for an
    all-zero tensor with ``implicit_zero_x0``; 1-D, every ``slice_p``-th element, with
    ``slice_p > 1``) and
    ``dist_sq`` (``||x - x0||^2`` of this tensor, this rank's part). Model-wide state
    (``global_state``): ``rbar``, ``G``, ``eta`` (0-dim, on the parameters' device) and ``step``
    (steps applied).
    ``stats()`` reports ``eta`` (without the ``lr`` multiplier), ``rbar``, ``G`` and ``step``.
    """

    PATHS = ("native", "foreach", "loop")
    MAXIMIZE_BY_NEGATION = True  # the passes take -grad for a group with maximize=True
    #: the C loops, then torch's fused SGD kernel (fp32/fp64 on CPU), then the loop
    AUTO_ORDER = AutoOrder(cpu=("native", "foreach", "loop"), cuda=("foreach", "loop"))

    _layerwise = False
    SCALAR_STATE_KEYS = TuningFreeOptimizer.SCALAR_STATE_KEYS | frozenset(_SCALAR_STATE_KEYS)
    _CONSTRUCTOR_ONLY = (*TuningFreeOptimizer._CONSTRUCTOR_ONLY, "implicit_zero_x0")
    _PICKLED_ATTRIBUTES = (*TuningFreeOptimizer._PICKLED_ATTRIBUTES, "_implicit_zero_x0")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        reps_rel: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        implementation: str = "auto",
        *,
        maximize: bool = False,
        implicit_zero_x0: bool = True,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        self._implicit_zero_x0 = check_bool("implicit_zero_x0", implicit_zero_x0)
        defaults = {
            "maximize": check_bool("maximize", maximize),
            "slice_p": _check_slice_p(slice_p),
            "lr": check_nonnegative("lr", lr),
            "reps_rel": check_positive("reps_rel", reps_rel),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
            "eps": check_nonnegative("eps", eps),
            "implementation": implementation,
        }
        super().__init__(
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, check in (
            ("slice_p", lambda _, v: _check_slice_p(v)),
            ("lr", check_nonnegative),
            ("reps_rel", check_positive),
            ("weight_decay", check_nonnegative),
            ("eps", check_nonnegative),
        ):
            if key in param_group:
                param_group[key] = check(key, param_group[key])
        super().add_param_group(param_group)
        if not self._layerwise:
            for key in self._model_wide_keys():
                values = {g[key] for g in self.param_groups}
                if len(values) > 1:
                    raise ValueError(
                        f"Invalid {key}: {sorted(values)} in different param groups; "
                        f"{type(self).__name__} computes one model-wide step size, so {key} must "
                        "be the same in every group (LDoG accepts per-group values)"
                    )

    def _model_wide_keys(self) -> tuple[str, ...]:
        return ("reps_rel", "eps")

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        device = local_view(param).device
        sdt = statistic_dtype(param.dtype)
        if not getattr(self, "_implicit_zero_x0", True):
            state["x0"] = _make_x0(param, group.get("slice_p", 1))
        # else x0 is taken in this step's _update (_take_x0), only if the tensor is not all zero
        state["dist_sq"] = torch.zeros((), dtype=sdt, device=device)  # ||x - x0||^2, local part
        if self._layerwise:
            state["rbar"] = torch.zeros((), dtype=sdt, device=device)  # 0 until initialised
            state["G"] = torch.zeros((), dtype=sdt, device=device)

    def _check_fit(self, gb: GroupBatch) -> None:
        """The base class's check, on the tensors with a stored ``x0`` and on those without one
        apart, so that a group mixing both (LoRA: A stored, B implicit) keeps its whole-list
        comparisons instead of a per-parameter check every step."""
        sliced = gb.group.get("slice_p", 1) > 1
        kind = [_x0_kind(s, p, sliced) for s, p in zip(gb.states, gb.originals, strict=True)]
        if len(set(kind)) <= 1 and (not kind or kind[0] != "sliced"):
            super()._check_fit(gb)
            return
        for want in ("full", "none", "sliced"):
            idx = [i for i, k in enumerate(kind) if k == want]
            if not idx:
                continue
            states = [gb.states[i] for i in idx]
            if want == "sliced":  # checked against the group's slice_p in _layouts, each step
                states = [{k: v for k, v in st.items() if k != "x0"} for st in states]
            part = GroupBatch(
                gb.group,
                params=[gb.params[i] for i in idx],
                grads=[gb.grads[i] for i in idx],
                states=states,
                originals=[gb.originals[i] for i in idx],
            )
            super()._check_fit(part)

    def _check_state_shapes(self, state: dict[Any, Any], groups: list[dict[str, Any]]) -> None:
        # the groups being loaded say which slice_p each parameter's x0 was made with
        self._slice_of = {
            id(p): g.get("slice_p", 1)
            for g in groups
            for p in g["params"]
            if isinstance(p, torch.Tensor)
        }
        try:
            super()._check_state_shapes(state, groups)
        finally:
            self._slice_of = {}

    def _misfit(self, param: torch.Tensor, state: dict[str, Any]) -> str | None:
        """The base class's check, where with ``slice_p = k > 1`` ``x0`` may also be the 1-D
        subsample of the length :func:`_slice_geometry` gives."""
        k = self.__dict__.get("_slice_of", {}).get(id(param), 1)
        x0 = state.get("x0")
        if k == 1 or not isinstance(x0, torch.Tensor) or is_dtensor(x0) or x0.dim() != 1:
            return super()._misfit(param, state)
        problem = super()._misfit(param, {key: v for key, v in state.items() if key != "x0"})
        if problem is not None or super()._misfit(param, {"x0": x0}) is None:
            return problem
        numel = local_view(param).numel() * (2 if param.is_complex() else 1)
        _, _, kept = _slice_geometry(param, numel, k)
        if x0.numel() == kept:
            return None
        return (
            f"'x0' has shape {list(x0.shape)}, expected [{kept}] (every {k}-th element, "
            f"slice_p={k}) or shape {list(param.shape)}"
        )

    def _layouts(self, gb: Any, x0s: list[torch.Tensor | None]) -> list[tuple[int, int, float]]:
        """``(stride, offset, scale)`` of every tensor's ``x0`` (see :func:`_slice_geometry`);
        ``(1, 0, 1.0)`` for a full copy or none. A subsample of the wrong length for the
        group's ``slice_p`` raises :class:`~hf_tuningfree.optim.kernels.StateShapeError`."""
        k = gb.group.get("slice_p", 1)
        out = []
        for p, local, x0 in zip(gb.originals, gb.params, x0s, strict=True):
            if x0 is None or k == 1 or x0.shape == local.shape:
                out.append((1, 0, 1.0))
                continue
            offset, scale, kept = _slice_geometry(p, local.numel(), k)
            if x0.dim() != 1 or x0.numel() != kept:
                raise StateShapeError(
                    f"x0 holds {x0.numel()} elements, {kept} expected for slice_p={k} (was "
                    "slice_p changed after the state was created?)",
                    param=local,
                    key="x0",
                )
            out.append((k, offset, scale))
        return out

    def _zero_check(self, batch: StepBatch, sdt: torch.dtype) -> torch.Tensor | None:
        """For implicit zero ``x0``: per tensor of the batch (batch order) 1.0 where it is fresh
        (first step) and not all zero on this rank, else 0.0; summed over ranks with the step's
        other statistics (no collective of its own), so every rank of a sharded tensor makes the
        same choice. None when no tensor needs the check (no fresh tensor, or the option off)."""
        if not getattr(self, "_implicit_zero_x0", True):
            return None
        if not any(f for gb in batch.groups for f in gb.fresh):
            return None
        zero = torch.zeros((), dtype=torch.bool, device=batch.device)
        flags = [
            _x0_source(p).ne(0).any().to(batch.device) if f else zero  # NaN counts as nonzero
            for gb in batch.groups
            for p, f in zip(gb.originals, gb.fresh, strict=True)
        ]
        return torch.stack(flags).to(sdt)

    def _take_x0(self, batch: StepBatch, stats: dict[str, torch.Tensor]) -> None:
        """Store ``x0`` for the fresh tensors that are not all zero (on any rank), before the
        update writes them; the others keep none (``x0`` implicitly 0). Reads the flags of
        :meth:`_zero_check` on the host: once, at the step that creates the state."""
        nonzero = stats.get("x0_nz")
        if nonzero is None:
            return
        flags = iter(_read_flags(nonzero > 0))
        for gb in batch.groups:
            for state, p, fresh in zip(gb.states, gb.originals, gb.fresh, strict=True):
                if next(flags) and fresh and "x0" not in state:
                    src = torch.view_as_real(p) if p.is_complex() else p
                    state["x0"] = _make_x0(src, gb.group.get("slice_p", 1))

    # ------------------------------------------------------------------ statistics
    @staticmethod
    def _stat_dtype(batch: StepBatch) -> torch.dtype:
        fp64 = any(p.dtype == torch.float64 for gb in batch.groups for p in gb.params)
        return torch.float64 if fp64 else torch.float32

    def _grad_sq(self, batch: StepBatch, sdt: torch.dtype) -> torch.Tensor:
        """``||g + wd x||^2`` of every tensor of the batch (a vector in batch order).

        One reduction pass per bucket: the C loop on CPU (fp32/fp64), foreach norms elsewhere.
        The plain gradient norms it yields are handed to the base class's non-finite guard
        (``batch.grad_norms()``), so the gradients are read once for both."""
        guard: list[list[torch.Tensor]] = []
        parts: list[torch.Tensor] = []
        for gb in batch.groups:
            n = len(gb.params)
            if n == 0:
                guard.append([])
                continue
            wd = gb.group["weight_decay"]
            raw = torch.empty(n, dtype=sdt, device=batch.device)
            eff = torch.empty(n, dtype=sdt, device=batch.device)
            buckets = bucket_by_device_and_dtype([gb.params, gb.grads])
            for (device, _), ([ps, gs], idx) in buckets.items():
                takes = partial(_native.accepts, [ps, gs], ("param", "grad"))
                numel = sum(p.numel() for p in ps)
                if self._path(gb.group, device, numel, native=takes) == "native":
                    both = torch.empty(len(ps), 2, dtype=torch.float64)
                    _native.grad_sq(ps, gs, wd, both)
                    r, e = both[:, 0].to(sdt), both[:, 1].to(sdt)
                else:
                    r = torch.stack(torch._foreach_norm(gs, 2, dtype=sdt)).square()
                    e = r
                    if wd != 0.0:
                        added = torch._foreach_add(gs, ps, alpha=wd)
                        e = torch.stack(torch._foreach_norm(added, 2, dtype=sdt)).square()
                        del added
                if len(buckets) == 1:
                    raw, eff = r.to(batch.device), e.to(batch.device)
                else:
                    where = torch.tensor(idx, device=batch.device)
                    raw[where], eff[where] = r.to(batch.device), e.to(batch.device)
            guard.append(list(raw.sqrt().unbind(0)))
            parts.append(eff)
        batch._grad_norms = guard
        if not parts:
            return torch.zeros(0, dtype=sdt, device=batch.device)
        return torch.cat(parts)

    def _local_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        sdt = self._stat_dtype(batch)
        zero = torch.zeros((), dtype=sdt, device=batch.device)
        # ||x_t - x_0||^2 over every parameter with state (also those without a gradient now:
        # they did not move since their last update, which stored their distance)
        dists = [
            s["dist_sq"]
            for group in self.param_groups
            for p in group["params"]
            if (s := self.state.get(p)) and "dist_sq" in s
        ]
        out = {
            "g2": self._grad_sq(batch, sdt).sum(),
            "d2": torch.stack([d.to(batch.device, sdt) for d in dists]).sum() if dists else zero,
        }
        if "rbar" not in self.global_state:  # first step: ||x_0|| for r_eps
            norms = [n for gb in batch.groups for n in foreach_norms(gb.params)]
            out["x0_sq"] = (
                torch.stack([n.to(batch.device, sdt) for n in norms]).square().sum()
                if norms
                else zero
            )
        nonzero = self._zero_check(batch, sdt)
        if nonzero is not None:
            out["x0_nz"] = nonzero
        return out

    def _eta(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Advance ``rbar``, ``G`` (and ``step``) in ``global_state``; return this step's eta."""
        gs = self.global_state
        reps_rel = self.param_groups[0]["reps_rel"]
        eps = self.param_groups[0]["eps"]
        g2, d2 = stats["g2"], stats["d2"]
        if "rbar" not in gs:  # first step (also when skipped: x_0 has been taken)
            r_eps = reps_rel * (1.0 + stats["x0_sq"].sqrt())
            gs["rbar"] = r_eps
            gs["G"] = torch.zeros_like(r_eps)
            gs["eta"] = torch.zeros_like(r_eps)
            gs["step"] = torch.zeros((), dtype=torch.int64, device=device)
        rbar = self.global_tensor("rbar", device, _missing)
        G = self.global_tensor("G", device, _missing)
        step = self.global_tensor("step", device, _missing)
        new_rbar = torch.where(ok, torch.maximum(rbar, d2.sqrt()), rbar)
        new_G = torch.where(ok, G + g2, G)
        eta = _safe_div(new_rbar, torch.sqrt(new_G + eps))
        eta = self._tame(eta, new_rbar, new_G, g2, ok, step, device)
        gs["rbar"], gs["G"] = new_rbar, new_G
        gs["eta"] = torch.where(ok, eta, self.global_tensor("eta", device, _missing))
        gs["step"] = step + ok.to(torch.int64)
        return eta

    def _tame(
        self,
        eta: torch.Tensor,
        rbar: torch.Tensor,
        G: torch.Tensor,
        g2: torch.Tensor,
        ok: torch.Tensor,
        step: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        return eta

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        self._take_x0(batch, stats)
        eta = self._eta(stats, ok, batch.device)
        zero = torch.zeros((), dtype=eta.dtype, device=eta.device)
        for gb in batch.groups:
            if not gb.params:
                continue
            size = torch.where(ok, eta * gb.group["lr"], zero)
            self._apply(gb, [size] * len(gb.params), ok, shared=True)

    def _apply(
        self, gb: Any, step_sizes: list[torch.Tensor], ok: torch.Tensor, *, shared: bool
    ) -> None:
        """``x -= step_size * (g + wd x)`` for every tensor of a group (``shared``: one step size
        for the group), then ``dist_sq = ||x - x0||^2`` for each.

        ``"native"`` (CPU, fp32/fp64): the fused C loop, one call for the bucket. ``"foreach"``:
        torch's fused multi-tensor SGD kernel, then foreach ops for the distances. ``"loop"``
        (and buckets neither takes, e.g. 16-bit parameters on CPU): ``dog_tensor_update`` tensor
        by tensor.
        """
        group = gb.group
        wd = group["weight_decay"]
        x0_list = [_stored_x0(s) for s in gb.states]
        layout_list = self._layouts(gb, x0_list)
        lists = [gb.params, gb.grads, x0_list, gb.state_list("dist_sq")]
        for (device, dtype), (bucket, idx) in bucket_by_device_and_dtype(lists).items():
            ok_d = ok.to(device)
            cdt = compute_dtype(dtype)
            sizes = [step_sizes[i].to(device, cdt) for i in idx]
            params, grads, x0s, dists = bucket
            layouts = [layout_list[i] for i in idx]
            impl = self._path(
                group,
                device,
                sum(p.numel() for p in params),
                native=partial(_c_takes, params, grads, x0s),
                foreach=partial(_fused_sgd_available, params, grads),
            )
            if impl == "native":
                steps = sizes[0] if shared else torch.stack(sizes)
                new = torch.stack(dists).to(torch.float64)  # kept as is on a skipped step
                _native.dog_update(
                    params,
                    grads,
                    x0s,
                    steps,
                    wd,
                    ok_d,
                    new,
                    x0_strides=[lay[0] for lay in layouts],
                    x0_offsets=[lay[1] for lay in layouts],
                )
                if any(lay[0] > 1 for lay in layouts):  # sums over the kept elements, scaled
                    scales = torch.tensor([lay[2] for lay in layouts], dtype=torch.float64)
                    new = torch.where(ok_d, new * scales, new)
                torch._foreach_copy_(dists, list(new.to(dists[0].dtype).unbind(0)))
            elif impl == "loop":
                for j, (p, g, x0, d) in enumerate(zip(*bucket, strict=True)):
                    dog_tensor_update(
                        p, g, x0, d, ok_d, sizes[j], weight_decay=wd, layout=layouts[j]
                    )
            else:
                skip = (~ok_d).to(torch.float32)
                if shared:
                    _sgd_step_(params, grads, sizes[0], skip, wd)
                else:
                    for j in range(len(params)):
                        _sgd_step_(params[j : j + 1], grads[j : j + 1], sizes[j], skip, wd)
                new = _foreach_distances(params, x0s, dists[0].dtype, layouts)
                kept = torch.where(ok_d, new, torch.stack(dists))
                torch._foreach_copy_(dists, list(kept.unbind(0)))

    # ------------------------------------------------------------------ maintenance
    @torch.no_grad()
    def refresh_distances(self) -> None:
        """Recompute every stored ``||x - x0||^2`` from the parameters as they are now.

        ``step()`` keeps these distances current by itself; call this after changing parameters
        outside ``step()`` (editing them by hand, loading other weights into the model).
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "dist_sq" not in state:
                    continue
                d = state["dist_sq"]
                x = working_view(p)
                x0 = _stored_x0(state)
                gb = GroupBatch(group, params=[x], originals=[p])
                layout = self._layouts(gb, [x0])[0]
                d.copy_(_distance_sq(x, x0, d.dtype, layout))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating per-parameter state to the parameter's dtype; keep the 0-dim
        # statistics in their own dtype (fp32 for bf16 parameters) so a resume is exact.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        keep: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        for i, p in zip(ids, params, strict=False):
            saved = state_dict["state"].get(i)
            if not isinstance(saved, dict):
                continue
            for key in _SCALAR_STATE_KEYS:
                value = saved.get(key)
                if isinstance(value, torch.Tensor):
                    keep.append((p, key, value))
        super().load_state_dict(state_dict)
        for p, key, value in keep:
            self.state[p][key] = value.detach().clone().to(local_view(p).device)

    def stats(self) -> dict[str, float]:
        out = super().stats()
        gs = self.global_state
        for key in ("eta", "rbar", "G"):
            if key in gs:
                out[key] = float(gs[key])
        if "step" in gs:
            out["step"] = float(gs["step"])
        return out
