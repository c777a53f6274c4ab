"""Prodigy: D-Adaptation that reaches the right step size faster.

Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024
(arXiv:2306.06101), the Adam form (the paper's Adam-like Algorithm; the authors' ``prodigyopt``
package, v1.1).

Prodigy keeps D-Adaptation's single model-wide lower bound ``d`` on the distance to the solution
but weights step ``k`` by ``d_k`` (the paper's ``lambda_k = d_k^2`` weighting), so the estimate
catches up with ``D`` in ``O(log(D/d0))`` fewer steps, and it measures progress directly with
``<g_k, x_0 - x_k>``. The phases of a step, the single ``d`` over all groups and the sharded
reductions are those of :mod:`hf_tuningfree.optim.dadapt`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .base import GroupBatch, compute_dtype
from .dadapt import DAdaptationBase, _prepare_grad, adam_bias_correction, check_growth_rate
from .distributed import local_view
from .kernels import CompiledKernel
from .validation import (
    check_betas,
    check_bool,
    check_in_range,
    check_positive,
)

__all__ = ["Prodigy", "prodigy_tensor_update"]


def prodigy_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    s: torch.Tensor,
    x0: torch.Tensor,
    ok: torch.Tensor,
    d: torch.Tensor,
    dlr: torch.Tensor,
    weight: torch.Tensor,
    s_weight: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    maximize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor of Prodigy, in place.

    ``d`` is ``d_k``, ``dlr`` this group's ``d_k * lr * bias_correction``, ``weight`` the
    numerator weight ``(d_k / d0) * dlr`` and ``s_weight`` the weight of ``g`` in ``s`` (the same,
    or ``(d_k / d0) * d_k`` with ``safeguard_warmup``); all 0 on a skipped step except ``d``.
    ``decay`` is ``dlr * weight_decay`` (decoupled). Returns ``weight * <g_k, x_0 - x_k>`` and
    ``||s_{k+1}||_1``.
    """
    g, p = _prepare_grad(grad, param, ok, coupled_wd, maximize=maximize)
    okf = ok.to(g.dtype)
    numerator = (g * (x0.to(g.dtype) - p)).sum() * weight
    m = exp_avg.to(g.dtype)
    v = exp_avg_sq.to(g.dtype)
    s_new = s.to(g.dtype)
    dg = d * g
    m = m + (okf * (1.0 - beta1)) * (dg - m)
    v = v + (okf * (1.0 - beta2)) * (dg * dg - v)
    s_new = s_new + (okf * (beta3 - 1.0)) * s_new + s_weight * g
    p = p - decay * p - (okf * dlr) * (m / (v.sqrt() + d * eps))
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    s.copy_(s_new)
    return numerator, s_new.abs().sum()


_compiled_prodigy = CompiledKernel(prodigy_tensor_update, "Prodigy")


