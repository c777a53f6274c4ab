"""HyperAdam: Adam(W) under a hypergradient tower."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from torch.optim.optimizer import ParamsT

from .. import _native
from ..base import (
    bucket_by_device_and_dtype,
    compute_dtype,
    scalar_state,
)
from ..distributed import local_view
from ..kernels import AutoOrder
from ..validation import (
    check_bool,
    check_in_range,
    check_nonnegative,
    check_positive,
)
from .kernels import (
    _ADAM_STREAMS,
    _FOREACH_DTYPES,
    _SMALL_NUMEL,
    _adam_dots,
    _adam_scalars,
    _adam_update,
    _foreach_adam_lr_dots,
    _fused_ok,
    _fused_step_args,
    _run,
    _tensor_order,
)
from .tower import HypergradientOptimizer


# ---------------------------------------------------------------------- Adam
class HyperAdam(HypergradientOptimizer):
    r"""Adam / AdamW whose step size, and optionally betas, are learned online by hypergradient
    descent, with a tower of ``height`` hyperoptimizers on top.

    Base update (torch's Adam; ``decoupled_weight_decay=True`` is AdamW)::

        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        x -= alpha * s * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    Args:
        params: parameters or param groups.
        lr: initial step size ``alpha``; a schedule on ``group["lr"]`` multiplies the learned one.
        betas: ``(beta1, beta2)``; learned ones (``"beta1"``/``"beta2"`` in ``learn``) must be in
            (0, 1) and move through ``(tanh(z) + 1) / 2``.
        eps: added to ``sqrt(vhat)``.
        weight_decay: weight decay; decoupled (AdamW, default) or added to the gradient.
        decoupled_weight_decay: see ``weight_decay``.
        maximize: maximize the objective.
        learn: any of ``"lr"`` (default), ``"beta1"``, ``"beta2"``.
        height, hyper_optimizer, hyper_lr, hyper_betas, hyper_eps, lr_parametrization, per_group,
            per_tensor: as in :class:`HyperSGD`.
        implementation: as in :class:`HyperSGD`: the C loops on CPU (fixed betas; learned ones
            keep the torch paths), else ``"foreach"``/``"auto"`` run the update through torch's
            fused Adam(W) kernel when the betas are fixed.
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    Per-parameter state: ``step``, ``exp_avg``, ``exp_avg_sq``, plus ``d_beta1``/``d_beta2``
    (the derivative of the last update direction) for each learned beta. Learning only the step
    size costs no memory beyond Adam's: the last direction is recomputed from the moments.
    """

    PATHS = ("native", "compiled", "foreach", "loop")
    #: ``_group_update`` takes one step size per tensor (``per_tensor``) in one call
    TENSOR_STEP_SIZES = True
    #: C, then torch's fused kernel for the update (fp32/fp64 on CPU), then compiled, the loop
    AUTO_ORDER = AutoOrder(
        cpu=("native", "foreach", "compiled", "loop"), cuda=("foreach", "compiled", "loop")
    )
    LEARNABLE = ("lr", "beta1", "beta2")
    LEARN_ALIASES: ClassVar[Mapping[str, tuple[str, ...]]] = {"betas": ("beta1", "beta2")}
    SQUASHED = frozenset({"beta1", "beta2"})

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
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
        if not (isinstance(betas, Sequence) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r}; allowed: a sequence of 2 numbers")
        defaults = {
            "lr": check_nonnegative("lr", lr),
            "betas": tuple(check_in_range(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas)),
            "eps": check_positive("eps", eps),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
            "decoupled_weight_decay": check_bool("decoupled_weight_decay", decoupled_weight_decay),
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
        state["step"] = scalar_state(local_view(param).device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        for name in ("beta1", "beta2"):
            if name in self.learn:
                state[f"d_{name}"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _needs_x(self, group: dict[str, Any]) -> bool:
        return (
            "lr" in self.learn and group["decoupled_weight_decay"] and group["weight_decay"] != 0.0
        )

    def _dot_names(self, group: dict[str, Any]) -> list[str]:
        names = ["lr"] if "lr" in self.learn else []
        if self._needs_x(group):
            names.append("x")
        return names + [n for n in ("beta1", "beta2") if n in self.learn]

    def _lr_dot(
        self, group: dict[str, Any], dots: dict[str, torch.Tensor], prev_lr: torch.Tensor
    ) -> torch.Tensor:
        if not self._needs_x(group):
            return dots["lr"]
        # u = lr * (d + wd * x_prev); x_prev = (x + lr * d) / (1 - lr * wd) from the last update
        wd = group["weight_decay"]
        x_prev = (dots["x"] + prev_lr * dots["lr"]) / (1.0 - prev_lr * wd)
        return dots["lr"] + wd * x_prev

    def _group_dots(self, gb: Any, values: dict[str, torch.Tensor], impl: str) -> list:
        group = gb.group
        static = {
            "eps": group["eps"],
            "learn_lr": "lr" in self.learn,
            "need_x": self._needs_x(group),
            "learn_beta1": "beta1" in self.learn,
            "learn_beta2": "beta2" in self.learn,
        }
        extra = []
        if static["need_x"]:
            extra.append(gb.params)
        for name in ("beta1", "beta2"):
            if name in self.learn:
                extra.append(gb.state_list(f"d_{name}"))
        m, v = gb.state_list("exp_avg"), gb.state_list("exp_avg_sq")
        steps = [s["step"] for s in gb.states]
        cdt = compute_dtype(gb.grads[0].dtype)
        scalars = _adam_scalars(steps, values["beta1"], values["beta2"], cdt, for_update=False)
        out: list[torch.Tensor | None] = [None] * len(gb.params)
        large = list(range(len(gb.params)))
        multi_tensor = group["implementation"] != "loop"  # "loop" is the pure reference path
        if multi_tensor and not (static["learn_beta1"] or static["learn_beta2"]):
            # Small tensors (biases, norms: most of a transformer's tensors, little of its
            # memory) in a few multi-tensor calls instead of one kernel call each.
            small = [
                i
                for i in large
                if gb.grads[i].numel() < _SMALL_NUMEL and gb.grads[i].dtype in _FOREACH_DTYPES
            ]
            large = [i for i in large if i not in set(small)]
            lists = [[gb.grads[i] for i in small], [m[i] for i in small], [v[i] for i in small]]
            if static["need_x"]:
                lists.append([gb.params[i] for i in small])
            for (dev, _), (bucket, idx) in bucket_by_device_and_dtype(lists).items():
                sc = [tuple(t.to(dev) for t in scalars[small[j]]) for j in idx]
                dots = _foreach_adam_lr_dots(bucket, sc, group["eps"])
                for j, d in zip(idx, dots, strict=True):
                    out[small[j]] = d
        sizes = [gb.params[i].numel() for i in large]
        for j in _tensor_order(impl, _adam_dots, sizes):
            i = large[j]
            dev = gb.grads[i].device
            tensors = [gb.grads[i], m[i], v[i], *(e[i] for e in extra)]
            sc = [t.to(dev) for t in scalars[i]]
            out[i] = _run(_adam_dots, impl, tensors, *sc, **static)
        return out  # type: ignore[return-value]

    def _native_covers(self, group: dict[str, Any]) -> bool:
        # learned betas (their derivative buffers) stay on the torch paths
        return "beta1" not in self.learn and "beta2" not in self.learn

    NATIVE_COUNTER = "step"

    def _native_state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq"]

    def _native_bucket_dots(
        self, gb: Any, addrs: list[_native.Addresses], out: torch.Tensor
    ) -> None:
        group = gb.group
        beta1, beta2 = group["betas"]
        _native.hyper_adam_dots(
            addrs[1],
            addrs[2],
            addrs[3],
            addrs[0] if self._needs_x(group) else None,
            addrs[4],  # the step counters
            out,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
        )

    def _native_update(
        self,
        gb: Any,
        addrs: list[_native.Addresses],
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        group = gb.group
        beta1, beta2 = group["betas"]
        _native.hyper_adam_update(
            *addrs[:4],
            addrs[4],  # the step counters, advanced by the C code
            ok,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=group["decoupled_weight_decay"],
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
        learned_betas = [n for n in ("beta1", "beta2") if n in self.learn]
        static = {
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "decoupled": group["decoupled_weight_decay"],
            "maximize": group["maximize"],
            "learn_beta1": "beta1" in self.learn,
            "learn_beta2": "beta2" in self.learn,
        }
        lists = [
            gb.params,
            gb.grads,
            gb.state_list("exp_avg"),
            gb.state_list("exp_avg_sq"),
            *(gb.state_list(f"d_{n}") for n in learned_betas),
        ]
        steps = [s["step"] for s in gb.states]
        per_tensor = lr.dim() == 1  # one step size per tensor of gb (per_tensor=True)
        for (device, dtype), (bucket, idx) in bucket_by_device_and_dtype(lists).items():
            ok_d = ok.to(device)
            lr_d = lr.to(device)
            if per_tensor and len(idx) != lr_d.numel():  # this bucket's entries, in its order
                lr_d = lr_d[torch.tensor(idx, device=device)]
            bucket_steps = [steps[i] for i in idx]
            fused = partial(_fused_ok, bucket, _ADAM_STREAMS)
            if not learned_betas and self._fused_form(group, bucket, fused):
                torch._foreach_add_(bucket_steps, ok_d.to(torch.float32))
                beta1, beta2 = group["betas"]
                fused = (
                    torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
                )
                options = {
                    "beta1": beta1,
                    "beta2": beta2,
                    "weight_decay": group["weight_decay"],
                    "eps": group["eps"],
                    "amsgrad": False,
                    "maximize": group["maximize"],
                }
                if not per_tensor:
                    fused(*bucket[:4], [], bucket_steps, **options,
                          **_fused_step_args(lr_d, ok_d, dtype))  # fmt: skip
                    continue
                # the kernel takes one step size per call: one call per tensor
                step_args = _fused_step_args(lr_d, ok_d, dtype)
                lrs = step_args.pop("lr").unbind(0)
                for i, lr_i in enumerate(lrs):
                    fused(*([t[i]] for t in bucket[:4]), [], [bucket_steps[i]], **options,
                          lr=lr_i, **step_args)  # fmt: skip
                continue
            b1, b2 = values["beta1"].to(device), values["beta2"].to(device)
            lr_ok = torch.where(ok_d, lr_d, 0.0)
            lr_each = lr_ok.unbind(0) if per_tensor else None
            scalars = _adam_scalars(bucket_steps, b1, b2, compute_dtype(dtype), for_update=True)
            for i in _tensor_order(impl, _adam_update, [p.numel() for p in bucket[0]]):
                _run(
                    _adam_update,
                    impl,
                    [t[i] for t in bucket],
                    ok_d,
                    lr_ok if lr_each is None else lr_each[i],
                    b1,
                    b2,
                    *(t.to(device) for t in scalars[i]),
                    **static,
                )
            torch._foreach_add_(bucket_steps, ok_d.to(torch.float32))
