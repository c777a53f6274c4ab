"""The hypergradient optimizers' per-element functions, parametrisations and path choices.

What :mod:`hf_tuningfree.optim.hypergradient` states as maths, written per tensor (the loop and
compiled paths and the reference of the C kernels in ``csrc/hypergradient.c``), with the
constants and helpers that pick a path for a bucket of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..base import (
    bucket_by_device_and_dtype,
    compute_dtype,
)
from ..kernels import (
    CompiledKernel,
    fast_path_accepts,
    order_for_compile,
)
from ..multitensor import run_multi, segment_dots

#: Hyperoptimizers a tower level can use.
HYPER_OPTIMIZERS = ("adam", "sgd")
#: How step sizes (of every level) are parametrised; see :mod:`hf_tuningfree.optim.hypergradient`.
STEP_PARAMETRIZATIONS = ("log", "square", "identity")

#: Initial step sizes of the Adam hyperoptimizers when ``hyper_lr`` is not given: level 1, then
#: every level above (chosen by measurement; docs/hypergradient.md, "Defaults").
DEFAULT_HYPER_LR = (0.05, 0.02)

_Z_LIMIT = 8.0  # |z| bound of the squashed hyperparameters: (tanh(8) + 1) / 2 < 1 even in fp32
_LOG_LIMIT = 50.0  # |log alpha| bound: keeps exp() finite in fp32 (never reached in practice)
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FOREACH_DTYPES = (torch.float32, torch.float64)  # dots run in these as they are (no cast)
_SMALL_NUMEL = 1 << 16  # below this, Adam's dots of a tensor go through multi-tensor ops
_ADAM_STREAMS = ("param", "grad", "exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------- parametrisations
def _raw_from_value(kind: str, value: float) -> float:
    """The learned variable for a hyperparameter of ``value`` (host side, at initialisation)."""
    if kind == "squash":
        return max(-_Z_LIMIT, min(_Z_LIMIT, math.atanh(2.0 * value - 1.0)))
    if kind == "log":
        return math.log(value)
    if kind == "square":
        return math.sqrt(value)
    return value  # identity


def _value(kind: str, raw: torch.Tensor) -> torch.Tensor:
    if kind == "squash":
        return (torch.tanh(raw) + 1.0) * 0.5
    if kind == "log":
        return torch.exp(raw)
    if kind == "square":
        return raw * raw
    return raw


def _derivative(kind: str, raw: torch.Tensor) -> torch.Tensor:
    """d value / d raw."""
    if kind == "squash":
        t = torch.tanh(raw)
        return (1.0 - t * t) * 0.5
    if kind == "log":
        return torch.exp(raw)
    if kind == "square":
        return 2.0 * raw
    return torch.ones_like(raw)


def _project(kind: str, raw: torch.Tensor) -> torch.Tensor:
    if kind == "squash":
        return raw.clamp(-_Z_LIMIT, _Z_LIMIT)
    if kind == "log":
        return raw.clamp(-_LOG_LIMIT, _LOG_LIMIT)
    if kind == "identity":
        return raw.clamp(min=0.0)
    return raw


# ---------------------------------------------------------------------- per-tensor kernels
# Each base optimizer has two per-tensor functions, run eagerly ("loop") or compiled:
#   *_dots:   the dot products of the gradient with the derivatives of the last update, returned
#             as one 1-D tensor (one entry per learned quantity): ``_direction_dots`` where the
#             derivatives are stored (SGD, AdaGrad, RMSProp), ``_adam_dots`` recomputes them;
#   *_update: the update itself, which also stores what the next step's dots need.
# Every write of *_update is a no-op where ``ok`` is False (a skipped step changes nothing).
# Optional tensors (buffers of learned betas etc.) follow the fixed ones in the argument list;
# static flags say which are present.


def _direction_dots(g: torch.Tensor, *stored: torch.Tensor) -> torch.Tensor:
    """``<g, D>`` for each stored derivative ``D`` of the last update (SGD: ``buf`` for the step
    size, ``buf_prev`` for the momentum; AdaGrad, RMSProp: the direction, ``d_decay``)."""
    cdt = compute_dtype(g.dtype)
    g = g.to(cdt)
    return torch.stack([(g * t.to(cdt)).sum() for t in stored])


def _update_gradient(
    p: torch.Tensor, g: torch.Tensor, ok: torch.Tensor, weight_decay: float, maximize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, x)`` in the compute dtype as an update uses them: ``g`` negated for ``maximize``,
    0 where ``ok`` is False (a skipped step), plus the coupled L2 term ``weight_decay * x``."""
    cdt = compute_dtype(p.dtype)
    g = g.to(cdt)
    if maximize:
        g = -g
    g = torch.where(ok, g, 0.0)
    x = p.to(cdt)
    if weight_decay != 0.0:
        g = g + weight_decay * x
    return g, x