class Prodigy(DAdaptationBase):
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
        betas: ``(beta1, beta2)`` (default ``(0.9, 0.999)``).
        beta3: decay of ``r`` and ``s`` (default None: ``sqrt(beta2)``).
        eps: added to ``sqrt(v)`` after scaling by ``d`` (default 1e-8).
        weight_decay: weight decay coefficient (default 0).
        decoupled_weight_decay: True (default, as the authors' ``decouple=True``): AdamW-style
            ``x -= dlr * wd * x``; False: ``wd * x`` added to the gradient.
        use_bias_correction: see above (default True).
        safeguard_warmup: leave ``lr`` (and bias correction) out of ``s`` so that a warm-up that
            starts ``lr`` small does not inflate ``d`` (default False, the authors'); a group
            with ``lr = 0`` still stays out of ``s``.
        d0: initial lower bound on the distance to the solution (default 1e-6).
        d_coef: multiplies ``d_hat``; the authors' preferred knob when tuning (default 1.0).
        growth_rate: ``d`` grows by at most this factor per step (default inf).
        maximize: maximize the objective.
        implementation: ``"auto"``, ``"loop"`` or ``"compiled"``; ``"foreach"`` runs the loop.
        skip_nonfinite, global_reduce: see :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``exp_avg`` (m), ``exp_avg_sq`` (v), ``s``, ``x0``; model-wide ``d``,
    ``d_max``, ``numerator`` (r), ``s_l1``, ``step``.
    """

    _MODEL_WIDE = (
        "d0",
        "growth_rate",
        "betas",
        "beta3",
        "d_coef",
        "use_bias_correction",
        "safeguard_warmup",
    )
    _SUMS = ("numerator", "s_l1")

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
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        maximize: bool = False,
        implementation: str = "auto",
        *,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
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
            "d_coef": check_positive("d_coef", d_coef),
            "growth_rate": check_growth_rate(growth_rate),
            "maximize": maximize,
            "implementation": implementation,
        }
        super().__init__(
            params, defaults, skip_nonfinite=skip_nonfinite, global_reduce=global_reduce
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_betas("betas", group["betas"])
        check_positive("eps", group["eps"])
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        for key in ("exp_avg", "exp_avg_sq", "s"):
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["x0"] = param.detach().clone(memory_format=torch.preserve_format)

    def _beta3(self) -> float:
        group = self.param_groups[0]
        return group["beta3"] if group["beta3"] is not None else math.sqrt(group["betas"][1])

    def _bias_correction(self, step: torch.Tensor) -> torch.Tensor | float:
        group = self.param_groups[0]
        if not group["use_bias_correction"]:
            return 1.0
        return adam_bias_correction(step, *group["betas"])

    def _step_scalars(
        self,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        d0 = self.param_groups[0]["d0"]
        d_bc = torch.where(ok, d * self._bias_correction(step), 0.0)
        d_ratio = torch.where(ok, d / d0, 0.0)
        return {"d_bc": d_bc, "d_ratio": d_ratio, "d_ratio_d": d_ratio * d}

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"s_l1": local_view(state["s"]).to(compute_dtype(state["s"].dtype)).abs().sum()}

    def _kernel(self, group: dict[str, Any]) -> tuple[Callable[..., Any], CompiledKernel]:
        return prodigy_tensor_update, _compiled_prodigy

    def _tensors(self, gb: GroupBatch) -> list[list[torch.Tensor]]:
        keys = ("exp_avg", "exp_avg_sq", "s", "x0")
        return [gb.params, gb.grads, *(gb.state_list(k) for k in keys)]

    def _group_scalars(
        self, group: dict[str, Any], d: torch.Tensor, scalars: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        lr = group["lr"]
        dlr = scalars["d_bc"] * lr
        weight = scalars["d_ratio"] * dlr
        if group["safeguard_warmup"]:
            s_weight = scalars["d_ratio_d"] * (1.0 if lr > 0 else 0.0)
        else:
            s_weight = weight
        wd = group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        coupled = torch.full((), 0.0 if decoupled else wd, dtype=dlr.dtype, device=dlr.device)
        return [d, dlr, weight, s_weight, coupled, dlr * (wd if decoupled else 0.0)]

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {
            "beta1": beta1,
            "beta2": beta2,
            "beta3": self._beta3(),
            "eps": group["eps"],
            "maximize": group["maximize"],
        }

    def _finish(
        self,
        sums: dict[str, torch.Tensor],
        ok: torch.Tensor,
        d: torch.Tensor,
        scalars: dict[str, torch.Tensor],
    ) -> None:
        group = self.param_groups[0]
        numerator = self._global("numerator", d.device)
        s_l1 = self._global("s_l1", d.device)
        d_max = self._global("d_max", d.device, group["d0"])
        new_numerator = self._beta3() * numerator + sums["numerator"]
        d_hat = group["d_coef"] * new_numerator / sums["s_l1"]
        valid = ok & (sums["s_l1"] > 0)
        new_max = torch.where(valid, torch.maximum(d_max, d_hat), d_max)
        growth = group["growth_rate"]
        grown = new_max if math.isinf(growth) else torch.minimum(new_max, d * growth)
        d.copy_(torch.where(valid, torch.maximum(d, grown), d))
        d_max.copy_(new_max)
        numerator.copy_(torch.where(ok, new_numerator, numerator))
        s_l1.copy_(torch.where(ok, sums["s_l1"], s_l1))

    def stats(self) -> dict[str, float]:
        out = super().stats()
        device = self.global_state["d"].device if "d" in self.global_state else None
        step = torch.tensor(out["step"], dtype=torch.float64, device=device)
        bc = float(self._bias_correction(step))
        out["bias_correction"] = bc
        out["d_lr"] = out["d"] * out["lr"] * bc
        out["d_max"] = self._global_float("d_max", self.param_groups[0]["d0"])
        out["numerator"] = self._global_float("numerator")
        out["s_l1"] = self._global_float("s_l1")
        coef = self.param_groups[0]["d_coef"]
        out["d_hat"] = coef * out["numerator"] / out["s_l1"] if out["s_l1"] > 0 else 0.0
        return out
