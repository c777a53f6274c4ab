"""Prodigy: D-Adaptation that reaches the right step size faster.

Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024
(arXiv:2306.06101), the Adam form (the paper's Adam-like Algorithm; the authors' ``prodigyopt``
package, v1.1).

Prodigy keeps D-Adaptation's single model-wide lower bound ``d`` on the distance to the solution
but weights step ``k`` by ``d_k`` (the paper's ``lambda_k = d_k^2`` weighting) and measures
progress directly with ``<g_k, x_0 - x_k>``; the paper shows this improves D-Adaptation's
convergence rate by a factor ``O(log(D / d0))``. The passes of a step, the single ``d`` over all
groups, the sharded reduction and the code paths (on CPU, C kernels: a statistics pass and an
update, or where nothing is reduced across processes the guard's pass and one fused kernel that
reads ``x, g, m, v, s, x0`` once) are those of :mod:`hf_tuningfree.optim.dadapt`; what Prodigy
has in common with :class:`~hf_tuningfree.optim.dadapt.DAdaptAdam` (Adam's moments and bias
correction, the ``||s||_1`` denominator, the numerator's sum over groups) is
:class:`~hf_tuningfree.optim.dadapt.AdamFormBase`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .base import GroupBatch, StepBatch
from .dadapt.adam import AdamFormBase, _momentum
from .dadapt.passes import (
    TensorPass,
    _d_update,
    _flags,
    _host_flags,
    _pass,
    _scalar,
    _sq_sum,
    _total,
    _weight_decay_scalars,
    check_growth_rate,
    check_slice_p,
    effective_grad,
)
from .distributed import is_dtensor
from .validation import (
    check_betas,
    check_bool,
    check_in_range,
    check_positive,
)

__all__ = ["Prodigy", "prodigy_statistics", "prodigy_tensor_update"]


def prodigy_statistics(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    x0: torch.Tensor | None,
    coupled_wd: torch.Tensor,
    s_weight: torch.Tensor,
    c_s: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of Prodigy for one tensor: ``||g||^2``, ``<g', x_0 - x_k>`` and
    ``||s_{k+1}||_1`` with ``s_{k+1} = s_k + c_s s_k + s_weight g'`` (``c_s = beta3 - 1``), the
    update's expression."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    return prodigy_sums(grad, g, p, s, x0, s_weight, c_s, acc64)


def prodigy_sums(
    grad: torch.Tensor,
    g: torch.Tensor,
    point: torch.Tensor,
    s: torch.Tensor,
    x0: torch.Tensor | None,
    s_weight: torch.Tensor,
    c_s: torch.Tensor,
    acc64: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``||grad||^2``, ``<g, x_0 - point>`` and ``||s + c_s s + s_weight g||_1``: Prodigy's sums
    for the gradient ``g`` (weight decay included) with the numerator taken at ``point``; ``x0``
    None is an implicit zero."""
    s_old = s.to(g.dtype)
    s_new = s_old + c_s * s_old + s_weight * g
    # an implicit x0 (None: the tensor was all zero at its first step) is 0: 0 - point, the
    # same numbers as a stored zero
    start = 0.0 - point if x0 is None else x0.to(g.dtype) - point
    dot = _total(g * start, acc64)
    return _sq_sum(grad, acc64), dot, _total(s_new.abs(), acc64)


