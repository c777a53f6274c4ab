"""HyperSGD: SGD (with momentum) under a hypergradient tower."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .. import _native
from ..base import (
    bucket_by_device_and_dtype,
)
from ..kernels import (
    FUSED_SGD_CPU_DTYPES,
    AutoOrder,
)
from ..validation import (
    check_bool,
    check_in_range,
    check_nonnegative,
)
from .kernels import (
    _fused_ok,
    _fused_step_args,
    _sgd_update,
    _stored_dots,
    _update_each,
)
from .tower import HypergradientOptimizer


# ---------------------------------------------------------------------- SGD
class HyperSGD(HypergradientOptimizer):
    r"""SGD (with momentum) whose step size, and optionally momentum, are learned online by
    hypergradient descent, with a tower of ``height`` hyperoptimizers on top.

    Base update (torch's SGD, dampening 0, coupled weight decay)::

        buf = momentum * buf + (g + weight_decay * x);     x -= alpha * s * buf

    with ``s = group["lr"] / lr`` the schedule multiplier (1 without a schedule).

    Args:
        params: parameters or param groups.
        lr: initial step size ``alpha`` (the registry's recommended value; see its entry for how
            it was chosen). With ``"lr"`` learned, a schedule on ``group["lr"]`` multiplies it.
        momentum: momentum coefficient (default 0.9); learned if ``"momentum"`` is in ``learn``
            (then it must be in (0, 1)).
        weight_decay: L2 penalty added to the gradient (torch's SGD).
        maximize: maximize the objective.
        learn: the hyperparameters learned: ``"lr"`` (default), ``"momentum"``, or both
            (``"lr+momentum"`` or a sequence).
        height: number of hyperoptimizer levels (default 2): 1 learns the hyperparameters with a
            fixed hyper step size ``hyper_lr[0]``; each extra level learns the step size of the
            level below. 0 is plain SGD.
        hyper_optimizer: ``"adam"`` (default) or ``"sgd"`` for every level, or one per level
            (``"adam/sgd"``, level 1 first).
        hyper_lr: initial step size of each hyperoptimizer level (one number for all levels, or
            one per level, level 1 first); the top level's stays fixed. Default: 0.05 for level
            1 and 0.02 above (``DEFAULT_HYPER_LR``, measured). With the ``"log"``
            parametrisation and Adam hyperoptimizers it is about the largest per-step change of
            ``log(alpha)``: scale-free. SGD hyperoptimizers work in units of their hypergradient
            and need an explicit value.
        hyper_betas, hyper_eps: betas (default ``(0.9, 0.99)``, measured) and eps of the Adam
            hyperoptimizers.
        lr_parametrization: ``"log"`` (default), ``"square"`` or ``"identity"``; see the module
            docstring.
        per_group: learn one set of hyperparameters per param group (default: one set for the
            whole model, whatever the groups).
        per_tensor: learn one step size per parameter tensor (its own tower: each tensor's
            hypergradient is its own dot ``<g, du/dh>``), starting at its group's ``lr``; the
            step size only (``learn="lr"``), and not with ``per_group``. Each tensor's update is
            then its own kernel call. Under DeepSpeed ZeRO the optimizer sees one flat tensor
            per group, so it is one step size per group there.
        implementation: ``"auto"``, ``"native"``, ``"compiled"``, ``"foreach"`` or ``"loop"``
            (:mod:`hf_tuningfree.optim.kernels`). ``"native"`` (and ``"auto"`` on CPU) runs both
            passes of the step as C loops over all tensors (:mod:`hf_tuningfree.optim._native`,
            built once per machine with the system C compiler; fp32/fp64). ``"foreach"`` (and
            ``"auto"`` where the C loops do not run) uses torch's fused multi-tensor SGD kernel
            for the update when the momentum is fixed and non-zero; the hypergradient's dot
            products have no foreach form and run per tensor.
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    Per-parameter state: ``momentum_buffer`` (with ``momentum=0`` it holds the last gradient,
    the last update direction), plus ``momentum_buffer_prev`` when the momentum is learned.
    """

    PATHS = ("native", "compiled", "foreach", "loop")
    #: C, then torch's fused kernel for the update (fp32/fp64 on CPU), then compiled, the loop
    AUTO_ORDER = AutoOrder(
        cpu=("native", "foreach", "compiled", "loop"), cuda=("foreach", "compiled", "loop")
    )
    LEARNABLE = ("lr", "momentum")
    SQUASHED = frozenset({"momentum"})
    STORED_DERIVATIVES = (("lr", "momentum_buffer"), ("momentum", "momentum_buffer_prev"))

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        learn: str | tuple[str, ...] = "lr",
        height: int = 2,
        hyper_optimizer: str | tuple[str, ...] = "adam",
        hyper_lr: float | tuple[float, ...] | None = None,
        hyper_betas: tuple[float, float] = (0.9, 0.99),
        hyper_eps: float = 1e-16,
        lr_parametrization: str = "log",
        per_group: bool = False,
        per_tensor: bool = False,
        implementation: str = "auto",
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": check_nonnegative("lr", lr),
            "momentum": check_in_range("momentum", momentum, 0.0, 1.0),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
            "maximize": check_bool("maximize", maximize),
            "implementation": implementation,
        }
        super().__init__(
            params,
            defaults,
            learn=learn,
            height=height,
            hyper_optimizer=hyper_optimizer,
            hyper_lr=hyper_lr,
            hyper_betas=hyper_betas,
            hyper_eps=hyper_eps,
            lr_parametrization=lr_parametrization,
            per_group=per_group,
            per_tensor=per_tensor,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if "momentum" in self.learn:
            state["momentum_buffer_prev"] = torch.zeros_like(
                param, memory_format=torch.preserve_format
            )

    def _buffers(self, gb: Any) -> list[list[torch.Tensor]]:
        lists = [gb.state_list("momentum_buffer")]
        if "momentum" in self.learn:
            lists.append(gb.state_list("momentum_buffer_prev"))
        return lists

    def _group_dots(self, gb: Any, values: dict[str, torch.Tensor], impl: str) -> list:
        stored = [gb.state_list(k) for k in self._stored_derivatives()]
        fast = gb.group["implementation"] in ("auto", "foreach")
        return _stored_dots(gb, stored, impl, torch_dot=fast)

    def _native_state_keys(self, group: dict[str, Any]) -> list[str]:
        keys = ["momentum_buffer"]
        if "momentum" in self.learn:
            keys.append("momentum_buffer_prev")
        return keys

    def _native_update(
        self,
        gb: Any,
        addrs: list[_native.Addresses],
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        _native.hyper_sgd_update(
            addrs[0],
            addrs[1],
            addrs[2],
            addrs[3] if "momentum" in self.learn else None,
            ok,
            lr=lr,
            momentum=values["momentum"],
            weight_decay=gb.group["weight_decay"],
            maximize=gb.group["maximize"],
        )

    def _group_update(
        self,
        gb: Any,
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
        impl: str,
    ) -> None:
        group = gb.group
        learn_momentum = "momentum" in self.learn
        static = {
            "weight_decay": group["weight_decay"],
            "maximize": group["maximize"],
            "learn_momentum": learn_momentum,
        }
        lists = [gb.params, gb.grads, *self._buffers(gb)]
        for (device, dtype), (bucket, _) in bucket_by_device_and_dtype(lists).items():
            ok_d = ok.to(device)
            lr_d = lr.to(device)
            fused = partial(
                _fused_ok, bucket, ("param", "grad", "momentum_buffer"), FUSED_SGD_CPU_DTYPES
            )
            if (
                not learn_momentum
                and group["momentum"] > 0.0
                and self._fused_form(group, bucket, fused)
            ):
                torch._fused_sgd_(
                    bucket[0],
                    bucket[1],
                    bucket[2],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    dampening=0.0,
                    nesterov=False,
                    maximize=group["maximize"],
                    is_first_step=False,
                    **_fused_step_args(lr_d, ok_d, dtype),
                )
                continue
            mu = values["momentum"].to(device)
            _update_each(_sgd_update, impl, bucket, ok_d, lr_d, mu, **static)
