"""D-Adaptation: SGD, Adam and AdaGrad whose step size is learned from the run itself.

Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023 (arXiv:2301.07733).

Every variant keeps ONE scalar ``d`` for the whole model: a lower bound on the distance
``D = ||x0 - x*||`` from the initial point to a solution, which starts at ``d0`` and never
decreases. It is read off a weighted sum of past gradients ``s``::

    d_hat = <weighted sum of lambda_i <g_i, s_i>> / ||s||      (a lower bound on D, convex case)
    d     = max(d, min(d_hat, growth_rate * d))

and the step is ``d * lr`` (``lr`` is a multiplier, default 1.0, that schedules and warm-up act
on). The three variants differ in the weighting and the norm; the class docstrings state each
rule as math.

How a step runs (see :mod:`hf_tuningfree.optim.base` for the phases)::

    phase 1  (before any state changes; the base's stacked all-reduce): the non-finite guard and,
             for SGD, ``||g||^2`` for the scale ``||g_0||`` of its first step.
    update   one pass over each tensor (``loop``: eager, ``compiled``: one fused kernel per tensor)
             updates the state and the parameters with this step's ``d`` AND returns this tensor's
             contributions to the model-wide sums that define the NEXT ``d``: the numerator terms
             and the norm of the UPDATED ``s``.
    phase 2  (after the update; ``_reduce_after_update``): those sums, stacked, ONE all-reduce when
             the parameters are sharded (FSDP2 / FSDP1 / ``global_reduce``), none under DDP or in
             one process; then ``d`` is updated. Every rank reaches this collective, also one
             whose shard received no gradient.

So a sharded step makes two collectives of a few scalars each; a DDP or single-process step none.
Nothing in ``step()`` reads a device value on the host: ``d``, the numerator and the step counter
are 0-dim tensors in ``self.global_state`` (saved with the optimizer's state dict).

Hyperparameters that define the model-wide estimate (``d0``, ``growth_rate``, ``betas`` of the
Adam variants' ``s``, ...) must be equal in every param group (checked); ``lr``, weight decay,
``eps``, momentum and ``maximize`` may differ per group. A group's ``lr`` scales both its step and
its contribution to the estimate, so ``lr = 0`` freezes a group and keeps it out of ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .base import (
    GroupBatch,
    StepBatch,
    TuningFreeOptimizer,
    bucket_by_device_and_dtype,
    compute_dtype,
)
from .distributed import local_view, plan_reduction
from .kernels import IMPLEMENTATIONS, CompiledKernel, order_for_compile, resolve_implementation
from .validation import (
    check_betas,
    check_bool,
    check_choice,
    check_in_range,
    check_nonnegative,
    check_positive,
)

__all__ = [
    "DAdaptAdaGrad",
    "DAdaptAdam",
    "DAdaptSGD",
    "DAdaptationBase",
    "dadapt_adagrad_tensor_update",
    "dadapt_adam_tensor_update",
    "dadapt_sgd_tensor_update",
]


def check_growth_rate(value: object) -> float:
    """``growth_rate`` is a factor >= 1 (``inf``: unrestricted)."""
    v = check_positive("growth_rate", value, allow_inf=True)
    if v < 1.0:
        raise ValueError(
            f"Invalid growth_rate: {value!r}; allowed: a number >= 1 (inf for no limit): d may "
            "only grow"
        )
    return v


class DAdaptationBase(TuningFreeOptimizer):
    """What the D-Adaptation family (and Prodigy) share: the model-wide ``d`` and step counter in
    ``global_state``, per-tensor kernels that return partial sums, the after-update reduction,
    and the checks that model-wide hyperparameters agree across groups.

    A subclass sets ``_MODEL_WIDE`` (group keys that must agree), ``_SUMS`` (names of the partial
    sums its kernel returns, in order) and implements ``_kernel``, ``_tensors``,
    ``_group_scalars`` and ``_finish``; optionally ``_step_scalars`` and ``_local_statistics``.
    """

    _MODEL_WIDE: tuple[str, ...] = ("d0", "growth_rate")
    _SUMS: tuple[str, ...] = ()

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; model-wide hyperparameters must equal the first group's, per-group ones
        are validated like the constructor's."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(merged)
        if self.param_groups:
            first = self.param_groups[0]
            for key in self._MODEL_WIDE:
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
        check_choice("implementation", group["implementation"], IMPLEMENTATIONS)

    # ------------------------------------------------------------------ subclass hooks
    def _kernel(self, group: dict[str, Any]) -> tuple[Callable[..., Any], CompiledKernel]:
        """(eager per-tensor function, its compiled wrapper) for ``group``."""
        raise NotImplementedError

    def _tensors(self, gb: GroupBatch) -> list[list[torch.Tensor]]:
        """Parallel tensor lists in kernel order: params, grads, then state tensors."""
        raise NotImplementedError

    def _step_scalars(
        self,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Model-wide 0-dim scalars of this step (bias correction, ...), from ``d`` before it
        is updated."""
        return {}

    def _group_scalars(
        self, group: dict[str, Any], d: torch.Tensor, scalars: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """0-dim tensors passed to the kernel after ``ok`` for every tensor of ``group``."""
        raise NotImplementedError

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        """Python constants of the kernel (each combination compiles once)."""
        raise NotImplementedError

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Contributions to the after-update sums of a parameter that has state but no gradient
        this step (its ``s`` is unchanged and still part of the model's ``||s||``)."""
        return {}

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

    def _finish(
        self,
        sums: dict[str, torch.Tensor],
        ok: torch.Tensor,
        d: torch.Tensor,
        scalars: dict[str, torch.Tensor],
    ) -> None:
        """Update ``d`` and the other global scalars from the reduced phase-2 ``sums``; every
        write must be a no-op where ``ok`` is False."""
        raise NotImplementedError

    # ------------------------------------------------------------------ machinery
    def _global(self, name: str, device: torch.device, value: float = 0.0) -> torch.Tensor:
        dtype = self._stat_dtype()
        return self.global_tensor(
            name, device, lambda dev: torch.full((), value, dtype=dtype, device=dev)
        )

    def _reduce_after_update(
        self, local: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Phase 2: this step's after-update sums as global sums. Same rule as the base's
        phase 1 (``distributed.plan_reduction``): stacked into one tensor, one all-reduce when
        parameters are sharded, nothing under DDP or in one process."""
        plan = plan_reduction(
            (p for g in self.param_groups for p in g["params"]), self.global_reduce
        )
        return self._reduce(local, plan, device)

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        device = batch.device
        group0 = self.param_groups[0]
        d = self._global("d", device, group0["d0"])
        step = self._global("step", device)
        scalars = self._step_scalars(d, step, stats, ok)
        partial: dict[str, list[torch.Tensor]] = {name: [] for name in self._SUMS}
        for gb in batch.groups:
            if not gb.params:
                continue
            group = gb.group
            eager, compiled = self._kernel(group)
            static = self._static(group)
            group_scalars = self._group_scalars(group, d, scalars)
            lists = self._tensors(gb)
            for (dev, dtype), (bucket, _) in bucket_by_device_and_dtype(lists).items():
                numel = sum(p.numel() for p in bucket[0])
                impl = resolve_implementation(group["implementation"], dev, numel)
                cdt = compute_dtype(dtype)
                args = [ok.to(dev), *(s.to(dev, cdt) for s in group_scalars)]
                if impl == "compiled":
                    order = order_for_compile(compiled, [p.numel() for p in bucket[0]])
                    for i in order:
                        out = compiled([t[i] for t in bucket], *args, **static)
                        for name, value in zip(self._SUMS, out, strict=True):
                            partial[name].append(value)
                else:  # "loop"; "foreach" also runs here (the kernels end in reductions)
                    for tensors in zip(*bucket, strict=True):
                        out = eager(*tensors, *args, **static)
                        for name, value in zip(self._SUMS, out, strict=True):
                            partial[name].append(value)
        for name, values in self._idle_sums(batch).items():
            partial[name].extend(values)
        dtype = self._stat_dtype()
        local = {name: batch.sum_on_device(values).to(dtype) for name, values in partial.items()}
        sums = self._reduce_after_update(local, device)
        self._finish(sums, ok, d, scalars)
        step.add_(ok.to(step.dtype))

    # ------------------------------------------------------------------ logging
    def _global_float(self, name: str, default: float = 0.0) -> float:
        t = self.global_state.get(name)
        return float(t) if t is not None else default

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out["d"] = self._global_float("d", self.param_groups[0]["d0"])
        out["step"] = self._global_float("step")
        out["lr"] = max((g["lr"] for g in self.param_groups), default=0.0)
        return out


def _prepare_grad(
    grad: torch.Tensor,
    param: torch.Tensor,
    ok: torch.Tensor,
    coupled_wd: torch.Tensor,
    *,
    maximize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient in the compute dtype with the coupled (L2) weight-decay term added, zero on a
    skipped step so its NaN/Inf never reaches the state; parameter in the compute dtype)."""
    cdt = compute_dtype(param.dtype)
    g = grad.to(cdt)
    if maximize:
        g = -g
    p = param.to(cdt)
    return torch.where(ok, g + coupled_wd * p, 0.0), p


def _d_update(
    d: torch.Tensor, d_hat: torch.Tensor, valid: torch.Tensor, growth_rate: float
) -> torch.Tensor:
    """``max(d, min(d_hat, growth_rate * d))`` where ``valid``, else ``d`` (no host read)."""
    capped = d_hat if math.isinf(growth_rate) else torch.minimum(d_hat, d * growth_rate)
    return torch.where(valid, torch.maximum(d, capped), d)


# ====================================================================== SGD
def dadapt_sgd_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    lam: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    *,
    maximize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor of D-Adapted SGD without momentum, in place (``x = z``).

    ``lam`` is this group's ``lambda_k = d_k * lr / ||g_0||`` (0 on a skipped step), ``decay``
    the decoupled factor ``lambda_k * weight_decay``. Returns ``(lam * <g, s_k>, ||s_{k+1}||^2)``.
    """
    g, p = _prepare_grad(grad, param, ok, coupled_wd, maximize=maximize)
    s_old = s.to(g.dtype)
    dot = (g * s_old).sum() * lam
    s_new = s_old + lam * g
    p = p - decay * p - lam * g
    param.copy_(p)
    s.copy_(s_new)
    return dot, (s_new * s_new).sum()


def dadapt_sgd_momentum_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    ok: torch.Tensor,
    lam: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    *,
    momentum: float,
    maximize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor of D-Adapted SGD with (primal-averaging) momentum, in place:
    ``z -= lam * g``, ``x = momentum * x + (1 - momentum) * z``."""
    g, p = _prepare_grad(grad, param, ok, coupled_wd, maximize=maximize)
    s_old = s.to(g.dtype)
    dot = (g * s_old).sum() * lam
    s_new = s_old + lam * g
    zz = z.to(g.dtype)
    zz = zz - decay * zz - lam * g
    p = torch.where(ok, p + (1.0 - momentum) * (zz - p), p)
    param.copy_(p)
    s.copy_(s_new)
    z.copy_(zz)
    return dot, (s_new * s_new).sum()


_compiled_sgd = CompiledKernel(dadapt_sgd_tensor_update, "DAdaptSGD")
_compiled_sgd_momentum = CompiledKernel(dadapt_sgd_momentum_tensor_update, "DAdaptSGD")


class DAdaptSGD(DAdaptationBase):
    r"""SGD with D-Adaptation (Defazio & Mishchenko, ICML 2023), the form of the authors'
    ``dadaptation`` package: a dual-averaging gradient sum ``s`` and primal-averaging momentum.

    With ``gamma`` the group's ``lr`` and ``g_0`` the first nonzero gradient (over the groups
    with ``lr > 0``; without the weight-decay term, as the authors)::

        lambda_k  = d_k * gamma / ||g_0||
        N_{k+1}   = N_k + lambda_k <g_k, s_k>                   (summed over all groups)
        s_{k+1}   = s_k + lambda_k g_k
        z_{k+1}   = z_k - lambda_k g_k                           (z_0 = x_0)
        x_{k+1}   = beta x_k + (1 - beta) z_{k+1}                (beta = momentum; 0: x = z)
        d_hat     = 2 N_{k+1} / ||s_{k+1}||_2
        d_{k+1}   = max(d_k, min(d_hat, growth_rate * d_k))

    ``d`` is a lower bound on ``||x_0 - x*||`` for convex problems (the paper's Theorem); the
    step of the first iteration is ``d0 * lr``. ``stats()["d_lr"]`` is ``d * lr / ||g_0||``.

    Args:
        params: parameters or param groups.
        lr: multiplier of the adapted step (default 1.0; schedules act on it).
        momentum: primal-averaging momentum ``beta`` in [0, 1) (default 0.0, the authors').
            The paper's deep-learning runs used 0.9.
        weight_decay: weight decay coefficient (default 0).
        decoupled_weight_decay: False (default, the authors'): L2 term ``wd * x`` added to the
            gradient (it then enters ``s`` and ``d``); True: ``z -= lambda_k * wd * z`` (SGDW
            style; ``x`` itself without momentum), kept out of ``s`` and ``d``.
        d0: initial lower bound on the distance to the solution (default 1e-6).
        growth_rate: ``d`` grows by at most this factor per step (default inf).
        maximize: maximize the objective.
        implementation: ``"auto"``, ``"loop"`` or ``"compiled"`` (see
            :mod:`hf_tuningfree.optim.kernels`); ``"foreach"`` runs the per-tensor loop.
        skip_nonfinite, global_reduce: see :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``s`` (and ``z`` when ``momentum > 0``); model-wide in
    ``global_state``: ``d``, ``numerator`` (``N``), ``g0_sq`` (``||g_0||^2``), ``s_sq``
    (``||s||^2``), ``step``.
    """

    _MODEL_WIDE = ("d0", "growth_rate")
    _SUMS = ("numerator", "s_sq")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        d0: float = 1e-6,
        growth_rate: float = float("inf"),
        maximize: bool = False,
        implementation: str = "auto",
        *,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "d0": check_positive("d0", d0),
            "growth_rate": check_growth_rate(growth_rate),
            "maximize": maximize,
            "implementation": implementation,
        }
        super().__init__(
            params, defaults, skip_nonfinite=skip_nonfinite, global_reduce=global_reduce
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_in_range("momentum", group["momentum"], 0.0, 1.0)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["s"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _local_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        # Phase 1: ||g||^2 over groups with lr > 0, latched into ||g_0||^2 at the first step
        # where it is nonzero (norms come from the non-finite guard's cache).
        squares = [
            n * n
            for gb, norms in zip(batch.groups, batch.grad_norms(), strict=True)
            if gb.group["lr"] > 0
            for n in norms
        ]
        return {"grad_sq": batch.sum_on_device(squares).to(self._stat_dtype())}

    def _step_scalars(
        self,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        g0_sq = self._global("g0_sq", d.device)
        latched = torch.where(g0_sq > 0, g0_sq, stats["grad_sq"].to(g0_sq.dtype))
        # lambda / lr = d / ||g_0||: 0 while no gradient was ever nonzero, and on a skipped step
        # (so that s, z and x stay bit-identical).
        inv_g0 = torch.where(ok & (latched > 0), latched.rsqrt(), 0.0)
        return {"g0_sq_new": latched, "d_over_g0": d * inv_g0}

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        s = local_view(state["s"]).to(compute_dtype(state["s"].dtype))
        return {"s_sq": (s * s).sum()}

    def _kernel(self, group: dict[str, Any]) -> tuple[Callable[..., Any], CompiledKernel]:
        if group["momentum"] > 0:
            return dadapt_sgd_momentum_tensor_update, _compiled_sgd_momentum
        return dadapt_sgd_tensor_update, _compiled_sgd

    def _tensors(self, gb: GroupBatch) -> list[list[torch.Tensor]]:
        lists = [gb.params, gb.grads, gb.state_list("s")]
        if gb.group["momentum"] > 0:
            for p, st in zip(gb.originals, gb.states, strict=True):
                if "z" not in st:  # momentum switched on after the first step: start z at x
                    st["z"] = p.detach().clone(memory_format=torch.preserve_format)
            lists.append(gb.state_list("z"))
        return lists

    def _group_scalars(
        self, group: dict[str, Any], d: torch.Tensor, scalars: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        lam = scalars["d_over_g0"] * group["lr"]
        wd = group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        coupled = torch.full((), 0.0 if decoupled else wd, dtype=lam.dtype, device=lam.device)
        return [lam, coupled, lam * (wd if decoupled else 0.0)]

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        static: dict[str, Any] = {"maximize": group["maximize"]}
        if group["momentum"] > 0:
            static["momentum"] = group["momentum"]
        return static

    def _finish(
        self,
        sums: dict[str, torch.Tensor],
        ok: torch.Tensor,
        d: torch.Tensor,
        scalars: dict[str, torch.Tensor],
    ) -> None:
        growth = self.param_groups[0]["growth_rate"]
        numerator = self._global("numerator", d.device)
        s_sq = self._global("s_sq", d.device)
        g0_sq = self._global("g0_sq", d.device)
        new_numerator = numerator + sums["numerator"]
        d_hat = 2.0 * new_numerator / sums["s_sq"].sqrt()
        valid = ok & (sums["s_sq"] > 0)
        d.copy_(_d_update(d, d_hat, valid, growth))
        numerator.copy_(torch.where(ok, new_numerator, numerator))
        s_sq.copy_(torch.where(ok, sums["s_sq"], s_sq))
        g0_sq.copy_(torch.where(ok, scalars["g0_sq_new"], g0_sq))

    def stats(self) -> dict[str, float]:
        out = super().stats()
        g0_sq = self._global_float("g0_sq")
        g0 = math.sqrt(g0_sq) if g0_sq > 0 else 0.0
        out["g0_norm"] = g0
        out["d_lr"] = out["d"] * out["lr"] / g0 if g0 > 0 else 0.0
        out["numerator"] = self._global_float("numerator")
        out["s_norm"] = math.sqrt(max(self._global_float("s_sq"), 0.0))
        return out


# ====================================================================== Adam
def dadapt_adam_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    dlr: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor of D-Adapted Adam, in place.

    ``dlr`` is this group's ``d_k * lr * bias_correction`` (0 on a skipped step), ``decay`` the
    decoupled factor ``dlr * weight_decay``. Returns this tensor's ``dlr * <g, s_k / (sqrt(v_k) +
    eps)>`` (with the second moment BEFORE this step's update, as the published code) and
    ``||s_{k+1}||_1``.
    """
    g, p = _prepare_grad(grad, param, ok, coupled_wd, maximize=maximize)
    okf = ok.to(g.dtype)
    m = exp_avg.to(g.dtype)
    v = exp_avg_sq.to(g.dtype)
    s_old = s.to(g.dtype)
    numerator = (g * s_old / (v.sqrt() + eps)).sum() * dlr
    dg = dlr * g
    m = m + (okf * (1.0 - beta1)) * (dg - m)
    v = v + (okf * (1.0 - beta2)) * (g * g - v)
    s_new = s_old + (okf * (1.0 - math.sqrt(beta2))) * (dg - s_old)
    p = p - decay * p - okf * (m / (v.sqrt() + eps))
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    s.copy_(s_new)
    return numerator, s_new.abs().sum()


_compiled_adam = CompiledKernel(dadapt_adam_tensor_update, "DAdaptAdam")


def adam_bias_correction(step: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """Adam's ``sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))`` for a 0-dim step count ``k``."""
    k1 = step + 1.0
    return torch.sqrt(1.0 - torch.pow(beta2, k1)) / (1.0 - torch.pow(beta1, k1))


class DAdaptAdam(DAdaptationBase):
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
        lr: multiplier of the adapted step (default 1.0; schedules act on it).
        betas: ``(beta1, beta2)`` (default ``(0.9, 0.999)``, the paper's).
        eps: added to ``sqrt(v)`` (default 1e-8).
        weight_decay: weight decay coefficient (default 0).
        decoupled_weight_decay: True (default): AdamW-style ``x -= dlr * wd * x``, what users of
            AdamW and the Trainer expect; False: ``wd * x`` added to the gradient (the authors'
            default, ``decouple=False``).
        use_bias_correction: see above (default True).
        d0: initial lower bound on the distance to the solution (default 1e-6).
        growth_rate: ``d`` grows by at most this factor per step (default inf).
        maximize: maximize the objective.
        implementation: ``"auto"``, ``"loop"`` or ``"compiled"``; ``"foreach"`` runs the loop.
        skip_nonfinite, global_reduce: see :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``exp_avg`` (m), ``exp_avg_sq`` (v), ``s``; model-wide ``d``,
    ``numerator`` (r), ``s_l1``, ``step``.
    """

    _MODEL_WIDE = ("d0", "growth_rate", "betas", "use_bias_correction")
    _SUMS = ("numerator", "s_l1")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        use_bias_correction: bool = True,
        d0: float = 1e-6,
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
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "use_bias_correction": check_bool("use_bias_correction", use_bias_correction),
            "d0": check_positive("d0", d0),
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
        # 0 on a skipped step: no parameter, moment or s changes.
        return {"d_bc": torch.where(ok, d * self._bias_correction(step), 0.0)}

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"s_l1": local_view(state["s"]).to(compute_dtype(state["s"].dtype)).abs().sum()}

    def _kernel(self, group: dict[str, Any]) -> tuple[Callable[..., Any], CompiledKernel]:
        return dadapt_adam_tensor_update, _compiled_adam

    def _tensors(self, gb: GroupBatch) -> list[list[torch.Tensor]]:
        return [gb.params, gb.grads, *(gb.state_list(k) for k in ("exp_avg", "exp_avg_sq", "s"))]

    def _group_scalars(
        self, group: dict[str, Any], d: torch.Tensor, scalars: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        dlr = scalars["d_bc"] * group["lr"]
        wd = group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        coupled = torch.full((), 0.0 if decoupled else wd, dtype=dlr.dtype, device=dlr.device)
        return [dlr, coupled, dlr * (wd if decoupled else 0.0)]

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "maximize": group["maximize"]}

    def _finish(
        self,
        sums: dict[str, torch.Tensor],
        ok: torch.Tensor,
        d: torch.Tensor,
        scalars: dict[str, torch.Tensor],
    ) -> None:
        group = self.param_groups[0]
        beta3 = math.sqrt(group["betas"][1])
        numerator = self._global("numerator", d.device)
        s_l1 = self._global("s_l1", d.device)
        new_numerator = beta3 * numerator + (1.0 - beta3) * sums["numerator"]
        d_hat = new_numerator / ((1.0 - beta3) * sums["s_l1"])
        valid = ok & (sums["s_l1"] > 0)
        d.copy_(_d_update(d, d_hat, valid, group["growth_rate"]))
        numerator.copy_(torch.where(ok, new_numerator, numerator))
        s_l1.copy_(torch.where(ok, sums["s_l1"], s_l1))

    def stats(self) -> dict[str, float]:
        out = super().stats()
        device = self.global_state["d"].device if "d" in self.global_state else None
        step = torch.tensor(out["step"], dtype=torch.float64, device=device)
        bc = float(self._bias_correction(step))
        out["bias_correction"] = bc
        out["d_lr"] = out["d"] * out["lr"] * bc
        out["numerator"] = self._global_float("numerator")
        out["s_l1"] = self._global_float("s_l1")
        beta3 = math.sqrt(self.param_groups[0]["betas"][1])
        denom = (1.0 - beta3) * out["s_l1"]
        out["d_hat"] = out["numerator"] / denom if denom > 0 else 0.0
        return out


# ====================================================================== AdaGrad
def dadapt_adagrad_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    alpha: torch.Tensor,
    s: torch.Tensor,
    x0: torch.Tensor,
    ok: torch.Tensor,
    dlr: torch.Tensor,
    coupled_wd: torch.Tensor,
    *,
    eps: float,
    momentum: float,
    maximize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor of D-Adapted AdaGrad, in place.

    ``dlr`` is ``d_k * lr`` (0 on a skipped step). Returns the changes this step makes to the
    model-wide ``sum s^2 / w - sum_i dlr_i^2 g_i^2 / w_{i+1}`` (the numerator; ``w = sqrt(alpha)
    + eps``) and to ``||s||_1``. Written as changes, a tensor that gets no gradient this step
    keeps its earlier contribution without being read; the numerator change is formed as
    ``(s_k^2 + 2 dlr g s_k) / w_{k+1} - s_k^2 / w_k`` so the ``dlr^2 g^2`` terms cancel exactly.
    """
    g, p = _prepare_grad(grad, param, ok, coupled_wd, maximize=maximize)
    a_old = alpha.to(g.dtype)
    s_old = s.to(g.dtype)
    w_old = a_old.sqrt() + eps
    a_new = a_old + g * g
    w_new = a_new.sqrt() + eps
    dg = dlr * g
    s_new = s_old + dg
    s_sq = s_old * s_old
    numerator = ((s_sq + 2.0 * dg * s_old) / w_new - s_sq / w_old).sum()
    l1 = (s_new.abs() - s_old.abs()).sum()
    z = x0.to(g.dtype) - s_new / w_new
    x = z if momentum == 0.0 else p + (1.0 - momentum) * (z - p)
    param.copy_(torch.where(ok, x, p))
    alpha.copy_(a_new)
    s.copy_(s_new)
    return numerator, l1


_compiled_adagrad = CompiledKernel(dadapt_adagrad_tensor_update, "DAdaptAdaGrad")


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
    estimate adapts more slowly in practice. Weight decay is coupled only (``wd * x`` added to the
    gradient, as the authors): ``x`` is recomputed from ``x_0`` every step, so a decoupled decay
    of ``x`` would be undone at the next step.

    Args:
        params: parameters or param groups.
        lr: multiplier of the adapted step (default 1.0).
        momentum: primal-averaging momentum in [0, 1) (default 0).
        weight_decay: L2 coefficient added to the gradient (default 0).
        eps: added to ``sqrt(alpha)`` (default 1e-6, the authors').
        initial_accumulator_value: ``alpha_0`` (default 1e-6, the authors' fixed value).
        d0, growth_rate, maximize, implementation: as :class:`DAdaptSGD`.
        skip_nonfinite, global_reduce: see :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``alpha``, ``s``, ``x0``; model-wide ``d``, ``numerator`` (N),
    ``s_l1``, ``step``.
    """

    _MODEL_WIDE = ("d0", "growth_rate")
    _SUMS = ("numerator", "s_l1")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-6,
        initial_accumulator_value: float = 1e-6,
        d0: float = 1e-6,
        growth_rate: float = float("inf"),
        maximize: bool = False,
        implementation: str = "auto",
        *,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eps": eps,
            "initial_accumulator_value": initial_accumulator_value,
            "d0": check_positive("d0", d0),
            "growth_rate": check_growth_rate(growth_rate),
            "maximize": maximize,
            "implementation": implementation,
        }
        super().__init__(
            params, defaults, skip_nonfinite=skip_nonfinite, global_reduce=global_reduce
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

    def _step_scalars(
        self,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return {"d_ok": torch.where(ok, d, 0.0)}

    def _kernel(self, group: dict[str, Any]) -> tuple[Callable[..., Any], CompiledKernel]:
        return dadapt_adagrad_tensor_update, _compiled_adagrad

    def _tensors(self, gb: GroupBatch) -> list[list[torch.Tensor]]:
        return [gb.params, gb.grads, *(gb.state_list(k) for k in ("alpha", "s", "x0"))]

    def _group_scalars(
        self, group: dict[str, Any], d: torch.Tensor, scalars: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        dlr = scalars["d_ok"] * group["lr"]
        coupled = torch.full((), group["weight_decay"], dtype=dlr.dtype, device=dlr.device)
        return [dlr, coupled]

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"eps": group["eps"], "momentum": group["momentum"], "maximize": group["maximize"]}

    def _finish(
        self,
        sums: dict[str, torch.Tensor],
        ok: torch.Tensor,
        d: torch.Tensor,
        scalars: dict[str, torch.Tensor],
    ) -> None:
        numerator = self._global("numerator", d.device)
        s_l1 = self._global("s_l1", d.device)
        new_numerator = numerator + sums["numerator"]
        new_l1 = s_l1 + sums["s_l1"]
        d_hat = new_numerator / new_l1
        valid = ok & (new_l1 > 0)
        d.copy_(_d_update(d, d_hat, valid, self.param_groups[0]["growth_rate"]))
        numerator.copy_(torch.where(ok, new_numerator, numerator))
        s_l1.copy_(torch.where(ok, new_l1, s_l1))

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out["d_lr"] = out["d"] * out["lr"]
        out["numerator"] = self._global_float("numerator")
        out["s_l1"] = self._global_float("s_l1")
        out["d_hat"] = out["numerator"] / out["s_l1"] if out["s_l1"] > 0 else 0.0
        return out