def prodigy_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor,
    s: torch.Tensor | None,
    ok: torch.Tensor,
    d: torch.Tensor,
    step_size: torch.Tensor,
    s_weight: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    c_m: torch.Tensor,
    c_v: torch.Tensor,
    c_s: torch.Tensor,
    d_eps: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> None:
    """One tensor of Prodigy, in place.

    ``d`` is ``d_k``; ``step_size`` this group's ``dlr = d_k lr bc_k``; ``s_weight`` the weight of
    ``g`` in ``s`` (``(d_k / d0) dlr``, or ``(d_k / d0) d_k`` with ``safeguard_warmup``); ``c_m,
    c_v`` are ``1 - beta1, 1 - beta2`` and ``c_s`` is ``beta3 - 1``: all 0 on a skipped step;
    ``decay`` is ``dlr * wd`` (decoupled), ``d_eps`` is ``d_k * eps``; ``exp_avg`` None
    (``beta1 = 0``, no buffer): ``m_{k+1} = d_k g``."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)
    v = exp_avg_sq.to(g.dtype)
    dg = d * g
    m = dg if exp_avg is None else _momentum(exp_avg.to(g.dtype), dg, c_m)
    v = v + c_v * (dg * dg - v)
    param.copy_(p - decay * p - step_size * (m / (v.sqrt() + d_eps)))
    if exp_avg is not None:
        exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if s is not None:  # None: slice_p > 1 (prodigy_sliced_s)
        s.copy_(prodigy_s(s.to(g.dtype), g, s_weight, c_s))


def prodigy_s(
    s: torch.Tensor, g: torch.Tensor, s_weight: torch.Tensor, c_s: torch.Tensor
) -> torch.Tensor:
    """Prodigy's ``s_{k+1} = s_k + c_s s_k + s_weight g`` (``c_s = beta3 - 1``)."""
    return s + c_s * s + s_weight * g


