"""ADOPT: Adam that converges for any beta2.

Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa & Matsuo,
"ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate", NeurIPS 2024
(arXiv:2411.02853, Algorithm 1 and the clipped variant of its v3).

Adam's failure on the counterexamples of Reddi et al. (2018) comes from the correlation between the
current gradient and the second-moment estimate that divides it. ADOPT removes it in two moves:
the gradient is normalised by the *previous* second moment ``v_{t-1}`` (which excludes ``g_t``),
and the normalisation happens *before* the momentum average, not after.

For parameter ``x`` with gradient ``g_t`` (``t = 0`` is the first step this parameter has a
gradient)::

    t = 0:   v_0 = g_0^2                                  # no parameter update
    t >= 1:  u_t = clip(g_t / max(sqrt(v_{t-1}), eps), c_t)   # c_t = t ** clip_exponent
             m_t = beta1 * m_{t-1} + (1 - beta1) * u_t     # m_0 = 0
             x_t = x_{t-1} - lr * m_t                       # (AdamW-style decay: x *= 1 - lr*wd)
             v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2    # updated after its use

``eps`` is a floor on ``sqrt(v)``, not added to it. Clipping by ``t**0.25`` is the authors'
default: it keeps the guarantee and makes early steps stable when ``v`` is still tiny. Unclipped
ADOPT (``clip_exponent=None``) is the algorithm of the first arXiv version.

Code paths. The update is elementwise: it reads ``x, g, m, v`` and writes ``x, m, v``, the
memory traffic of fused AdamW; before it, the non-finite guard reads every gradient once (a
NaN/Inf anywhere must cancel the step before the first write). On CPU (``"auto"`` and
``"native"``, fp32/fp64) both passes are C loops of :mod:`hf_tuningfree.optim._native`, one
call per device/dtype bucket for all its tensors: the ``torch.compile``d kernel made one call
per tensor and measured 1.9x fused AdamW on the benchmark's 147 tensors, the C path ~1.2x
(``benchmarks/step_time.py``). The C code reads the step counters (a parameter's first step,
``v = g^2`` only, included), a tensor learning rate and the guard's flag from memory and
advances the counters itself, so ``step()`` reads nothing on the host. Its results match
``adopt_tensor_update`` to rounding (~1e-7 relative in fp32: its sqrt is correctly rounded,
torch's CPU sqrt not always; ~1e-16 in fp64). Without a C compiler (one warning), for 16-bit
parameters and on GPUs the torch paths run: the compiled kernel (Triton on GPU; on CPU for
groups of at least ``CPU_COMPILE_MIN_NUMEL`` elements) or the per-tensor loop.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from . import _native
from .base import (
    StepBatch,
    TuningFreeOptimizer,
    bucket_by_device_and_dtype,
    compute_dtype,
    foreach_norms,
    scalar_state,
)
from .distributed import local_view
from .kernels import CompiledKernel, order_for_compile
from .validation import (
    check_betas,
    check_bool,
    check_nonnegative,
    check_positive,
)

__all__ = ["ADOPT", "adopt_tensor_update"]


def adopt_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor,
    ok: torch.Tensor,
    clip: torch.Tensor,
    w_m: torch.Tensor,
    lr_eff: torch.Tensor,
    lr_wd: torch.Tensor,
    w_v: torch.Tensor,
    *,
    eps: float,
    coupled_wd: float,
    maximize: bool,
    decoupled: bool,
) -> None:
    """One tensor's ADOPT update, in place; the eager per-tensor path and the compiled kernel
    (the C loop ``_native.adopt_update`` follows the same order of operations).

    Written with in-place ops (about nine passes over memory eagerly); under ``torch.compile``
    inductor fuses it into one pass. Arithmetic happens in the parameter's dtype eagerly and in
    fp32 registers when compiled.

    The per-step scalars come from ``_coefficients`` so that the first step (``v = g^2`` only), a
    skipped step (``ok`` False: nothing changes) and clipping need no branch on device values:
    ``clip`` is 0 at the first step (``u = 0``), ``+inf`` when unclipped; ``w_m = (1-beta1)``,
    ``lr_eff = lr`` and ``lr_wd = lr*wd`` on real updates, else 0; ``w_v`` is 1 at
    the first step, ``1 - beta2`` after, 0 when skipped. ``exp_avg`` None (``beta1 == 0``): the
    update is ``u`` itself, the value the lerp gives with ``w_m == 1`` (no first-moment buffer).
    """
    g = torch.where(ok, grad, 0.0)  # a skipped step's NaN/Inf never reaches the state
    if maximize:
        g.neg_()
    if coupled_wd != 0.0:
        g.add_(param, alpha=coupled_wd)
    denom = exp_avg_sq.sqrt().clamp_(min=eps)  # max(sqrt(v_{t-1}), eps)
    exp_avg_sq.lerp_(g.square(), w_v)  # v_t, once v_{t-1} has been used
    u = g.div_(denom).clamp_(-clip, clip)  # normalise before the momentum, then clip
    if exp_avg is not None:
        exp_avg.lerp_(u, w_m)  # m_t = m_{t-1} + (1 - beta1) (u_t - m_{t-1})
    if decoupled:
        param.addcmul_(param, lr_wd, value=-1.0)  # not p*(1 - lr*wd): that rounding biases p
    param.addcmul_(u if exp_avg is None else exp_avg, lr_eff, value=-1.0)


def _coefficients(
    s: torch.Tensor,
    ok: torch.Tensor,
    lr: float | torch.Tensor,
    bound: torch.Tensor | None,
    *,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> dict[str, torch.Tensor]:
    """This step's scalars for step counters ``s`` (one 0-dim counter, or a 1-D tensor of them)
    and clip bounds ``bound = s**clip_exponent`` (None: unclipped). No host reads."""
    okf = ok.to(s.dtype)
    started = (s > 0).to(s.dtype)
    live = started * okf
    limit = bound if bound is not None else torch.full_like(s, float("inf"))
    lr_eff = live * lr
    return {
        "clip": torch.where(started > 0, limit, 0.0),
        "w_m": live * (1.0 - beta1),
        "lr_eff": lr_eff,
        "lr_wd": lr_eff * weight_decay,
        "w_v": okf * (1.0 - beta2 * started),
    }


def _adopt_step_one(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor,
    ok: torch.Tensor,
    step: torch.Tensor,
    bound: torch.Tensor,
    lr: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    weight_decay: float,
    clipped: bool,
    eps: float,
    coupled_wd: float,
    maximize: bool,
    decoupled: bool,
) -> None:
    """Coefficients and update of one tensor: what the compiled kernel runs. Its tensor inputs
    are all standalone (no views of a stacked tensor, whose size dynamo would guard on) and ``lr``
    is a tensor, so a learning-rate schedule never triggers a recompile."""
    cdt = compute_dtype(param.dtype)
    coef = _coefficients(
        step.to(cdt),
        ok,
        lr.to(cdt),
        bound.to(cdt) if clipped else None,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
    )
    adopt_tensor_update(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        ok,
        coef["clip"],
        coef["w_m"],
        coef["lr_eff"],
        coef["lr_wd"],
        coef["w_v"],
        eps=eps,
        coupled_wd=coupled_wd,
        maximize=maximize,
        decoupled=decoupled,
    )


def _adopt_step_one_without_m(
    param: torch.Tensor, grad: torch.Tensor, exp_avg_sq: torch.Tensor, *args: Any, **kwargs: Any
) -> None:
    """``_adopt_step_one`` for ``beta1 == 0`` (no first-moment buffer), compiled on its own."""
    _adopt_step_one(param, grad, None, exp_avg_sq, *args, **kwargs)


_compiled_adopt = CompiledKernel(_adopt_step_one, "ADOPT")
_compiled_adopt_without_m = CompiledKernel(_adopt_step_one_without_m, "ADOPT (beta1 = 0)")


_STREAMS = ("param", "grad", "exp_avg", "exp_avg_sq")


def _native_ready(
    bucket: list[list[torch.Tensor] | None], steps: list[torch.Tensor], lr: Any
) -> bool:
    """Whether ``_native.adopt_update`` can take this bucket (``_native.accepts``: fp32/fp64
    contiguous CPU tensors of their parameters' shapes; fp32 CPU step counters, a float or
    CPU-tensor learning rate, a compiler on the machine)."""
    if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
        return False
    if not all(s.is_cpu and s.dtype == torch.float32 for s in steps):
        return False
    present = [(t, n) for t, n in zip(bucket, _STREAMS, strict=True) if t is not None]
    return _native.accepts([t for t, _ in present], [n for _, n in present])


def _foreach_adopt(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor] | None,
    exp_avg_sqs: list[torch.Tensor],
    ok: torch.Tensor,
    coef: dict[str, list[torch.Tensor]],
    *,
    eps: float,
    coupled_wd: float,
    maximize: bool,
    decoupled: bool,
) -> None:
    """The same update as ``adopt_tensor_update`` for a device/dtype bucket, with foreach ops
    (arithmetic in the parameters' dtype, as torch's foreach Adam). ``exp_avgs`` None
    (``beta1 == 0``): the update is the clipped normalised gradient ``u``."""
    g = torch._foreach_neg(grads) if maximize else list(grads)
    g = [torch.where(ok, x, 0.0) for x in g]
    if coupled_wd != 0.0:
        torch._foreach_add_(g, params, alpha=coupled_wd)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_maximum_(denom, eps)
    u = torch._foreach_div(g, denom)  # normalise by v_{t-1}, before the momentum
    del denom
    neg_clip = torch._foreach_neg(coef["clip"])
    torch._foreach_maximum_(u, neg_clip)
    torch._foreach_minimum_(u, coef["clip"])
    if exp_avgs is not None:
        torch._foreach_sub_(u, exp_avgs)
        torch._foreach_mul_(u, coef["w_m"])
        torch._foreach_add_(exp_avgs, u)
    if decoupled:
        torch._foreach_sub_(params, torch._foreach_mul(params, coef["lr_wd"]))
    torch._foreach_sub_(params, torch._foreach_mul(u if exp_avgs is None else exp_avgs,
                                                   coef["lr_eff"]))  # fmt: skip
    g2 = torch._foreach_mul(g, g)
    torch._foreach_sub_(g2, exp_avg_sqs)
    torch._foreach_mul_(g2, coef["w_v"])
    torch._foreach_add_(exp_avg_sqs, g2)


class ADOPT(TuningFreeOptimizer):
    r"""ADOPT (Taniguchi et al., NeurIPS 2024) with the authors' clipped update.

    Args:
        params: parameters or param groups.
        lr: step size (default 1e-3, the authors' recommendation; an LR schedule multiplies it).
        betas: ``(beta1, beta2)``, default ``(0.9, 0.9999)``: ADOPT converges for any beta2, and
            the authors recommend 0.9999.
        eps: floor on ``sqrt(v)`` (default 1e-6, as the authors); must be > 0.
        weight_decay: weight decay coefficient (default 0).
        decoupled_weight_decay: True (default) applies AdamW-style ``x *= 1 - lr*wd`` on update
            steps, what users of AdamW and of the Trainer expect; False adds ``wd * x`` to the
            gradient before normalisation (Adam-style, the authors' default).
        clip_exponent: clip the normalised gradient to ``[-t**e, t**e]`` (default ``0.25``, the
            authors' clipped ADOPT); ``None`` turns clipping off (the original algorithm). Stored
            in ``param_groups`` so checkpoints keep it.
        maximize: maximize the objective instead of minimising it.
        implementation: ``"auto"`` (default), ``"native"``, ``"compiled"``, ``"foreach"`` or
            ``"loop"`` (:mod:`hf_tuningfree.optim.kernels`). ``"auto"`` runs the C loops of
            :mod:`hf_tuningfree.optim._native` on CPU (fp32/fp64, every model size; built once
            per machine with the system C compiler), else the compiled kernel (Triton on CUDA;
            on CPU for groups of at least ``CPU_COMPILE_MIN_NUMEL`` elements), else foreach
            (non-CPU) or the loop. ``HF_TUNINGFREE_IMPL`` overrides ``"auto"``.
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    Per-parameter state: ``step`` (0-dim fp32), ``exp_avg`` (m), ``exp_avg_sq`` (v).

    ``betas[0] == 0`` keeps no first moment (issue 17; prodigy PR #32 asked the same of Prodigy):
    ``m_t = u_t``, so the update is the clipped normalised gradient itself and ``exp_avg`` is
    never allocated (4 bytes of state per fp32 parameter instead of 8), with the numbers of the
    run that keeps a zero-initialised buffer (bit for bit on the C, per-tensor and compiled
    paths; the foreach path formed ``m + (u - m)`` and differs from it by an ulp). Setting
    ``betas[0]`` of a group to 0 later drops the buffers of its parameters at their next step;
    setting it back to nonzero allocates them at 0, as at the start of a run (ADOPT has no bias
    correction, so the first updates after that are ``(1 - beta1)`` times the normalised
    gradient, as at a run's first steps).
    """

    PATHS = ("native", "compiled", "foreach", "loop")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        clip_exponent: float | None = 0.25,
        maximize: bool = False,
        implementation: str = "auto",
        *,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": check_nonnegative("lr", lr),
            "betas": check_betas("betas", betas),
            "eps": check_positive("eps", eps),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
            "decoupled_weight_decay": check_bool("decoupled_weight_decay", decoupled_weight_decay),
            "clip_exponent": None
            if clip_exponent is None
            else check_nonnegative("clip_exponent", clip_exponent),
            "maximize": check_bool("maximize", maximize),
            "implementation": implementation,
        }
        super().__init__(
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["step"] = scalar_state(local_view(param).device)
        if not self._without_first_moment(group["betas"][0]):  # see the class docstring
            state["exp_avg"] = _zeros_like(param)
        state["exp_avg_sq"] = _zeros_like(param)

    #: False keeps a first-moment buffer at ``beta1 == 0`` too (the behaviour before issue 17;
    #: the tests compare against it).
    _drop_unused_first_moment = True

    def _without_first_moment(self, beta1: float) -> bool:
        return beta1 == 0.0 and self._drop_unused_first_moment

    @staticmethod
    def _match_first_moment(gb: Any, drop: bool) -> None:
        """The buffers of a group whose ``beta1`` changed since their state was made: dropped at
        ``beta1 == 0`` (they would only be overwritten by ``u``), allocated at 0 otherwise."""
        for state, p in zip(gb.states, gb.originals, strict=True):
            if drop:
                state.pop("exp_avg", None)
            elif "exp_avg" not in state:
                state["exp_avg"] = _zeros_like(torch.view_as_real(p) if p.is_complex() else p)

    def _finiteness_statistic(self, batch: StepBatch) -> torch.Tensor:
        """The non-finite guard's statistic, one read of every gradient: on buckets that take the
        C path, ``sum ||g||^2`` from one parallel C loop over all their gradients
        (``_native.sum_sq``, ~2x faster than ``torch._foreach_norm`` here); elsewhere the base
        class's gradient norms. Finite iff every gradient element is (and the squares' per-block
        sums do not overflow the gradients' dtype, about where the norms would)."""
        parts: list[torch.Tensor] = []
        for gb in batch.groups:
            if not gb.params:
                continue
            buckets = bucket_by_device_and_dtype([gb.params, gb.grads])
            for (device, _), ([ps, gs], _) in buckets.items():
                numel = sum(p.numel() for p in ps)
                if (
                    self._path(gb.group, device, numel, native=partial(_native.available, gs))
                    == "native"
                ):
                    total = torch.empty((), dtype=torch.float64)
                    _native.sum_sq(gs, total)
                    parts.append(total)
                else:
                    parts.extend(foreach_norms(gs))
        return batch.sum_on_device(parts)

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        for gb in batch.groups:
            if not gb.params:
                continue
            group = gb.group
            beta1, beta2 = group["betas"]
            decoupled = group["decoupled_weight_decay"]
            exponent = group["clip_exponent"]
            static = {
                "eps": group["eps"],
                "coupled_wd": 0.0 if decoupled else group["weight_decay"],
                "maximize": group["maximize"],
                "decoupled": decoupled and group["weight_decay"] != 0.0,
            }
            hyper = {"beta1": beta1, "beta2": beta2, "weight_decay": group["weight_decay"]}
            steps = [s["step"] for s in gb.states]
            no_m = self._without_first_moment(beta1)
            self._match_first_moment(gb, no_m)
            moments = gb.state_list("exp_avg_sq") if no_m else gb.state_list("exp_avg")
            lists = [gb.params, gb.grads, moments, gb.state_list("exp_avg_sq")]
            for (device, dtype), (bucket, idx) in bucket_by_device_and_dtype(lists).items():
                if no_m:  # the list above only held a place
                    bucket = [bucket[0], bucket[1], None, bucket[3]]
                bucket_steps = [steps[i] for i in idx]
                ok_d = ok.to(device)
                numel = sum(p.numel() for p in bucket[0])
                ready = partial(_native_ready, bucket, bucket_steps, group["lr"])
                impl = self._path(group, device, numel, native=ready)
                if impl == "native":
                    # one C call for the bucket; it also advances the step counters
                    _native.adopt_update(
                        *bucket,
                        bucket_steps,
                        ok_d,
                        lr=group["lr"],
                        beta1=beta1,
                        beta2=beta2,
                        eps=group["eps"],
                        weight_decay=group["weight_decay"],
                        decoupled=decoupled,
                        clip_exponent=exponent,
                        maximize=group["maximize"],
                    )
                    continue
                if impl == "compiled":
                    self._compiled(bucket, bucket_steps, ok_d, group, hyper, static)
                else:
                    s = torch.stack(bucket_steps).to(compute_dtype(dtype))
                    bound = s.pow(exponent) if exponent is not None else None
                    coef = _coefficients(s, ok_d, group["lr"], bound, **hyper)
                    cols = {k: list(v.unbind(0)) for k, v in coef.items()}
                    if impl == "foreach":
                        _foreach_adopt(*bucket, ok_d, cols, **static)
                    else:
                        columns = [c if c is not None else [None] * len(idx) for c in bucket]
                        for i, tensors in enumerate(zip(*columns, strict=True)):
                            adopt_tensor_update(
                                *tensors,
                                ok_d,
                                *(cols[k][i] for k in ("clip", "w_m", "lr_eff", "lr_wd", "w_v")),
                                **static,
                            )
                torch._foreach_add_(bucket_steps, ok_d.to(torch.float32))

    @staticmethod
    def _compiled(
        bucket: list[list[torch.Tensor]],
        steps: list[torch.Tensor],
        ok: torch.Tensor,
        group: dict[str, Any],
        hyper: dict[str, float],
        static: dict[str, Any],
    ) -> None:
        exponent = group["clip_exponent"]
        # lr and the clip bound in the compute dtype: an fp32 lr or step**0.25 would round an
        # fp64 run at ~1e-8 (the C and loop paths compute them in double)
        cdt = compute_dtype(bucket[0][0].dtype)
        if cdt != torch.float32:
            steps = [s.to(cdt) for s in steps]
        bounds = torch._foreach_pow(steps, exponent) if exponent is not None else steps
        lr = torch.full((), group["lr"], dtype=cdt, device=ok.device)
        kernel = _compiled_adopt if bucket[2] is not None else _compiled_adopt_without_m
        streams = [t for t in bucket if t is not None]
        for i in order_for_compile(kernel, [p.numel() for p in bucket[0]]):
            kernel(
                [t[i] for t in streams],
                ok,
                steps[i],
                bounds[i],
                lr,
                clipped=exponent is not None,
                **hyper,
                **static,
            )

    def stats(self) -> dict[str, float]:
        out = super().stats()
        steps = [s["step"] for s in self.state.values() if isinstance(s, dict) and "step" in s]
        if steps:
            t = max(float(s) for s in steps)
            out["step"] = t
            exponent = self.param_groups[0]["clip_exponent"]
            if exponent is not None:
                out["clip"] = max(t - 1.0, 0.0) ** exponent if t > 1 else 0.0
        return out


def _zeros_like(param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param, memory_format=torch.preserve_format)
