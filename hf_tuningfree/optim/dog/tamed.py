"""T-DoG: DoG's step divided by the taming factor of the paper's theory."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from ..validation import (
    check_in_range,
)
from .core import DoG
from .kernels import (
    _safe_div,
    taming_factor,
)


class TDoG(DoG):
    r"""T-DoG, the "tamed" DoG of Ivgi, Hinder & Carmon's theory (arXiv:2302.12022 v3, Section 3,
    the step-size definition for locally bounded stochastic gradients).

    .. math::
        \eta_t = \frac{\bar r_t}{8^4\,\theta_{T,\delta}\,
                 \log_+^2\!\big(1 + t\,\bar\ell_t^2/\bar\ell_0^2\big)\,
                 \sqrt{G_t + 16\,\bar\ell_t^2}},
        \qquad \theta_{T,\delta} = \log\frac{60\log(6T)}{\delta},\quad \log_+(z) = 1 + \log z,

    where :math:`\bar\ell_t = \max_{i\le t}\ell(x_i)` bounds the stochastic gradient norms met
    so far. The paper's :math:`\ell` is a (local) bound that is not observable; here
    :math:`\bar\ell_t` is the largest gradient norm observed up to step :math:`t` (the same proxy
    makes :math:`\bar\ell_0 = \|g_0\|`), and :math:`T = t + 1`, the steps so far (the paper
    fixes the horizon :math:`T` in advance). ``rbar``, ``G``, ``r_eps`` and weight decay are as in
    :class:`DoG`.

    The taming makes the theory work (iterates stay within a constant factor of the initial
    distance with probability ``1 - delta``); in practice the divisor is 10^5-10^6, so T-DoG
    moves very little in runs of ordinary length. It is here for fidelity to the paper and for
    experiments; train with :class:`DoG` or :class:`LDoG`.

    Args:
        delta: failure probability of the high-probability guarantee (default 0.1), in (0, 1).
        (others): as :class:`DoG`.

    Extra model-wide state: ``lbar`` (largest gradient norm so far) and ``l0`` (the first one);
    ``stats()`` adds ``lbar`` and ``taming`` (the divisor).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        reps_rel: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        delta: float = 0.1,
        implementation: str = "auto",
        *,
        maximize: bool = False,
        implicit_zero_x0: bool = True,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        self._delta = check_in_range("delta", delta, 0.0, 1.0, low_inclusive=False)
        super().__init__(
            params,
            lr=lr,
            reps_rel=reps_rel,
            weight_decay=weight_decay,
            eps=eps,
            implementation=implementation,
            maximize=maximize,
            implicit_zero_x0=implicit_zero_x0,
            slice_p=slice_p,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    _PICKLED_ATTRIBUTES = (*DoG._PICKLED_ATTRIBUTES, "_delta")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "delta" in param_group:
            check_in_range("delta", param_group["delta"], 0.0, 1.0, low_inclusive=False)
        else:
            param_group["delta"] = getattr(self, "_delta", 0.1)
        super().add_param_group(param_group)

    def _fill_group(self, group: dict[str, Any]) -> None:
        super()._fill_group(group)
        group.setdefault("delta", self._delta)

    def _model_wide_keys(self) -> tuple[str, ...]:
        return ("reps_rel", "eps", "delta")

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
        gs = self.global_state
        zero = torch.zeros_like(rbar)
        lbar = self.global_tensor("lbar", device, lambda d: zero)
        l0 = self.global_tensor("l0", device, lambda d: zero)
        gnorm = g2.sqrt()
        new_lbar = torch.where(ok, torch.maximum(lbar, gnorm), lbar)
        new_l0 = torch.where(ok & (l0 == 0), gnorm, l0)  # first nonzero gradient norm applied
        factor = taming_factor(step, new_lbar, new_l0, delta=self.param_groups[0]["delta"])
        gs["lbar"], gs["l0"] = new_lbar, new_l0
        gs["taming"] = torch.where(ok, factor, self.global_tensor("taming", device, lambda d: zero))
        return _safe_div(
            rbar, factor * torch.sqrt(G + 16.0 * new_lbar * new_lbar + self.param_groups[0]["eps"])
        )

    def stats(self) -> dict[str, float]:
        out = super().stats()
        for key in ("lbar", "taming"):
            if key in self.global_state:
                out[key] = float(self.global_state[key])
        return out
