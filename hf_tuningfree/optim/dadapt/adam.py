"""D-Adapted Adam (Defazio & Mishchenko, ICML 2023): its passes, the Adam-form base Prodigy
shares, and the class.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ..base import (
    GroupBatch,
    StepBatch,
    compute_dtype,
)
from ..distributed import local_view
from ..validation import (
    check_betas,
    check_bool,
    check_positive,
)
from .machinery import DAdaptationBase
from .passes import (
    TensorPass,
    _d_update,
    _flags,
    _pass,
    _scalar,
    _sq_sum,
    _total,
    _weight_decay_scalars,
    check_growth_rate,
    check_slice_p,
    effective_grad,
)


def dadapt_adam_statistics(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    s: torch.Tensor,
    coupled_wd: torch.Tensor,
    eps: torch.Tensor,
    dlr: torch.Tensor,
    c_s: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of D-Adapted Adam for one tensor: ``||g||^2``, ``<g', s_k / (sqrt(v_k) +
    eps)>`` (the second moment BEFORE this step's update, as the published code) and
    ``||s_{k+1}||_1`` with ``s_{k+1} = s_k + c_s (dlr g' - s_k)``, the update's expression."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    v = exp_avg_sq.to(g.dtype)
    s_old = s.to(g.dtype)
    s_new = s_old + c_s * (dlr * g - s_old)
    dot = _total(g * s_old / (v.sqrt() + eps), acc64)
    return _sq_sum(grad, acc64), dot, _total(s_new.abs(), acc64)


def dadapt_adam_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor,
    s: torch.Tensor | None,
    ok: torch.Tensor,
    dlr: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    c_m: torch.Tensor,
    c_v: torch.Tensor,
    c_s: torch.Tensor,
    on: torch.Tensor,
    eps: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> None:
    """One tensor of D-Adapted Adam, in place. ``dlr`` is this group's ``d_k lr bc_k``, ``c_m,
    c_v, c_s`` are ``1 - beta1``, ``1 - beta2``, ``1 - sqrt(beta2)`` and ``on`` is 1: all 0 on a
    skipped step; ``decay`` is the decoupled factor ``dlr * wd``. ``exp_avg`` None (``beta1 =
    0``, no buffer): ``m_{k+1} = dlr g``."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)
    v = exp_avg_sq.to(g.dtype)
    dg = dlr * g
    m = dg if exp_avg is None else _momentum(exp_avg.to(g.dtype), dg, c_m)
    v = v + c_v * (g * g - v)
    param.copy_(p - decay * p - on * (m / (v.sqrt() + eps)))
    if exp_avg is not None:
        exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if s is not None:  # None: slice_p > 1 (dadapt_adam_sliced_s)
        s_old = s.to(g.dtype)
        s.copy_(s_old + c_s * (dg - s_old))


