"""ctypes bindings of DoG, ADOPT and the non-finite guard's sum of squares (``csrc/dog_adopt.c``).

Each function handles every tensor of a bucket (one device/dtype group) in ONE call: no per-tensor
Python, dispatcher or dynamo-guard overhead. The DoG loops parallelise within each large tensor;
the ADOPT ones split all tensors into blocks of ``BLOCK`` elements and share the blocks among the
OpenMP threads in one parallel loop.

DoG (``dog_update``, ``grad_sq``). Why not ``torch.compile``: DoG's update must also measure the
new iterate's distance from ``x_0``. Inductor (torch 2.13) emits the reduction and the in-place
store as two loops over memory, and ``torch._fused_sgd_`` plus a separate reduction reads ``x``
and ``g`` twice; either way the step reads five streams against fused AdamW's four. The C loop
reads ``x``, ``g`` and ``x_0`` once, writes ``x`` and sums ``(x_new - x_0)^2`` in the same pass.

ADOPT (``adopt_update``, ``sum_sq``). The update reads ``x, g, m, v`` and writes ``x, m, v``, like
fused AdamW; the ``torch.compile``d per-tensor kernel did that too, but as one call per tensor (147
for the benchmark's model), each paying dynamo's guards and a kernel launch: the step measured
1.9x fused AdamW on 2 cores. One C call per bucket runs the update in fused AdamW's time (15.3 vs
14.9 ms for 24.4M fp32 parameters, the kernels alone). The step counters (``state["step"]``,
0-dim fp32) and a tensor learning rate are read from their memory by the C code, which also
advances the counters, and a parameter's first step (``v = g^2`` only) is decided per tensor
there: nothing is read on the Python side. ``sum_sq`` is the non-finite guard's one pass over the
gradients (one parallel loop over all of them, about twice as fast here as
``torch._foreach_norm``, which runs one reduction per tensor). The arithmetic follows
``adopt_tensor_update``'s order with torch's vectorised lerp (one fma per lerp) and torch's scalar
roundings (``1 - beta2`` as ``1 - (T)beta2``); ``sqrt`` here is correctly rounded where torch's
CPU ``sqrt`` is not always, so fp32 results differ from the per-tensor path by an ulp on some
elements (~1e-7 relative over many steps), fp64 ones by ~1e-16. The ADOPT results do not depend
on the number of threads (elementwise work; sums of per-block sums added in a fixed order).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from . import loader
from .loader import DBL, I64, INT, PTR, _ok_flag, _pointers, _require, _stream_arrays, function

__all__ = ["SIGNATURES", "adopt_update", "dog_update", "grad_sq", "sum_sq"]

#: The argument types of this family's C functions (each exists as ``NAME_f32`` and ``NAME_f64``).
SIGNATURES: dict[str, list[Any]] = {
    # ntensors, xs, gs, ns, wd, out, nthreads
    "dog_grad_sq": [I64, PTR, PTR, PTR, DBL, PTR, INT],
    # ntensors, xs, gs, x0s, x0_strides, x0_offsets, ns, steps, step_stride, wd, ok, out, nthreads
    "dog_update": [I64, *[PTR] * 7, I64, DBL, PTR, PTR, INT],
    # ntensors, xs, gs, ms, vs, ns, steps, lr_ptr, lr_value, beta1, beta2, eps, weight_decay,
    # coupled_wd, clip exponent, flags, ok, nthreads
    "adopt_update": [I64, *[PTR] * 7, *[DBL] * 7, INT, PTR, INT],
    # ntensors, gs, ns, out, nthreads
    "sum_sq": [I64, PTR, PTR, PTR, INT],
}


def dog_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    x0s: Sequence[torch.Tensor | None],
    steps: torch.Tensor,
    weight_decay: float,
    ok: torch.Tensor,
    out: torch.Tensor,
    *,
    x0_strides: Sequence[int] | None = None,
    x0_offsets: Sequence[int] | None = None,
) -> None:
    """``x <- x - s (g + wd x)`` and ``out[k] <- ||x_k - x0_k||^2`` for every tensor, where the
    0-dim bool ``ok`` is True; nothing is written otherwise. ``steps``: the step size of every
    tensor (1-D, the parameters' dtype) or one for all (0-dim or 1 element); ``out``: fp64, one
    entry per tensor. ``x0s[k]`` None: no stored ``x0``, read as 0 (``out[k] = ||x_k||^2``).
    ``x0_strides[k]`` (default 1 for all) ``q > 1``: ``x0s[k]`` holds the initial values of
    elements ``o, o + q, o + 2q, ...`` of the flattened tensor only (``o = x0_offsets[k]``,
    default 0, ``0 <= o < q``; ``ceil((n - o) / q)`` elements) and ``out[k]`` is the sum over
    those elements (unscaled). Check ``accepts(...)`` on the parameters and gradients first; the
    ``x0`` tensors are checked here."""
    lib = loader._library()
    if not params:
        return
    dtype = params[0].dtype
    fn = function(lib, SIGNATURES, "dog_update", dtype)
    xs_a, gs_a = _stream_arrays([params, grads])
    n = len(params)
    strides = [1] * n if x0_strides is None else [int(q) for q in x0_strides]
    offsets = [0] * n if x0_offsets is None else [int(o) for o in x0_offsets]
    _require(
        len(x0s) == n and len(strides) == n and len(offsets) == n,
        "x0s, x0_strides and x0_offsets: one entry per tensor",
    )
    for p, x0, q, o in zip(params, x0s, strides, offsets, strict=True):
        if x0 is None:
            continue
        _require(q >= 1 and 0 <= o < q, "x0_strides >= 1 and 0 <= x0_offsets < x0_strides")
        want = max(0, -(-(p.numel() - o) // q))
        _require(
            x0.numel() == want,
            "stream 2 does not have its parameters' number of elements (or tensors): an x0 "
            f"holds {x0.numel()}, expected ceil((n - {o}) / {q}) = {want}",
        )
        _require(
            x0.is_contiguous() and x0.is_cpu and x0.dtype == dtype,
            f"stream 2 holds a tensor that is not a contiguous {dtype} CPU tensor",
        )
    x0s_a = (ctypes.c_void_p * n)(*[None if x0 is None else x0.data_ptr() for x0 in x0s])
    strides_a = (ctypes.c_int64 * n)(
        *[0 if x0 is None else q for x0, q in zip(x0s, strides, strict=True)]
    )
    steps = steps.to("cpu", dtype).contiguous()
    _require(steps.numel() in (1, n), "steps: one step size, or one per tensor")
    ok_u8 = ok.to("cpu", torch.uint8).contiguous()
    _require(ok_u8.numel() == 1, "ok must be one flag")
    _require(
        out.dtype == torch.float64 and out.is_cpu and out.is_contiguous()
        and out.numel() == n,
        "out must be a contiguous fp64 CPU tensor with one entry per tensor",
    )  # fmt: skip
    fn(
        n,
        xs_a,
        gs_a,
        x0s_a,
        strides_a,
        (ctypes.c_int64 * n)(*offsets),
        (ctypes.c_int64 * n)(*[p.numel() for p in params]),
        steps.data_ptr(),
        1 if steps.numel() > 1 else 0,
        float(weight_decay),
        ok_u8.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )


def grad_sq(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    weight_decay: float,
    out: torch.Tensor,
) -> None:
    """``out[k] <- [||g_k||^2, ||g_k + wd x_k||^2]`` (``out``: fp64, shape ``(n, 2)``), one
    reduction pass (over ``g`` only when ``weight_decay`` is 0). Check ``accepts(...)`` first."""
    lib = loader._library()
    _require(
        out.dtype == torch.float64 and out.is_cpu and out.is_contiguous()
        and out.shape == (len(params), 2),
        "out must be a contiguous fp64 CPU tensor of shape (tensors, 2)",
    )  # fmt: skip
    if not params:
        return
    fn = function(lib, SIGNATURES, "dog_grad_sq", params[0].dtype)
    xs_a, gs_a = _stream_arrays([params, grads])
    fn(
        len(params),
        xs_a,
        gs_a,
        (ctypes.c_int64 * len(params))(*[p.numel() for p in params]),
        float(weight_decay),
        out.data_ptr(),
        torch.get_num_threads(),
    )


def sum_sq(tensors: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """``out <- sum_k ||t_k||^2`` (0-dim fp64 CPU tensor, written by the C code; nothing is read
    back on the Python side): one pass over every tensor in one parallel loop. Per-block sums in
    the tensors' dtype, added in fp64 in a fixed order (independent of the thread count). Check
    ``available(...)`` first."""
    lib = loader._library()
    _require(
        out.dtype == torch.float64 and out.is_cpu and out.numel() == 1 and out.is_contiguous(),
        "out must be a one-element fp64 CPU tensor",
    )
    n = len(tensors)
    if n == 0:
        out.zero_()
        return
    fn = function(lib, SIGNATURES, "sum_sq", tensors[0].dtype)
    (ts_a,) = _stream_arrays([tensors])
    fn(
        n,
        ts_a,
        (ctypes.c_int64 * n)(*[t.numel() for t in tensors]),
        out.data_ptr(),
        torch.get_num_threads(),
    )


def adopt_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor] | None,
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    ok: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    clip_exponent: float | None,
    maximize: bool,
) -> None:
    """One ADOPT step (``hf_tuningfree.optim.adopt.adopt_tensor_update``) for every tensor of a
    bucket, in one call, where the 0-dim bool ``ok`` is True; nothing is written otherwise.

    ``steps``: each tensor's 0-dim fp32 step counter, read (0: only ``v = g^2``) and incremented
    by the C code; ``lr``: a float or a 0-dim tensor (read from its memory in C; a CPU tensor
    avoids a device copy); ``decoupled``: AdamW-style decay ``x *= 1 - lr wd``, else ``wd x`` is
    added to the gradient; ``exp_avgs`` None (``beta1 == 0``, no first-moment buffer): the update
    is the clipped normalised gradient itself. Check ``accepts(...)`` first (and that ``steps``
    are fp32 on CPU)."""
    lib = loader._library()
    n = len(params)
    if n == 0:
        return
    fn = function(lib, SIGNATURES, "adopt_update", params[0].dtype)
    if exp_avgs is None:
        _require(beta1 == 0.0, "exp_avgs may be None only with beta1 == 0")
        xs_a, gs_a, vs_a = _stream_arrays([params, grads, exp_avg_sqs])
        arrays = [xs_a, gs_a, None, vs_a]
    else:
        arrays = _stream_arrays([params, grads, exp_avgs, exp_avg_sqs])
    _require(
        len(steps) == n and all(s.is_cpu and s.dtype == torch.float32 and s.numel() == 1
                                for s in steps),
        "steps must be one fp32 CPU counter per tensor",
    )  # fmt: skip
    lr_t = None
    if isinstance(lr, torch.Tensor):
        lr_t = lr.detach().to("cpu", torch.float64).contiguous()
        _require(lr_t.numel() == 1, "lr must be one number")
    ok_u8 = _ok_flag(ok)
    flags = (clip_exponent is not None) | (maximize << 1) | ((decoupled and weight_decay != 0) << 2)
    fn(
        n,
        *arrays,
        (ctypes.c_int64 * n)(*[p.numel() for p in params]),
        _pointers(steps),
        None if lr_t is None else lr_t.data_ptr(),
        0.0 if lr_t is not None else float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        0.0 if decoupled else float(weight_decay),
        0.0 if clip_exponent is None else float(clip_exponent),
        int(flags),
        ok_u8.data_ptr(),
        torch.get_num_threads(),
    )
