"""D-Adapted AdaGrad (Defazio & Mishchenko, ICML 2023): its passes and the class."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ..base import (
    GroupBatch,
    StepBatch,
)
from ..validation import (
    check_in_range,
    check_nonnegative,
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
    check_growth_rate,
    effective_grad,
)


def dadapt_adagrad_statistics(
    param: torch.Tensor,
    grad: torch.Tensor,
    alpha: torch.Tensor,
    s: torch.Tensor,
    coupled_wd: torch.Tensor,
    dlr: torch.Tensor,
    eps: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1 of D-Adapted AdaGrad for one tensor: ``||g||^2`` and the changes this step makes
    to the model-wide numerator ``sum s^2 / w - sum_i dlr_i^2 g_i^2 / w_{i+1}`` (``w = sqrt(alpha)
    + eps``) and to ``||s||_1``; all are known before the update since ``dlr = d_k lr`` is.

    Written as changes, a tensor without a gradient this step keeps its earlier contribution
    without being read; the numerator change is ``(s_k^2 + 2 dlr g s_k) / w_{k+1} - s_k^2 / w_k``,
    in which the ``dlr^2 g^2`` terms cancel exactly."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    a = alpha.to(g.dtype)
    s_old = s.to(g.dtype)
    w_old = a.sqrt() + eps
    w_new = (a + g * g).sqrt() + eps
    dg = dlr * g
    s_sq = s_old * s_old
    numerator = _total((s_sq + 2.0 * dg * s_old) / w_new - s_sq / w_old, acc64)
    l1 = _total((s_old + dg).abs() - s_old.abs(), acc64)
    return _sq_sum(grad, acc64), numerator, l1


def dadapt_adagrad_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    alpha: torch.Tensor,
    s: torch.Tensor,
    x0: torch.Tensor,
    ok: torch.Tensor,
    dlr: torch.Tensor,
    coupled_wd: torch.Tensor,
    average: torch.Tensor,
    eps: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    averaged: bool,
    acc64: bool,
) -> None:
    """One tensor of D-Adapted AdaGrad, in place: ``alpha += g^2``, ``s += dlr g``, ``z = x0 - s
    / (sqrt(alpha) + eps)``, ``x = z`` or, with momentum, ``x += average (z - x)`` (``average =
    1 - momentum``). ``dlr`` and ``average`` are 0 on a skipped step."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)
    a_new = alpha.to(g.dtype) + g * g
    s_new = s.to(g.dtype) + dlr * g
    z = x0.to(g.dtype) - s_new / (a_new.sqrt() + eps)
    param.copy_(p + average * (z - p) if averaged else torch.where(ok, z, p))
    alpha.copy_(a_new)
    s.copy_(s_new)


_ADAGRAD_STATISTICS = _pass(
    dadapt_adagrad_statistics,
    "DAdaptAdaGrad statistics",
    ("alpha", "s"),
    ("g_sq", "numerator", "s_l1"),
    native="dadapt_adagrad_stats",
)
_ADAGRAD_UPDATE = _pass(
    dadapt_adagrad_tensor_update,
    "DAdaptAdaGrad",
    ("alpha", "s", "x0"),
    (),
    ("param", "alpha", "s"),
    native="dadapt_adagrad_update",
    fused="dadapt_adagrad_fused",
    fused_sums=("numerator", "s_l1"),
)