def _sgd_update(
    *args: torch.Tensor, weight_decay: float, maximize: bool, learn_momentum: bool
) -> None:
    """``buf = mu * buf + (g + wd * x)``; ``x -= lr * buf`` (torch's SGD, dampening 0). Learning
    the momentum, the buffer before this update is kept in ``buf_prev`` (d buf / d mu)."""
    if learn_momentum:
        p, g, buf, buf_prev, ok, lr, mu = args
    else:
        p, g, buf, ok, lr, mu = args
        buf_prev = None
    g, x = _update_gradient(p, g, ok, weight_decay, maximize)
    cdt = x.dtype
    b = buf.to(cdt)
    new_b = mu * b + g
    x = x - torch.where(ok, lr, 0.0) * new_b
    if buf_prev is not None:
        buf_prev.copy_(torch.where(ok, b, buf_prev.to(cdt)))
    buf.copy_(torch.where(ok, new_b, b))
    p.copy_(x)


def _bias_corrections(
    k: torch.Tensor, beta1: torch.Tensor, beta2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - beta^k`` for step counts ``k`` (1 where ``k == 0``: nothing was accumulated yet)."""
    started = k > 0
    bc1 = torch.where(started, 1.0 - torch.pow(beta1, k), 1.0)
    bc2 = torch.where(started, 1.0 - torch.pow(beta2, k), 1.0)
    return bc1, bc2


def _adam_scalars(
    steps: Sequence[torch.Tensor],
    beta1: torch.Tensor,
    beta2: torch.Tensor,
    dtype: torch.dtype,
    *,
    for_update: bool,
) -> list[tuple[torch.Tensor, ...]]:
    """Per tensor, the 0-dim scalars its Adam kernel needs, computed for the whole list at once.

    Kept out of the elementwise kernels: a compiled kernel would evaluate ``pow`` and friends
    of its 0-dim inputs once per element. ``for_update=False`` (the dots of the last update,
    step counts ``k`` as stored): ``1 / bc1``, ``1 / sqrt(bc2)``. ``for_update=True`` (the update
    that takes the count to ``k + 1``): ``bc1``, ``bc2``, ``(k+1) beta1^k``, ``(k+1) beta2^k``.
    """
    k = torch.stack(list(steps)).to(beta1.device, dtype)
    beta1, beta2 = beta1.to(dtype), beta2.to(dtype)
    if not for_update:
        bc1, bc2 = _bias_corrections(k, beta1, beta2)
        cols = (1.0 / bc1, torch.rsqrt(bc2))
    else:
        k1 = k + 1.0
        cols = (
            1.0 - torch.pow(beta1, k1),
            1.0 - torch.pow(beta2, k1),
            k1 * torch.pow(beta1, k),
            k1 * torch.pow(beta2, k),
        )
    return list(zip(*(c.unbind(0) for c in cols), strict=True))


def _adam_dots(
    *args: torch.Tensor,
    eps: float,
    learn_lr: bool,
    need_x: bool,
    learn_beta1: bool,
    learn_beta2: bool,
) -> torch.Tensor:
    """``<g, mhat/(sqrt(vhat)+eps)>`` with the moments and bias corrections of the last update
    (step size; ``inv_bc1 = 1 / bc1``, ``inv_sqrt_bc2 = 1 / sqrt(bc2)``), ``<g, x>`` (decoupled
    weight decay), ``<g, d_beta1>``, ``<g, d_beta2>``."""
    g, m, v = args[:3]
    tensors = args[3:-2]  # x (need_x), d_beta1, d_beta2, in that order
    inv_bc1, inv_sqrt_bc2 = args[-2:]
    cdt = compute_dtype(g.dtype)
    g = g.to(cdt)
    out = []
    if learn_lr:
        # mhat / (sqrt(vhat) + eps) = m / bc1 / (sqrt(v) / sqrt(bc2) + eps): one sqrt, one div
        d = m.to(cdt) / (torch.sqrt(v.to(cdt)) * inv_sqrt_bc2 + eps)
        out.append((g * d).sum() * inv_bc1)
    for t in tensors:
        out.append((g * t.to(cdt)).sum())
    return torch.stack(out)


def _adam_update(
    *args: torch.Tensor,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    learn_beta1: bool,
    learn_beta2: bool,
) -> None:
    """Adam / AdamW (torch's formulation: ``x -= lr * mhat / (sqrt(vhat) + eps)``), and the
    elementwise derivatives of that direction with respect to beta1 / beta2 when they are learned
    (old moments held constant, bias corrections differentiated). Scalars from ``_adam_scalars``;
    ``lr`` is 0 on a skipped step."""
    p, g, m, v = args[:4]
    extra = list(args[4:-8])
    ok, lr, beta1, beta2, bc1, bc2, kb1, kb2 = args[-8:]
    d_beta1 = extra.pop(0) if learn_beta1 else None
    d_beta2 = extra.pop(0) if learn_beta2 else None
    g, x = _update_gradient(p, g, ok, 0.0 if decoupled else weight_decay, maximize)
    cdt = x.dtype
    m_old = m.to(cdt)
    v_old = v.to(cdt)
    m_new = m_old + (1.0 - beta1) * (g - m_old)
    v_new = beta2 * v_old + (1.0 - beta2) * (g * g)
    sv = torch.sqrt(v_new / bc2)
    denom = sv + eps
    mhat = m_new / bc1
    if weight_decay != 0.0 and decoupled:
        x = x - (lr * weight_decay) * x
    x = x - lr * (mhat / denom)
    # d(m/bc)/dbeta = (dm/dbeta * bc + m * k beta^(k-1)) / bc^2, with dm/dbeta = m_old - g.
    # Over one denominator the first update's derivative is exactly 0 (as it is analytically):
    # a rounding residue there would be blown up to a full step by an Adam hyperoptimizer.
    if d_beta1 is not None:
        num = (m_old - g) * bc1 + m_new * kb1
        d_beta1.copy_(torch.where(ok, num / (bc1 * bc1) / denom, d_beta1.to(cdt)))
    if d_beta2 is not None:
        num = (v_old - g * g) * bc2 + v_new * kb2
        dv = num / (bc2 * bc2)
        dd = torch.where(sv > 0, -(mhat / (denom * denom)) * dv / (2.0 * sv), 0.0)
        d_beta2.copy_(torch.where(ok, dd, d_beta2.to(cdt)))
    m.copy_(torch.where(ok, m_new, m_old))
    v.copy_(torch.where(ok, v_new, v_old))
    p.copy_(x)


def _foreach_adam_lr_dots(
    bucket: list[list[torch.Tensor]], scalars: list[tuple[torch.Tensor, ...]], eps: float
) -> list[torch.Tensor]:
    """``_adam_dots`` (step size, and ``<g, x>`` when ``bucket`` holds the parameters too) for a
    device/dtype bucket of small tensors, with multi-tensor ops."""
    grads, ms, vs = bucket[:3]
    inv_bc1 = [sc[0] for sc in scalars]
    inv_sqrt_bc2 = [sc[1] for sc in scalars]
    denom = torch._foreach_sqrt(vs)
    torch._foreach_mul_(denom, inv_sqrt_bc2)
    torch._foreach_add_(denom, eps)
    gm = torch._foreach_mul(grads, ms)
    torch._foreach_div_(gm, denom)
    sums = [t.sum() * c for t, c in zip(gm, inv_bc1, strict=True)]
    if len(bucket) == 3:
        return [s.reshape(1) for s in sums]
    gx = torch._foreach_mul(grads, bucket[3])
    return [torch.stack([s, t.sum()]) for s, t in zip(sums, gx, strict=True)]


def _adagrad_update(
    *args: torch.Tensor, eps: float, weight_decay: float, maximize: bool, learn_lr: bool
) -> None:
    """``G += g^2``; ``x -= lr * g / (sqrt(G) + eps)`` (torch's Adagrad without lr decay); the
    direction is kept for the next step's hypergradient."""
    if learn_lr:
        p, g, acc, direction, ok, lr = args
    else:
        p, g, acc, ok, lr = args
        direction = None
    g, x = _update_gradient(p, g, ok, weight_decay, maximize)
    cdt = x.dtype
    a = acc.to(cdt)
    a_new = a + g * g
    d = g / (torch.sqrt(a_new) + eps)
    x = x - torch.where(ok, lr, 0.0) * d
    if direction is not None:
        direction.copy_(torch.where(ok, d, direction.to(cdt)))
    acc.copy_(torch.where(ok, a_new, a))
    p.copy_(x)


def _rmsprop_update(
    *args: torch.Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
    learn_lr: bool,
    learn_decay: bool,
) -> None:
    """``v = rho * v + (1 - rho) * g^2``; ``x -= lr * g / (sqrt(v) + eps)`` (torch's RMSprop);
    the direction and its derivative with respect to ``rho`` are kept when learned."""
    p, g, sq = args[:3]
    extra = list(args[3:-3])
    ok, lr, rho = args[-3:]
    direction = extra.pop(0) if learn_lr else None
    d_decay = extra.pop(0) if learn_decay else None
    g, x = _update_gradient(p, g, ok, weight_decay, maximize)
    cdt = x.dtype
    v_old = sq.to(cdt)
    v_new = rho * v_old + (1.0 - rho) * (g * g)
    sv = torch.sqrt(v_new)
    denom = sv + eps
    d = g / denom
    x = x - torch.where(ok, lr, 0.0) * d
    if direction is not None:
        direction.copy_(torch.where(ok, d, direction.to(cdt)))
    if d_decay is not None:
        dd = torch.where(sv > 0, -(g / (denom * denom)) * (v_old - g * g) / (2.0 * sv), 0.0)
        d_decay.copy_(torch.where(ok, dd, d_decay.to(cdt)))
    sq.copy_(torch.where(ok, v_new, v_old))
    p.copy_(x)


_KERNELS = {
    fn.__name__: CompiledKernel(fn, f"hypergradient {fn.__name__.strip('_')}")
    for fn in (
        _direction_dots,
        _sgd_update,
        _adam_dots,
        _adam_update,
        _adagrad_update,
        _rmsprop_update,
    )
}


def _run(fn: Any, impl: str, tensors: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """One tensor through ``fn``, eagerly or compiled."""
    if impl == "compiled":
        return _KERNELS[fn.__name__](tensors, *args, **kwargs)
    return fn(*tensors, *args, **kwargs)


def _tensor_order(impl: str, fn: Any, sizes: Sequence[int]) -> list[int]:
    if impl == "compiled":
        return order_for_compile(_KERNELS[fn.__name__], sizes)
    return list(range(len(sizes)))


def _fused_ok(
    bucket: list[list[torch.Tensor]],
    names: Sequence[str],
    cpu_dtypes: Sequence[torch.dtype] = _FUSED_DTYPES,
) -> bool:
    """Whether torch's fused multi-tensor kernel (the ``"foreach"`` form of the update) may run
    ``bucket`` (the caller adds the optimizer's own condition: fixed momentum / betas, and asks
    ``choose_path`` whether the form runs at all): ``fast_path_accepts`` (contiguous
    tensors of their parameters' shapes: the kernel treats every tensor as contiguous memory),
    of ``cpu_dtypes`` on CPU."""
    device = bucket[0][0].device.type
    dtypes = cpu_dtypes if device == "cpu" else _FUSED_DTYPES
    return device in _FUSED_DEVICES and fast_path_accepts(
        bucket, names, dtypes=dtypes, cpu_only=False
    )


def _fused_step_args(lr: torch.Tensor, ok: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """The step size and skip arguments of torch's fused kernels: ``lr`` as a tensor of the
    kernel's precision, ``found_inf`` set where the step is skipped."""
    return {
        "lr": lr.to(torch.float64 if dtype == torch.float64 else torch.float32),
        "grad_scale": None,
        "found_inf": (~ok).to(torch.float32),
    }


def _stored_dots(
    gb: Any, stored: list[list[torch.Tensor]], impl: str, *, torch_dot: bool = False
) -> list[torch.Tensor]:
    """Per tensor of ``gb``, ``_direction_dots`` of its gradient with its entries of ``stored``
    (lists of per-parameter derivatives of the last update). ``torch_dot``: a single stored
    derivative against an fp32/fp64 contiguous gradient goes through ``torch.dot`` instead."""
    out: list[torch.Tensor | None] = [None] * len(gb.params)
    if impl == "foreach":  # per bucket: one multiply, cat and segmented sum per stored list
        buckets = bucket_by_device_and_dtype([gb.grads, *stored])
        for (_, dtype), (bucket, idx) in buckets.items():
            rows = segment_dots(bucket[0], bucket[1:], compute_dtype(dtype)).unbind(0)
            for i, row in zip(idx, rows, strict=True):
                out[i] = row
        return out  # type: ignore[return-value]
    for i in _tensor_order(impl, _direction_dots, [p.numel() for p in gb.params]):
        g = gb.grads[i]
        ts = [s[i] for s in stored]
        if (
            torch_dot
            and len(ts) == 1
            and g.dtype in _FOREACH_DTYPES
            and g.is_contiguous()
            and ts[0].is_contiguous()
        ):
            # torch.dot: one vectorised pass at memory bandwidth, no temporaries
            out[i] = torch.dot(g.view(-1), ts[0].view(-1)).reshape(1)
        else:
            out[i] = _run(_direction_dots, impl, [g, *ts])
    return out  # type: ignore[return-value]


def _update_each(
    fn: Any, impl: str, bucket: list[list[torch.Tensor]], *args: Any, **static: Any
) -> None:
    """``fn`` on every tensor of a device/dtype ``bucket`` (lists, the parameters first) with the
    same 0-dim tensors ``args`` and flags ``static``; ``impl == "foreach"``: once, on the whole
    bucket as foreach ops (:func:`~hf_tuningfree.optim.multitensor.run_multi`)."""
    if impl == "foreach":
        run_multi(fn, bucket, list(args), static)
        return
    for i in _tensor_order(impl, fn, [p.numel() for p in bucket[0]]):
        _run(fn, impl, [t[i] for t in bucket], *args, **static)
