"""D-Adapted SGD (Defazio & Mishchenko, ICML 2023): its per-element passes and the class."""

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
    check_bool,
    check_choice,
    check_in_range,
    check_positive,
)
from .machinery import DAdaptationBase
from .passes import (
    TensorPass,
    _d_update,
    _flags,
    _pass,
    _sq_sum,
    _total,
    _weight_decay_scalars,
    check_growth_rate,
    check_slice_p,
    effective_grad,
)


def dadapt_sgd_statistics(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    coupled_wd: torch.Tensor,
    lam: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of D-Adapted SGD for one tensor: ``||g||^2`` of the raw gradient, ``<g', s_k>``
    with ``g'`` the gradient the update uses, ``||s_k + lam g'||^2`` (``= ||s_{k+1}||^2``) and
    ``||g'||^2`` (for the step that fixes ``||g_0||``, where ``s_k = 0`` and ``lam`` is not known
    yet)."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    s_old = s.to(g.dtype)
    s_new = s_old + lam * g
    dot = _total(g * s_old, acc64)
    return _sq_sum(grad, acc64), dot, _total(s_new * s_new, acc64), _total(g * g, acc64)


def dadapt_sgd_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor | None,
    ok: torch.Tensor,
    lam: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> None:
    """One tensor of D-Adapted SGD without momentum, in place (``x = z``): ``s += lam g``,
    ``x -= lam g (+ decay x)``. ``lam`` is this group's ``d_k lr / ||g_0||`` (0 on a skipped
    step), ``decay`` the decoupled factor ``lam * wd``."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)  # a skipped step's NaN/Inf never reaches the state
    param.copy_(p - decay * p - lam * g)
    if s is not None:  # None: slice_p > 1, s updated on its own (dadapt_sgd_sliced_s)
        s.copy_(s.to(g.dtype) + lam * g)


def dadapt_sgd_sliced_s(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    lam: torch.Tensor,
    coupled_wd: torch.Tensor,
    *_: torch.Tensor,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> torch.Tensor:
    """DAdaptSGD's new ``s = s + lam g'`` on the kept elements (``slice_p > 1``)."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    return s.to(g.dtype) + lam * torch.where(ok, g, 0.0)