class DAdaptAdaGrad(DAdaptationBase):
    r"""AdaGrad with D-Adaptation (Defazio & Mishchenko, ICML 2023), dual-averaging form as in the
    authors' ``dadaptation`` package (v3).

    With ``gamma`` the group's ``lr``, per coordinate ``alpha_0 = initial_accumulator_value`` and
    ``w_k = sqrt(alpha_k) + eps``::

        dlr_k     = d_k * gamma
        alpha_{k+1} = alpha_k + g_k^2
        s_{k+1}   = s_k + dlr_k g_k
        N_{k+1}   = sum s_{k+1}^2 / w_{k+1} - sum_{i<=k} dlr_i^2 sum g_i^2 / w_{i+1}
        d_hat     = N_{k+1} / ||s_{k+1}||_1
        d_{k+1}   = max(d_k, min(d_hat, growth_rate * d_k))
        z_{k+1}   = x_0 - s_{k+1} / w_{k+1}
        x_{k+1}   = beta x_k + (1 - beta) z_{k+1}      (beta = momentum; 0: x = z)

    The authors recommend the Adam or SGD variants in most situations: on top of AdaGrad the
    estimate adapts more slowly in practice. It has none of the memory options of the other
    variants: its ``s`` and ``x0`` enter the iterate itself (``z = x_0 - s / w``), so they
    cannot be subsampled (``slice_p``) without changing the method.

    Weight decay is coupled only (``wd * x`` added to the gradient, as the authors): ``x`` is
    recomputed from ``x_0`` every step, so a decoupled decay of ``x`` would be undone at the next
    step.

    Args:
        params: parameters or param groups.
        lr: multiplier of the adapted step (default 1.0).
        momentum: primal-averaging momentum in [0, 1) (default 0).
        weight_decay: L2 coefficient added to the gradient (default 0).
        eps: added to ``sqrt(alpha)`` (default 1e-6, the authors').
        initial_accumulator_value: ``alpha_0`` (default 1e-6, the authors' fixed value).
        d0, d0_rel, growth_rate, d_groups, maximize, implementation: as :class:`DAdaptSGD`.
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``alpha``, ``s``, ``x0``; model-wide ``d``, ``numerator`` (N),
    ``s_l1``, ``step``.
    """

    _MODEL_WIDE = ("d0", "growth_rate")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-6,
        initial_accumulator_value: float = 1e-6,
        d0: float = 1e-6,
        d0_rel: float = 1e-2,
        growth_rate: float = float("inf"),
        d_groups: str = "model",
        maximize: bool = False,
        implementation: str = "auto",
        *,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eps": eps,
            "initial_accumulator_value": initial_accumulator_value,
            "d0": check_positive("d0", d0),
            "d0_rel": d0_rel,
            "growth_rate": check_growth_rate(growth_rate),
            "d_groups": d_groups,
            "maximize": maximize,
            "implementation": implementation,
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
        check_in_range("momentum", group["momentum"], 0.0, 1.0)
        check_positive("eps", group["eps"])
        check_nonnegative("initial_accumulator_value", group["initial_accumulator_value"])

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["alpha"] = torch.full_like(
            param, group["initial_accumulator_value"], memory_format=torch.preserve_format
        )
        state["s"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["x0"] = param.detach().clone(memory_format=torch.preserve_format)

    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        scalars = [_scalar(group["weight_decay"], d), d * group["lr"], _scalar(group["eps"], d)]
        return _ADAGRAD_STATISTICS, scalars, _flags(group)

    def _combine_statistics(
        self,
        batch: StepBatch,
        per_group: list[dict[str, torch.Tensor]],
        d: torch.Tensor,
        step: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return {
            name: torch.stack([pg[name] for pg in per_group]).sum()
            for name in ("numerator", "s_l1")
        }

    def _update_pass(
        self,
        gb: GroupBatch,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        on = ok.to(d.dtype)
        scalars = [
            ok,
            on * d * group["lr"],
            _scalar(group["weight_decay"], d),
            on * (1.0 - group["momentum"]),
            _scalar(group["eps"], d),
        ]
        return _ADAGRAD_UPDATE, scalars, {**_flags(group), "averaged": group["momentum"] > 0}

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        numerator = self._global("numerator", d.device)
        s_l1 = self._global("s_l1", d.device)
        new_numerator = numerator + stats["numerator"]
        new_l1 = s_l1 + stats["s_l1"]
        d_hat = new_numerator / new_l1
        valid = ok & (new_l1 > 0)
        d.copy_(_d_update(d, d_hat, valid, self.param_groups[0]["growth_rate"]))
        self._store_unless_skipped(ok, numerator=new_numerator, s_l1=new_l1)

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out["d_lr"] = out["d"] * out["lr"]
        out["numerator"] = self._global_float("numerator")
        out["s_l1"] = self._global_float("s_l1")
        out["d_hat"] = out["numerator"] / out["s_l1"] if out["s_l1"] > 0 else 0.0
        return out