def dadapt_adam_sliced_s(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    dlr: torch.Tensor,
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
    """DAdaptAdam's new ``s = s + c_s (dlr g' - s)`` on the kept elements (``slice_p > 1``)."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    s_old = s.to(g.dtype)
    return s_old + c_s * (dlr * torch.where(ok, g, 0.0) - s_old)


def _momentum(m: torch.Tensor, dg: torch.Tensor, c_m: torch.Tensor) -> torch.Tensor:
    """``m + c_m (dg - m)``: the first moment's update (``c_m = 1 - beta1``)."""
    return m + c_m * (dg - m)


_ADAM_STATISTICS = _pass(
    dadapt_adam_statistics,
    "DAdaptAdam statistics",
    ("exp_avg_sq", "s"),
    ("g_sq", "dot", "s_l1"),
    native="dadapt_adam_stats",
)
_ADAM_UPDATE = _pass(
    dadapt_adam_tensor_update,
    "DAdaptAdam",
    ("exp_avg", "exp_avg_sq", "s"),
    (),
    ("param", "exp_avg", "exp_avg_sq", "s"),
    native="dadapt_adam_update",
    fused="dadapt_adam_fused",
    fused_sums=("dot", "s_l1"),
    optional=("exp_avg", "s"),
    sliced=dadapt_adam_sliced_s,
)


def adam_bias_correction(step: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """Adam's ``sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))`` for a 0-dim step count ``k``."""
    k1 = step + 1.0
    return torch.sqrt(1.0 - torch.pow(beta2, k1)) / (1.0 - torch.pow(beta1, k1))


class AdamFormBase(DAdaptationBase):
    """What the Adam forms, :class:`DAdaptAdam` and :class:`~hf_tuningfree.optim.prodigy.Prodigy`,
    share: the state ``exp_avg``, ``exp_avg_sq``, ``s``; Adam's bias correction ``bc_k`` in the
    step ``dlr_k = d_k lr bc_k``; a numerator whose step-``k`` term is a weight times the sum over
    groups of ``lr <g', .>`` (the statistics pass's ``dot``); the denominator ``||s_{k+1}||_1``;
    the stats ``bias_correction`` and ``d_lr``.

    A subclass implements ``_numerator_weight(d, step)``, ``_statistics_pass`` (whose sums are
    ``g_sq``, ``dot``, ``s_l1``), ``_update_pass`` and ``_finish``.
    """

    SLICED_KEYS = frozenset({"s"})

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_betas("betas", group["betas"])
        check_positive("eps", group["eps"])
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        # beta1 = 0: no first-moment buffer (the update uses this step's d g directly)
        keys = ("exp_avg", "exp_avg_sq") if group["betas"][0] > 0 else ("exp_avg_sq",)
        for key in keys:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["s"] = self._stat_zeros(param)  # 1/k of it with slice_p = k

    def _first_moment_buffers(
        self, gb: GroupBatch, ok: torch.Tensor, scale: torch.Tensor, coupled_wd: torch.Tensor
    ) -> None:
        """Make the batch's ``exp_avg`` match ``beta1`` before an update: with ``beta1 = 0`` a
        buffer left from before is dropped (the update is ``d g`` itself and the buffer would
        only hold a copy of it); with ``beta1 > 0`` a parameter without one (``beta1`` was 0
        until now) gets ``m_k = `` this step's ``d g`` (``scale`` times the effective gradient:
        DAdaptAdam's ``dlr``, Prodigy's ``d``; 0 on a skipped step), so that ``m_{k+1} = m_k +
        (1 - beta1)(d g - m_k)`` is exactly ``d g``: the first step after switching on moves as
        the step before it would have, and the momentum builds up from there (rather than from
        0, which would shrink that step by ``1 - beta1``)."""
        keep = gb.group["betas"][0] > 0
        flags = _flags(gb.group)

        def dg(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            g, _ = effective_grad(grad, param, coupled_wd.to(param.dtype), **flags)
            return scale.to(g.dtype) * torch.where(ok, g, 0.0)

        for p, g, st in zip(gb.params, gb.grads, gb.states, strict=True):
            if not keep:
                st.pop("exp_avg", None)
            elif "exp_avg" not in st:
                # made like exp_avg_sq (the parameter's dtype, a DTensor for a DTensor)
                m = torch.zeros_like(st["exp_avg_sq"], memory_format=torch.contiguous_format)
                local_view(m).copy_(dg(p, g))
                st["exp_avg"] = m

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"s_l1": local_view(state["s"]).to(compute_dtype(state["s"].dtype)).abs().sum()}

    def _bias_correction(self, step: torch.Tensor) -> torch.Tensor | float:
        group = self.param_groups[0]
        if not group["use_bias_correction"]:
            return 1.0
        return adam_bias_correction(step, *group["betas"])

    def _dlr(self, group: dict[str, Any], d: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """This group's step ``dlr = d lr bc``."""
        return d * self._bias_correction(step) * group["lr"]

    def _numerator_weight(self, d: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """What multiplies ``sum over groups of lr <g', .>`` in this step's numerator term."""
        raise NotImplementedError

    def _combine_statistics(
        self,
        batch: StepBatch,
        per_group: list[dict[str, torch.Tensor]],
        d: torch.Tensor,
        step: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        dtype = self._scalar_dtype()
        pairs = list(zip(per_group, batch.groups, strict=True))
        terms = batch.sum_on_device(pg["dot"] * gb.group["lr"] for pg, gb in pairs)
        return {
            "numerator": self._numerator_weight(d, step) * terms.to(dtype),
            "s_l1": batch.sum_on_device(pg["s_l1"] for pg, _ in pairs).to(dtype),
        }

    def stats(self) -> dict[str, float]:
        out = super().stats()
        device = self.global_state["d"].device if "d" in self.global_state else None
        step = torch.tensor(out["step"], dtype=torch.float64, device=device)
        bc = float(self._bias_correction(step))
        out["bias_correction"] = bc
        out["d_lr"] = out["d"] * out["lr"] * bc
        return out


class DAdaptAdam(AdamFormBase):
    r"""Adam with D-Adaptation (Defazio & Mishchenko, ICML 2023), in its current published form
    (the authors' ``dadaptation`` package, v3): the step ``dlr`` is folded into the first moment
    and into ``s``.

    With ``gamma_k`` the group's ``lr``, ``beta3 = sqrt(beta2)`` and ``bc_k`` Adam's bias
    correction ``sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))`` (1 when off)::

        dlr_k     = d_k * gamma_k * bc_k
        r_{k+1}   = beta3 r_k + (1 - beta3) * sum dlr_k <g_k, s_k / (sqrt(v_k) + eps)>
        m_{k+1}   = beta1 m_k + (1 - beta1) dlr_k g_k
        v_{k+1}   = beta2 v_k + (1 - beta2) g_k^2
        s_{k+1}   = beta3 s_k + (1 - beta3) dlr_k g_k
        d_hat     = r_{k+1} / ((1 - beta3) ||s_{k+1}||_1)
        d_{k+1}   = max(d_k, min(d_hat, growth_rate * d_k))
        x_{k+1}   = x_k - dlr_k wd x_k - m_{k+1} / (sqrt(v_{k+1}) + eps)

    (the ``wd`` term with decoupled weight decay; coupled decay adds ``wd * x_k`` to ``g_k``
    instead). The sums run over every parameter of every group.

    Bias correction is ON by default, unlike the authors' code (``use_bias_correction=False``
    gives their setting). Measured on a short language-model run (FACTS.md: 400 steps of a
    small GPT-2, eval loss relative to AdamW at its best lr): without it the step reaches ~1e-2
    by step 10 and stays there (1.22); with it the early steps are damped by ``bc_k`` (0.32 at
    the first step) and it closed about half of the gap to tuned AdamW (1.11). Fine-tuning runs
    are short, so this early phase decides much of the result.

    Args:
        params: parameters or param groups.
        lr: multiplier of the adapted step (schedules act on it). Default 0.5, not the paper's
            1.0: measured on the five tasks of the comparison suite (3 seeds, x the best of a
            7-point AdamW grid), 1.0 gives mean 1.057 / worst 1.191 (``d`` settles ~3x above
            Prodigy's from scratch), 0.5 mean 1.023 / worst 1.047, 0.33 mean 1.025 / worst
            1.064; 0.5 loses 1-4% on the fine-tuning tasks (README, "Measured: the defaults on
            the suite"). ``lr=1.0`` is the paper's setting.
        betas: ``(beta1, beta2)`` (default ``(0.9, 0.999)``, the paper's). ``beta1 = 0``
            keeps no first-moment buffer (``m_{k+1} = dlr_k g_k`` is used directly; prodigy
            PR #32): 4 bytes less state per fp32 element, the same numbers as a zero-momentum
            buffer to rounding (``m + (x - m)`` is ``x`` up to one rounding), and ``d`` is
            estimated as before (its sums do not involve ``m``). Setting ``beta1`` from 0 to
            > 0 on a live optimizer creates the buffer as that step's ``dlr g`` (so the step
            equals a ``beta1 = 0`` step and the momentum builds from there); back to 0 drops it.
        eps: added to ``sqrt(v)`` (default 1e-8).
        weight_decay: weight decay coefficient (default 0).
        decoupled_weight_decay: True (default): AdamW-style ``x -= dlr * wd * x``, what users of
            AdamW and the Trainer expect; False: ``wd * x`` added to the gradient (the authors'
            default, ``decouple=False``).
        use_bias_correction: see above (default True).
        d0: lower bound on the distance to the solution at the first step (default 1e-6).
        d0_rel: after the first step, ``d`` is raised to ``d0_rel`` times the scale of the
            initial weights (``_X0_SCALE``; default 1e-2, chosen on the suite's five tasks; 0: the
            authors' start from ``d0``).
        growth_rate: ``d`` grows by at most this factor per step (default inf).
        d_groups: ``"model"`` (default: one ``d`` for all groups, the papers') or ``"group"``:
            one ``d`` per param-group ``name`` (groups without a name share one), e.g. for LoRA
            A/B or two networks; every estimate is the model-wide algorithm run on its groups.
        maximize: maximize the objective.
        slice_p: statistics on a deterministic subsample (default 1: every element; prodigy
            PR #22, reported to halve optimizer memory in OneTrainer PR #550): with ``k > 1``,
            ``s`` is stored for elements ``0, k, 2k, ...`` of each flattened tensor only
            (``ceil(n / k)`` of them) and the sums that only estimate ``d`` (the numerator
            term and ``||s||_1``) are taken over those elements; ``m``, ``v`` and the update of
            ``x`` are unchanged and full, as is the non-finite guard's ``||g||^2``. ``d_hat``
            is then the ratio of the subsampled sums: a consistent estimate of the full ratio
            (both scale with the kept fraction), with the small-sample bias of a ratio
            estimator (of order ``1 / (number of kept elements)``); a tensor with ``n <= k``
            contributes one element, so tensors smaller than ``k`` weigh more per element than
            larger ones (``k / n`` times). Saves ``(1 - 1/k)`` of ``s``. The kept set is
            deterministic: with ``k`` dividing a matrix's row length it is the same columns in every
            row, and where columns differ systematically (embeddings, heads) that aliasing biases
            ``d`` by more than sampling would: an odd ``k`` walks through the columns instead (not a
            measured improvement: on the demo task k = 7 varied more across seeds than k = 8).
            Model-wide (the same in every group). On the C path, unsharded: one fused sweep per
            group (``*_fused_sliced``: per block the kept elements' sums and ``s``, then the
            block's full update); sharded (two-pass): the update in C without ``s``, the
            statistics and ``s`` on the kept elements in torch (strided views never reach C).
        implementation: ``"auto"``, ``"native"``, ``"compiled"``, ``"foreach"`` or ``"loop"``.
            On CPU, ``"auto"`` and ``"native"`` run the C kernels (see the module docstring);
            on CUDA ``"auto"`` runs ``"foreach"`` (the passes as multi-tensor ops).
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``exp_avg`` (m; none with ``beta1 = 0``), ``exp_avg_sq`` (v), ``s``;
    model-wide ``d``, ``numerator`` (r), ``s_l1``, ``step``.
    """

    _MODEL_WIDE = ("d0", "growth_rate", "betas", "use_bias_correction", "slice_p")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        use_bias_correction: bool = True,
        d0: float = 1e-6,
        d0_rel: float = 1e-2,
        growth_rate: float = float("inf"),
        d_groups: str = "model",
        maximize: bool = False,
        implementation: str = "auto",
        *,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": check_betas("betas", betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "use_bias_correction": check_bool("use_bias_correction", use_bias_correction),
            "d0": check_positive("d0", d0),
            "d0_rel": d0_rel,
            "growth_rate": check_growth_rate(growth_rate),
            "d_groups": d_groups,
            "maximize": maximize,
            "implementation": implementation,
            "slice_p": check_slice_p(slice_p),
        }
        super().__init__(
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        dlr = self._dlr(group, d, step)
        coupled, _ = _weight_decay_scalars(group, dlr)
        c_s = _scalar(1.0 - math.sqrt(group["betas"][1]), d)
        return _ADAM_STATISTICS, [coupled, _scalar(group["eps"], d), dlr, c_s], _flags(group)

    def _numerator_weight(self, d: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # the term is sum over groups of dlr <g', s_k / (sqrt(v_k) + eps)>, dlr = d lr bc
        return d * self._bias_correction(step)

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
        self._first_moment_buffers(gb, ok, dlr, coupled_wd)
        scalars = [
            ok,
            dlr,
            *_weight_decay_scalars(group, dlr),
            on * (1.0 - beta1),
            on * (1.0 - beta2),
            on * (1.0 - math.sqrt(beta2)),
            on,
            _scalar(group["eps"], d),
        ]
        return _ADAM_UPDATE, scalars, _flags(group)

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        group = self.param_groups[0]
        beta3 = math.sqrt(group["betas"][1])
        numerator = self._global("numerator", d.device)
        new_numerator = beta3 * numerator + (1.0 - beta3) * stats["numerator"]
        d_hat = new_numerator / ((1.0 - beta3) * stats["s_l1"])
        valid = ok & (stats["s_l1"] > 0)
        d.copy_(_d_update(d, d_hat, valid, group["growth_rate"]))
        self._store_unless_skipped(ok, numerator=new_numerator, s_l1=stats["s_l1"])

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out["numerator"] = self._global_float("numerator")
        out["s_l1"] = self._global_float("s_l1")
        beta3 = math.sqrt(self.param_groups[0]["betas"][1])
        denom = (1.0 - beta3) * out["s_l1"]
        out["d_hat"] = out["numerator"] / denom if denom > 0 else 0.0
        return out


# ====================================================================== AdaGrad