def dadapt_sgd_momentum_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor | None,
    z: torch.Tensor,
    ok: torch.Tensor,
    lam: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    average: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> None:
    """One tensor of D-Adapted SGD with primal-averaging momentum, in place: ``z -= lam g
    (+ decay z)``, ``x += average (z - x)`` with ``average = 1 - momentum`` (0 when skipped)."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)
    zz = z.to(g.dtype)
    zz = zz - decay * zz - lam * g
    param.copy_(p + average * (zz - p))
    if s is not None:
        s.copy_(s.to(g.dtype) + lam * g)
    z.copy_(zz)


_SGD_STATISTICS = _pass(
    dadapt_sgd_statistics,
    "DAdaptSGD statistics",
    ("s",),
    ("g_sq", "dot", "s_sq", "gg"),
    native="dadapt_sgd_stats",
)
_SGD_UPDATE = _pass(
    dadapt_sgd_tensor_update,
    "DAdaptSGD",
    ("s",),
    (),
    ("param", "s"),
    native="dadapt_sgd_update",
    fused="dadapt_sgd_fused",
    fused_sums=("dot", "s_sq", "gg"),
    optional=("s",),
    sliced=dadapt_sgd_sliced_s,
)
_SGD_MOMENTUM_UPDATE = _pass(
    dadapt_sgd_momentum_tensor_update,
    "DAdaptSGD",
    ("s", "z"),
    (),
    ("param", "s", "z"),
    native="dadapt_sgd_momentum_update",
    fused="dadapt_sgd_momentum_fused",
    fused_sums=("dot", "s_sq", "gg"),
    optional=("s",),
    sliced=dadapt_sgd_sliced_s,
)


class DAdaptSGD(DAdaptationBase):
    r"""SGD with D-Adaptation (Defazio & Mishchenko, ICML 2023), the form of the authors'
    ``dadaptation`` package: a dual-averaging gradient sum ``s`` and primal-averaging momentum.

    With ``gamma`` the group's ``lr`` and ``G_k`` the bound on the gradient norm (below)::

        lambda_k  = d_k * gamma / G_k
        N_{k+1}   = N_k + lambda_k <g_k, s_k>                   (summed over all groups)
        s_{k+1}   = s_k + lambda_k g_k
        z_{k+1}   = z_k - lambda_k g_k                           (z_0 = x_0)
        x_{k+1}   = beta x_k + (1 - beta) z_{k+1}                (beta = momentum; 0: x = z)
        d_hat     = 2 N_{k+1} / ||s_{k+1}||_2
        d_{k+1}   = max(d_k, min(d_hat, growth_rate * d_k))

    ``d`` is a lower bound on ``||x_0 - x*||`` for convex problems (the paper's Theorem), for any
    positive weights ``lambda_k``; the paper's step ``d / G`` takes ``G`` a bound on every
    gradient norm (G-Lipschitz objective). The authors' code estimates ``G`` by the first
    gradient's norm ``||g_0||`` (``gradient_bound="first"``). Here ``G_k`` is by default the
    largest gradient norm seen so far, this step's included (``gradient_bound="max"``): the
    tightest bound the run has shown. With ``||g_0||``, a run whose gradients grow (a small
    first gradient, a sharper region reached later) takes steps ``d / ||g_0||`` that the
    curvature cannot take, and ``d`` never decreases: a 10-32-1 MLP regressing noise diverges
    from loss 11.6 to 8e35 in 100 full-batch steps (issue 18), a 1.3M GPT-2 jumps from eval loss
    6.1 back to 8.7 mid-run (issue 13). With the running maximum the step shrinks as soon as the
    gradients grow, so the move ``lambda_k ||g_k||`` of a step stays at most ``d_k lr``.
    Gradient norms are of the raw gradients of the groups with ``lr > 0`` (as the authors').

    The step of the first iteration is ``d0 * lr`` (``G_0 = ||g_0||`` either way).
    ``stats()["d_lr"]`` is ``d * lr / G``.

    Args:
        params: parameters or param groups.
        lr: multiplier of the adapted step (default 1.0; schedules act on it).
        momentum: primal-averaging momentum ``beta`` in [0, 1) (default 0.0, the authors').
            The paper's deep-learning runs used 0.9.
        weight_decay: weight decay coefficient (default 0).
        decoupled_weight_decay: False (default, the authors'): L2 term ``wd * x`` added to the
            gradient (it then enters ``s`` and ``d``); True: ``z -= lambda_k * wd * z`` (SGDW
            style; ``x`` itself without momentum), kept out of ``s`` and ``d``.
        d0: lower bound on the distance to the solution at the first step (default 1e-6).
        d0_rel: after the first step, ``d`` is raised to ``d0_rel`` times the scale of the
            initial weights (``_X0_SCALE``; default 1e-2, chosen on the suite's five tasks; 0: the
            authors' start from ``d0``).
        growth_rate: ``d`` grows by at most this factor per step (default inf).
        d_groups: ``"model"`` (default: one ``d`` for all groups, the papers') or ``"group"``:
            one ``d`` per param-group ``name`` (groups without a name share one), e.g. for LoRA
            A/B or two networks; every estimate is the model-wide algorithm run on its groups.
        gradient_bound: ``"max"`` (default) or ``"first"`` (the authors'), see above.
        maximize: maximize the objective.
        slice_p: statistics on a deterministic subsample (default 1: every element; prodigy
            PR #22): with ``k > 1``, ``s`` is stored for elements ``0, k, 2k, ...`` of each
            flattened tensor only (``ceil(n / k)`` of them) and the sums that only estimate ``d``
            (``<g, s>``, ``||s||^2``) are taken over those elements and scaled by ``k`` (an
            estimate of the full sums: ``N / ||s||_2`` mixes degrees, and unscaled sums would
            bias ``d_hat`` by ``1 / sqrt(k)``); the update of ``x`` (and ``z``) and the gradient
            bound ``G`` (the full ``||g||``) are unchanged. ``d_hat`` is then a ratio of two
            subsample estimates: consistent as the subsample grows, with the small-sample bias
            of a ratio estimator (of order ``1 / (number of kept elements)``); a tensor with
            ``n <= k`` contributes one element (weighted as ``k``). Saves ``(1 - 1/k)`` of ``s``
            (4 bytes per fp32 element at ``k`` large). Model-wide (the same in every group). The
            kept set is deterministic: with ``k`` dividing a matrix's row length it is the same
            columns in every row, and where columns differ systematically (embeddings, heads) that
            aliasing biases ``d`` by more than sampling would: an odd ``k`` walks through the
            columns instead (not a measured improvement on the demo task).
        implementation: ``"auto"``, ``"native"``, ``"compiled"``, ``"foreach"`` or ``"loop"``
            (see :mod:`hf_tuningfree.optim.kernels`). On CPU, ``"auto"`` and ``"native"`` run
            the C kernels (see the module docstring); on CUDA ``"auto"`` runs ``"foreach"``
            (the passes as multi-tensor ops).
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``s`` (and ``z`` when ``momentum > 0``); model-wide in
    ``global_state``: ``d``, ``numerator`` (``N``), ``grad_bound_sq`` (``G^2``), ``s_sq``
    (``||s||^2``), ``step``.
    """

    _MODEL_WIDE = ("d0", "growth_rate", "gradient_bound", "slice_p")
    _X0_SCALE = "norm"  # d is an L2 distance: the start is d0_rel ||x_0||
    SLICED_KEYS = frozenset({"s"})
    _SCALE_SLICED_SUMS = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        d0: float = 1e-6,
        d0_rel: float = 1e-2,
        growth_rate: float = float("inf"),
        d_groups: str = "model",
        gradient_bound: str = "max",
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
            "momentum": momentum,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "d0": check_positive("d0", d0),
            "d0_rel": d0_rel,
            "growth_rate": check_growth_rate(growth_rate),
            "d_groups": d_groups,
            "gradient_bound": check_choice("gradient_bound", gradient_bound, ("max", "first")),
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

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_in_range("momentum", group["momentum"], 0.0, 1.0)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
        check_choice("gradient_bound", group["gradient_bound"], ("max", "first"))

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["s"] = self._stat_zeros(param)

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        s = local_view(state["s"]).to(compute_dtype(state["s"].dtype))
        k = self._slice_p()
        return {"s_sq": (s * s).sum() * k if k > 1 else (s * s).sum()}

    @staticmethod
    def _inverse(bound_sq: torch.Tensor) -> torch.Tensor:
        """``1 / G`` (0 while no gradient has been seen, and for a NaN bound)."""
        return torch.where(bound_sq > 0, bound_sq.rsqrt(), 0.0)

    def _bound_sq(self, stats: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """``G_k^2`` of this step: the largest ``||g||^2`` so far, this step's included
        (``"max"``), or the first nonzero one (``"first"``). Gradients of groups with lr = 0 do
        not count (a warm-up from lr = 0 and frozen groups are skipped over)."""
        old = self._global("grad_bound_sq", device)
        new = stats["grad_sq"].to(old.dtype)
        if self.param_groups[0]["gradient_bound"] == "first":
            return torch.where(old > 0, old, new)
        return torch.maximum(old, new)

    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        # ||s_k + lambda g'||^2 with lambda of the bound known before this step; _finish corrects
        # it when this step raises the bound (and on the first step, where s_k = 0).
        lam = d * self._inverse(self._global("grad_bound_sq", d.device)) * gb.group["lr"]
        coupled, _ = _weight_decay_scalars(gb.group, lam)
        return _SGD_STATISTICS, [coupled, lam], _flags(gb.group)

    def _combine_statistics(
        self,
        batch: StepBatch,
        per_group: list[dict[str, torch.Tensor]],
        d: torch.Tensor,
        step: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        dtype = self._scalar_dtype()
        lrs = [gb.group["lr"] for gb in batch.groups]
        pairs = list(zip(per_group, lrs, strict=True))
        return {
            # sum lr <g', s_k> (the numerator's term is lambda_k times it, lambda_k / lr = d / G)
            "dot_lr": batch.sum_on_device(pg["dot"] * lr for pg, lr in pairs).to(dtype),
            "s_sq": batch.sum_on_device(pg["s_sq"] for pg, _ in pairs).to(dtype),
            "gg_lr2": batch.sum_on_device(pg["gg"] * lr * lr for pg, lr in pairs).to(dtype),
            **self._guard_statistics(batch, [pg["g_sq"] for pg in per_group]),
        }

    def _guard_statistics(
        self, batch: StepBatch, g_sq: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """For the gradient bound: the raw ``||g||^2`` of the groups with lr > 0."""
        lrs = [gb.group["lr"] for gb in batch.groups]
        grad_sq = batch.sum_on_device(v for v, lr in zip(g_sq, lrs, strict=True) if lr > 0)
        return {"grad_sq": grad_sq.to(self._scalar_dtype())}

    def _update_pass(
        self,
        gb: GroupBatch,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        # lambda = d lr / G_k: 0 until a gradient was nonzero, and on a skipped step.
        inverse = self._inverse(self._bound_sq(stats, d.device))
        lam = d * torch.where(ok, inverse, 0.0) * group["lr"]
        scalars = [ok, lam, *_weight_decay_scalars(group, lam)]
        if group["momentum"] == 0:
            return _SGD_UPDATE, scalars, _flags(group)
        for p, st in zip(gb.originals, gb.states, strict=True):
            if "z" not in st:  # momentum switched on after the first step: start z at x
                x = torch.view_as_real(p) if p.is_complex() else p
                st["z"] = x.detach().clone(memory_format=torch.contiguous_format)
        average = ok.to(lam.dtype) * (1.0 - group["momentum"])
        return _SGD_MOMENTUM_UPDATE, [*scalars, average], _flags(group)

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        growth = self.param_groups[0]["growth_rate"]
        numerator = self._global("numerator", d.device)
        before = self._inverse(self._global("grad_bound_sq", d.device))
        bound_sq = self._bound_sq(stats, d.device)
        after = self._inverse(bound_sq)
        new_s_sq = stats["s_sq"]
        if not self._fused_step:
            # ||s_k + lambda' g||^2 from ||s_k + lambda g||^2, lambda' - lambda = d lr (1/G' - 1/G)
            # (0 when the bound did not change: the same number as before)
            change = d * (after - before)
            new_s_sq = (
                new_s_sq
                + d * d * (after * after - before * before) * stats["gg_lr2"]
                + 2.0 * change * stats["dot_lr"]
            )
        new_numerator = numerator + d * after * stats["dot_lr"]
        d_hat = 2.0 * new_numerator / new_s_sq.sqrt()
        valid = ok & (new_s_sq > 0)
        d.copy_(_d_update(d, d_hat, valid, growth))
        self._store_unless_skipped(
            ok, numerator=new_numerator, s_sq=new_s_sq, grad_bound_sq=bound_sq
        )

    def stats(self) -> dict[str, float]:
        out = super().stats()
        bound_sq = self._global_float("grad_bound_sq")
        bound = math.sqrt(bound_sq) if bound_sq > 0 else 0.0
        out["grad_bound"] = bound
        out["d_lr"] = out["d"] * out["lr"] / bound if bound > 0 else 0.0
        out["numerator"] = self._global_float("numerator")
        out["s_norm"] = math.sqrt(max(self._global_float("s_sq"), 0.0))
        return out


# ====================================================================== Adam
