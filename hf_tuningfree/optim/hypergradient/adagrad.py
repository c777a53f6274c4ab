"""HyperAdaGrad: AdaGrad under a hypergradient tower."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .. import _native
from ..base import (
    bucket_by_device_and_dtype,
)
from ..kernels import AutoOrder
from ..validation import (
    check_bool,
    check_nonnegative,
    check_positive,
)
from .kernels import (
    _adagrad_update,
    _update_each,
)
from .tower import HypergradientOptimizer


# ---------------------------------------------------------------------- AdaGrad
class HyperAdaGrad(HypergradientOptimizer):
    r"""AdaGrad whose step size is learned online by hypergradient descent, with a tower of
    ``height`` hyperoptimizers on top.

    Base update (torch's Adagrad without lr decay)::

        G += g^2;     x -= alpha * s * g / (sqrt(G) + eps)

    Args:
        params: parameters or param groups.
        lr: initial step size ``alpha``.
        eps: added to ``sqrt(G)`` (default 1e-10, as torch).
        initial_accumulator_value: starting value of ``G``.
        weight_decay: L2 penalty added to the gradient.
        maximize: maximize the objective.
        learn: ``"lr"`` (the only learnable hyperparameter).
        height, hyper_optimizer, hyper_lr, hyper_betas, hyper_eps, lr_parametrization, per_group,
            per_tensor,
        implementation, skip_nonfinite, global_reduce, stochastic_rounding: as in
            :class:`HyperSGD`.

    Per-parameter state: ``sum`` (G) and ``direction`` (the last ``g / (sqrt(G) + eps)``).
    """

    #: the C loops, the compiled kernels, both passes as foreach ops over a bucket (the update
    #: on TensorLists, the dots as segmented sums: :mod:`~hf_tuningfree.optim.multitensor`)
    #: and the loop
    PATHS = ("native", "compiled", "foreach", "loop")
    #: CUDA: foreach first (O(1) launches per step); not yet timed on a GPU
    AUTO_ORDER = AutoOrder(cuda=("foreach", "compiled", "loop"))
    FOREACH_PASSES = True
    LEARNABLE = ("lr",)
    STORED_DERIVATIVES = (("lr", "direction"),)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
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
            "eps": check_positive("eps", eps),
            "initial_accumulator_value": check_nonnegative(
                "initial_accumulator_value", initial_accumulator_value
            ),
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
        state["sum"] = torch.full_like(
            param, group["initial_accumulator_value"], memory_format=torch.preserve_format
        )
        for key in self._stored_derivatives():
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _native_state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["sum", *self._stored_derivatives()]

    def _native_update(
        self,
        gb: Any,
        addrs: list[_native.Addresses],
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        group = gb.group
        _native.hyper_adagrad_update(
            addrs[0],
            addrs[1],
            addrs[2],
            addrs[3] if "lr" in self.learn else None,
            ok,
            lr=lr,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
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
        lists = [gb.params, gb.grads, gb.state_list("sum")]
        lists += [gb.state_list(k) for k in self._stored_derivatives()]
        static = {
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "maximize": group["maximize"],
            "learn_lr": "lr" in self.learn,
        }
        for (device, _), (bucket, _) in bucket_by_device_and_dtype(lists).items():
            _update_each(_adagrad_update, impl, bucket, ok.to(device), lr.to(device), **static)