def prodigy_sliced_s(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    d: torch.Tensor,
    step_size: torch.Tensor,
    s_weight: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    c_m: torch.Tensor,
    c_v: torch.Tensor,
    c_s: torch.Tensor,
    *_: torch.Tensor,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> torch.Tensor:
    """Prodigy's new ``s`` on the kept elements (``slice_p > 1``)."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    return prodigy_s(s.to(g.dtype), torch.where(ok, g, 0.0), s_weight, c_s)


_PRODIGY_STATISTICS = _pass(
    prodigy_statistics,
    "Prodigy statistics",
    ("s", "x0"),
    ("g_sq", "dot", "s_l1"),
    native="prodigy_stats",
    optional=("x0",),
)
_PRODIGY_UPDATE = _pass(
    prodigy_tensor_update,
    "Prodigy",
    ("exp_avg", "exp_avg_sq", "s"),
    (),
    ("param", "exp_avg", "exp_avg_sq", "s"),
    native="prodigy_update",
    fused="prodigy_fused",
    fused_keys=("x0",),
    fused_sums=("dot", "s_l1"),
    optional=("exp_avg", "s", "x0"),
    sliced=prodigy_sliced_s,
)


class Prodigy(AdamFormBase):
    r"""Prodigy (Mishchenko & Defazio, ICML 2024), Adam form.

    With ``gamma_k`` the group's ``lr``, ``bc_k`` Adam's bias correction
    ``sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))`` (1 when off), ``beta3`` (default
    ``sqrt(beta2)``) and ``dlr_k = d_k * gamma_k * bc_k``::

        m_{k+1}   = beta1 m_k + (1 - beta1) d_k g_k
        v_{k+1}   = beta2 v_k + (1 - beta2) d_k^2 g_k^2
        r_{k+1}   = beta3 r_k + (d_k / d0) dlr_k <g_k, x_0 - x_k>          (summed over groups)
        s_{k+1}   = beta3 s_k + (d_k / d0) dlr_k g_k       (safeguard_warmup: (d_k / d0) d_k g_k)
        d_hat     = d_coef * r_{k+1} / ||s_{k+1}||_1
        d_max     = max(d_max, d_hat)
        d_{k+1}   = min(d_max, growth_rate * d_k)          (so d never decreases)
        x_{k+1}   = x_k - dlr_k wd x_k - dlr_k m_{k+1} / (sqrt(v_{k+1}) + d_k eps)

    The paper writes ``r`` and ``s`` with weights ``(1 - beta3) gamma_k d_k^2``; the factor
    ``(1 - beta3) d0`` cancels in ``d_hat`` and dividing by ``d0`` keeps the sums away from
    fp32 underflow while ``d`` is tiny, as the authors' code does. The step uses ``d_k * eps``
    (the paper); the authors' code uses the already updated ``d_{k+1}`` there, which lets the
    update be done in one pass here. Unlike the authors' code, the first growth of ``d`` is
    subject to ``growth_rate`` like every other (theirs lets ``d`` jump while it equals ``d0``).

    Bias correction is ON by default, unlike the authors' code (``use_bias_correction=False``
    gives their setting): on a short language-model run (FACTS.md: 400 steps of a small GPT-2,
    eval loss relative to tuned AdamW) it took Prodigy from 1.10 to 1.04 by damping the early
    steps, and fine-tuning runs are short enough for that phase to matter.

    Args:
        params: parameters or param groups.
        lr: multiplier of the adapted step (default 1.0; schedules act on it).
        betas: ``(beta1, beta2)`` (default ``(0.9, 0.999)``). ``beta1 = 0`` keeps no
            first-moment buffer (the update uses ``d_k g_k`` directly, prodigy PR #32): 4 bytes
            less state per fp32 element, the same numbers as a zero-momentum buffer to rounding,
            and ``d`` is estimated as before (``r``, ``s`` do not involve ``m``); switching
            ``beta1`` on a live optimizer as :class:`~hf_tuningfree.optim.dadapt.DAdaptAdam`.
        beta3: decay of ``r`` and ``s`` (default None: ``sqrt(beta2)``).
        eps: added to ``sqrt(v)`` after scaling by ``d`` (default 1e-8).
        weight_decay: weight decay coefficient (default 0).
        decoupled_weight_decay: True (default, as the authors' ``decouple=True``): AdamW-style
            ``x -= dlr * wd * x``; False: ``wd * x`` added to the gradient.
        use_bias_correction: see above (default True).
        safeguard_warmup: leave ``lr`` (and bias correction) out of ``s`` so that a warm-up that
            starts ``lr`` small does not inflate ``d`` (default False, the authors'); a group
            with ``lr = 0`` still stays out of ``s``.
        d0: lower bound on the distance to the solution at the first step (default 1e-6).
        d0_rel: after the first step, ``d`` (and ``d_max``) is raised to ``d0_rel`` times the
            RMS of the initial weights (default 1e-2, chosen on the suite's five tasks; 0: the
            authors' start from ``d0``).
        d_coef: multiplies ``d_hat``; the authors' preferred knob when tuning (default 1.0).
        growth_rate: ``d`` grows by at most this factor per step (default inf).
        d_groups: ``"model"`` (default: one ``d`` for all groups, the papers') or ``"group"``:
            one ``d`` per param-group ``name`` (groups without a name share one), e.g. for LoRA
            A/B or two networks; every estimate is the model-wide algorithm run on its groups.
        maximize: maximize the objective.
        implementation: ``"auto"``, ``"native"``, ``"compiled"``, ``"foreach"`` or ``"loop"``.
            On CPU, ``"auto"`` and ``"native"`` run the C kernels of
            :mod:`hf_tuningfree.optim._native` (see :mod:`hf_tuningfree.optim.dadapt`); on CUDA
            ``"auto"`` runs ``"foreach"`` (the passes as multi-tensor ops).
        implicit_zero_x0: True (default): a parameter whose every element is 0 when its state
            is created (LoRA's B matrices) stores no ``x0``: its ``x_0`` is 0, so its numerator
            term ``<g, x_0 - x>`` is ``<g, 0 - x>``, and ``d`` and every step are the same
            numbers as with the stored copy (bit-identical in the tests, C and torch paths,
            fused and two-pass forms); it saves one parameter-sized copy per such tensor (prodigy
            PR #23). Deciding it needs the values: ONE batched device-to-host read at the step
            that creates state (the first step of a parameter with a gradient), none at any
            other step. Sharded parameters are decided for the whole tensor: an FSDP2 (DTensor)
            parameter's ``x0`` is stored at its first step and dropped after that step's
            reduction, which carries each rank's "not all zero" flag, if it is zero on every rank
            (the state dict then has the same keys on every rank); FSDP1 flat shards and
            ``global_reduce`` partitions (which differ between ranks anyway) per local shard.
            A state dict without ``x0`` for a parameter means an implicit zero. False: every
            parameter stores ``x0``, as the authors' code.
        slice_p: statistics on a deterministic subsample (default 1: every element; prodigy
            PR #22, reported to halve optimizer memory in OneTrainer PR #550): with ``k > 1``,
            ``s`` and ``x0`` are stored for elements ``0, k, 2k, ...`` of each flattened tensor
            only (``ceil(n / k)`` of them) and the sums that only estimate ``d`` (``r``'s term
            ``<g, x_0 - x>`` and ``||s||_1``) are taken over those elements; ``m``, ``v`` and
            the update of ``x`` are unchanged and full, as is the non-finite guard's
            ``||g||^2``. ``d_hat = r / ||s||_1`` is then the ratio of the subsampled sums: a
            consistent estimate of the full ratio (both scale with the kept fraction), with the
            small-sample bias of a ratio estimator (of order ``1 / (number of kept elements)``);
            a tensor with ``n <= k`` contributes one element, so tensors smaller than ``k``
            weigh ``k / n`` times more per element than larger ones. The kept set is deterministic:
            with ``k`` dividing a matrix's row length it is the same columns in every row, and where
            columns differ systematically (embeddings, heads) that aliasing biases ``d`` by more
            than sampling would: an odd ``k`` walks through the columns instead (not a measured
            improvement: on the demo task k = 7 varied more across seeds than k = 8). Saves
            ``(1 - 1/k)`` of ``s`` and of ``x0``: with ``beta1 = 0`` as well, 4 bytes + 8/k per
            fp32 element (``v``, and 1/k of ``s`` and ``x0``). Model-wide (the same in every
            group). The C path as :class:`~hf_tuningfree.optim.dadapt.DAdaptAdam`'s (one fused
            ``prodigy_fused_sliced`` sweep unsharded; sharded: C update, torch statistics). Under
            FSDP2 ``s`` and ``x0`` are plain tensors of the rank-local
            shard's kept elements (the kept set follows each shard's own offsets).
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``exp_avg`` (m; none with ``beta1 = 0``), ``exp_avg_sq`` (v), ``s``,
    ``x0`` (not for a tensor
    that was all zero at its first step, see ``implicit_zero_x0``); model-wide ``d``,
    ``d_max``, ``numerator`` (r), ``s_l1``, ``step``.
    """

    _START_KEYS = ("d", "d_max")
    SLICED_KEYS = frozenset({"s", "x0"})
    _MODEL_WIDE = (
        "slice_p",
        "d0",
        "growth_rate",
        "betas",
        "beta3",
        "d_coef",
        "use_bias_correction",
        "safeguard_warmup",
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        use_bias_correction: bool = True,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d0_rel: float = 1e-2,
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        d_groups: str = "model",
        maximize: bool = False,
        implementation: str = "auto",
        *,
        implicit_zero_x0: bool = True,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": check_betas("betas", betas),
            "beta3": None if beta3 is None else check_in_range("beta3", beta3, 0.0, 1.0),
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "use_bias_correction": check_bool("use_bias_correction", use_bias_correction),
            "safeguard_warmup": check_bool("safeguard_warmup", safeguard_warmup),
            "d0": check_positive("d0", d0),
            "d0_rel": d0_rel,
            "d_coef": check_positive("d_coef", d_coef),
            "growth_rate": check_growth_rate(growth_rate),
            "d_groups": d_groups,
            "maximize": maximize,
            "implementation": implementation,
            "implicit_zero_x0": check_bool("implicit_zero_x0", implicit_zero_x0),
            "slice_p": check_slice_p(slice_p),
        }
        super().__init__(
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_bool("implicit_zero_x0", group.get("implicit_zero_x0", True))

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        super()._init_param_state(param, state, group)
        self._init_x0(param, state, group)

    def _init_x0(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        """``x0 = x`` at the first step (its kept elements with ``slice_p > 1``), except with
        ``implicit_zero_x0`` for a plain tensor: :meth:`_settle_fresh_state` then stores it only
        if the tensor is not all zero."""
        if group.get("implicit_zero_x0", False) and not is_dtensor(param):
            return
        state["x0"] = self._stat_copy(param)

    def _settle_fresh_state(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """``implicit_zero_x0`` for the parameters whose state this step created: one host read
        of their "not all zero" flags (batched), ``x0`` stored for those that are not; for
        DTensor parameters the flags go into the step's reduction instead (:meth:`_settled`)."""
        local: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]] = []
        sharded: list[tuple[dict[str, Any], torch.Tensor]] = []
        for gb in batch.groups:
            if not gb.group.get("implicit_zero_x0", False) or not any(gb.fresh):
                continue
            for p, st, fresh, orig in zip(
                gb.params, gb.states, gb.fresh, gb.originals, strict=True
            ):
                if not fresh:
                    continue
                if is_dtensor(orig):
                    if "x0" in st:
                        sharded.append((st, p))
                elif "x0" not in st:
                    local.append((st, p, orig))
        if local:
            flags = _host_flags([p.ne(0).any() for _, p, _ in local])
            for (st, _, orig), nonzero in zip(local, flags, strict=True):
                if nonzero:
                    x = torch.view_as_real(orig) if orig.is_complex() else orig
                    st["x0"] = self._stat_copy(x).contiguous()
        self._x0_pending = [st for st, _ in sharded]
        if not sharded:
            return {}
        dtype = self._scalar_dtype()
        counts = [p.ne(0).any().to(batch.device, dtype) for _, p in sharded]
        return {"x0_nonzero": torch.stack(counts)}

    def _settled(self, batch: StepBatch, stats: dict[str, torch.Tensor]) -> None:
        """Drop the stored ``x0`` of the DTensor parameters created this step that are zero on
        every rank (their flags summed over ranks in the step's reduction; one host read)."""
        flags = stats.pop("x0_nonzero", None)
        pending, self._x0_pending = getattr(self, "_x0_pending", []), []
        if flags is None:
            return
        for st, nonzero in zip(pending, _host_flags(list((flags > 0).unbind())), strict=True):
            if not nonzero:
                del st["x0"]

    def _beta3(self) -> float:
        group = self.param_groups[0]
        return group["beta3"] if group["beta3"] is not None else math.sqrt(group["betas"][1])

    def _s_weight(self, group: dict[str, Any], d: torch.Tensor, dlr: torch.Tensor) -> torch.Tensor:
        """Weight of ``g`` in ``s``: ``(d / d0) dlr``, or ``(d / d0) d`` with safeguard_warmup
        (0 for a group with lr = 0 either way)."""
        ratio = d / group["d0"]
        if group["safeguard_warmup"]:
            return ratio * d * (1.0 if group["lr"] > 0 else 0.0)
        return ratio * dlr

    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        dlr = self._dlr(group, d, step)
        coupled, _ = _weight_decay_scalars(group, dlr)
        scalars = [coupled, self._s_weight(group, d, dlr), _scalar(self._beta3() - 1.0, d)]
        return _PRODIGY_STATISTICS, scalars, _flags(group)

    def _numerator_weight(self, d: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # the term is sum over groups of (d / d0) dlr <g', x0 - x>, dlr = d lr bc
        return (d / self.param_groups[0]["d0"]) * d * self._bias_correction(step)

    def _update_pass(
        self,
        gb: GroupBatch,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        beta1, beta2 = group["betas"]
        on = ok.to(d.dtype)  # every coefficient is 0 on a skipped step
        dlr = on * self._dlr(group, d, step)
        coupled_wd, _ = _weight_decay_scalars(group, dlr)
        self._first_moment_buffers(gb, ok, d, coupled_wd)
        scalars = [
            ok,
            d,
            dlr,
            on * self._s_weight(group, d, dlr),
            *_weight_decay_scalars(group, dlr),
            on * (1.0 - beta1),
            on * (1.0 - beta2),
            on * (self._beta3() - 1.0),
            d * group["eps"],
        ]
        return _PRODIGY_UPDATE, scalars, _flags(group)

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        group = self.param_groups[0]
        numerator = self._global("numerator", d.device)
        d_max = self._global("d_max", d.device, group["d0"])
        new_numerator = self._beta3() * numerator + stats["numerator"]
        d_hat = group["d_coef"] * new_numerator / stats["s_l1"]
        valid = ok & (stats["s_l1"] > 0)
        new_max = torch.where(valid, torch.maximum(d_max, d_hat), d_max)
        # d = min(d_max, growth_rate * d), never below d
        d.copy_(_d_update(d, new_max, valid, group["growth_rate"]))
        d_max.copy_(new_max)
        self._store_unless_skipped(ok, numerator=new_numerator, s_l1=stats["s_l1"])

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out["d_max"] = self._global_float("d_max", self.param_groups[0]["d0"])
        out["numerator"] = self._global_float("numerator")
        out["s_l1"] = self._global_float("s_l1")
        coef = self.param_groups[0]["d_coef"]
        out["d_hat"] = coef * out["numerator"] / out["s_l1"] if out["s_l1"] > 0 else 0.0
        return out
