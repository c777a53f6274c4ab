"""ctypes bindings of the hypergradient optimizers (``csrc/hypergradient.c``).

HyperSGD, HyperAdam, HyperAdaGrad, HyperRMSProp (:mod:`hf_tuningfree.optim.hypergradient`):
``hyper_direction_dots``, ``hyper_adam_dots``, ``hyper_*_update``. A step is two passes, each one
call per bucket with the blocks of all its tensors in one parallel loop: first the read-only pass
that forms every tensor's hypergradient dot products ``<g, du/dh>`` (SGD: with the momentum
buffer; AdaGrad, RMSProp: with the stored direction; Adam: with ``m / (sqrt(v) c + eps)``
recomputed from the moments and the step counters), which is also the non-finite check; then,
after the tower has moved the step size (0-dim tensors, torch ops), the base update, which reads
the learned step size (and a learned momentum or decay), the step counters and ``ok`` from memory.
The dots are formed in double (products and sums), per block, the blocks of a tensor added in a
fixed order: like the updates (elementwise), they do not depend on the thread count. The updates
follow the per-element functions' order of operations, with the scalars that torch forms from
0-dim tensors rounded in those tensors' dtype and no fma contraction: SGD's update is
bit-identical to the per-tensor path; Adam, AdaGrad and RMSProp differ by the rounding of ``sqrt``
(and Adam's bias corrections by that of ``pow``): ~1e-7 relative in fp32. HyperAdam with learned
betas keeps its torch paths. ``hyper_addresses`` checks a bucket and takes its tensors' addresses
in one pass, once per step for both passes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from . import loader
from .loader import (
    DBL,
    I64,
    INT,
    PTR,
    _numel,
    _ok_flag,
    _pointers,
    _require,
    _stream_arrays,
    accepts,
    function,
)

__all__ = [
    "SIGNATURES",
    "Addresses",
    "Tensors",
    "hyper_adagrad_update",
    "hyper_adam_dots",
    "hyper_adam_update",
    "hyper_addresses",
    "hyper_direction_dots",
    "hyper_rmsprop_update",
    "hyper_sgd_update",
]

#: The argument types of this family's C functions (each exists as ``NAME_f32`` and ``NAME_f64``).
SIGNATURES: dict[str, list[Any]] = {
    "hg_direction_dots": [I64, PTR, PTR, I64, PTR, PTR, INT],
    "hg_adam_dots": [I64, PTR, PTR, PTR, PTR, PTR, PTR, DBL, DBL, DBL, PTR, INT],
    "hg_sgd_update": [I64, PTR, PTR, PTR, PTR, PTR, PTR, PTR, INT, DBL, INT, PTR, INT],
    "hg_adam_update": [I64, *[PTR] * 7, INT, DBL, DBL, DBL, DBL, INT, PTR, INT],
    "hg_adagrad_update": [I64, PTR, PTR, PTR, PTR, PTR, PTR, INT, DBL, DBL, INT, PTR, INT],
    "hg_rmsprop_update": [I64, *[PTR] * 8, INT, DBL, DBL, INT, PTR, INT],
}


class Addresses:
    """A list of tensors as the C code takes it: their addresses and element counts, read once
    (``hyper_addresses``) and handed to both passes of a step. The tensors must stay alive and
    in place while it is used (it holds a reference to the list)."""

    __slots__ = ("array", "dtype", "numels", "tensors")

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        array: ctypes.Array,
        numels: ctypes.Array | None,
        dtype: torch.dtype,
    ) -> None:
        self.tensors, self.array, self.numels, self.dtype = tensors, array, numels, dtype

    def __len__(self) -> int:
        return len(self.tensors)


#: A kernel argument: a list of tensors, or its ``Addresses`` taken earlier in the step.
Tensors = Sequence[torch.Tensor] | Addresses


def hyper_addresses(
    lists: Sequence[Sequence[torch.Tensor]],
    counters: Sequence[Sequence[torch.Tensor]] = (),
    names: Sequence[str] | None = None,
) -> list[Addresses] | None:
    """Check a bucket for the C path and take its addresses, in one pass over its tensors.

    ``lists``: parallel lists (parameters first, then gradients and state, named by ``names``
    in errors) that must pass :func:`accepts`; ``counters``: lists of 0-dim fp32 CPU tensors
    (step counters). Returns one ``Addresses`` per list (``lists`` then ``counters``), or None if
    the C path cannot take them or the library is unavailable; a tensor whose shape differs from
    its parameter's raises :class:`~hf_tuningfree.optim.kernels.StateShapeError`."""
    if not lists or not lists[0]:
        return None
    if names is None:
        names = ["param", "grad", *(f"state list {j}" for j in range(2, len(lists)))]
        names = names[: len(lists)]
    if not accepts(lists, names):
        return None
    dtype = lists[0][0].dtype
    sizes = list(map(_numel, lists[0]))
    numels = (ctypes.c_int64 * len(sizes))(*sizes)
    out = []
    for tensors in lists:
        array = (ctypes.c_void_p * len(sizes))(*[t.data_ptr() for t in tensors])
        out.append(Addresses(tensors, array, numels, dtype))
    for tensors in counters:
        ptrs = []
        if len(tensors) != len(sizes):
            return None
        for t in tensors:
            if not (t.is_cpu and t.dtype == torch.float32 and t.numel() == 1):
                return None
            ptrs.append(t.data_ptr())
        array = (ctypes.c_void_p * len(ptrs))(*ptrs)
        out.append(Addresses(tensors, array, None, torch.float32))
    return out


def _dtype(tensors: Tensors) -> torch.dtype:
    return tensors.dtype if isinstance(tensors, Addresses) else tensors[0].dtype


def _bucket_arrays(*lists: Tensors | None) -> tuple[list[ctypes.Array | None], ctypes.Array]:
    """The pointer arrays of a kernel's tensor arguments (None stays None) and the element counts
    of the first. ``Addresses`` (checked by ``hyper_addresses``) are used as they are; plain
    lists go through :func:`_checked_pointers` with the others, so that a direct call cannot hand
    C a tensor shorter than its parameter or a strided one."""
    present = [t for t in lists if t is not None]
    n = len(present[0])
    _require(all(len(t) == n for t in present), "every tensor list must be as long as the first")
    if all(isinstance(t, Addresses) for t in present) and present[0].numels is not None:
        return [None if t is None else t.array for t in lists], present[0].numels  # type: ignore[union-attr]
    plain = [t.tensors if isinstance(t, Addresses) else t for t in present]
    arrays = iter(_stream_arrays(plain))
    numels = (ctypes.c_int64 * n)(*map(_numel, plain[0]))
    return [None if t is None else next(arrays) for t in lists], numels


def _hyper_scalar(t: torch.Tensor) -> int:
    """Address of a 0-dim fp32/fp64 CPU tensor (a learned hyperparameter, read by the C code)."""
    _require(
        t.is_cpu and t.numel() == 1 and t.dtype in (torch.float32, torch.float64),
        "a learned hyperparameter must be a one-element fp32/fp64 CPU tensor",
    )
    return t.data_ptr()


#: ``flags`` bit of the update kernels: ``lr`` holds one step size per tensor (``per_tensor``).
LR_PER_TENSOR = 4


def _step_sizes(lr: torch.Tensor, n: int) -> tuple[int, int]:
    """Address of the step size(s) of an update and the flag bit saying which: a 0-dim fp32/fp64
    CPU tensor (one for every tensor of the bucket) or a contiguous vector of ``n`` (one each,
    in the bucket's order)."""
    if lr.dim() == 0 or lr.numel() == 1:
        return _hyper_scalar(lr), 0
    _require(
        lr.is_cpu and lr.dim() == 1 and lr.numel() == n and lr.is_contiguous()
        and lr.dtype in (torch.float32, torch.float64),
        "per-tensor step sizes must be a contiguous fp32/fp64 CPU vector, one per tensor",
    )  # fmt: skip
    return lr.data_ptr(), LR_PER_TENSOR


def _counters(steps: Tensors, n: int) -> ctypes.Array:
    """The addresses of ``n`` fp32 CPU step counters (checked unless taken by
    ``hyper_addresses``)."""
    if isinstance(steps, Addresses):
        _require(len(steps) == n and steps.dtype == torch.float32, "one fp32 counter per tensor")
        return steps.array
    _require(
        len(steps) == n and all(s.is_cpu and s.dtype == torch.float32 and s.numel() == 1
                                for s in steps),
        "steps must be one fp32 CPU counter per tensor",
    )  # fmt: skip
    return _pointers(steps)


def _out_check(out: torch.Tensor, shape: tuple[int, int]) -> None:
    _require(
        out.dtype == torch.float64 and out.is_cpu and out.is_contiguous() and out.shape == shape,
        f"out must be a contiguous fp64 CPU tensor of shape {shape}",
    )


def hyper_direction_dots(grads: Tensors, stored: Sequence[Tensors], out: torch.Tensor) -> None:
    """``out[k, j] <- <g_k, D_j[k]>`` for every tensor ``k`` of a bucket and every list ``D_j``
    of ``stored`` (one or two: the stored derivatives of the last update), one parallel pass over
    all gradients. ``out``: fp64 CPU, shape ``(len(grads), len(stored))``. Products and sums in
    fp64, per block of ``BLOCK`` elements, added in a fixed order (independent of the thread
    count); a NaN/Inf gradient element makes its tensor's entries NaN/Inf. Lists of tensors or
    their ``Addresses``; check ``accepts(...)`` (or take ``hyper_addresses``) first."""
    n, nd = len(grads), len(stored)
    _require(nd in (1, 2), "one or two lists of stored derivatives")
    _out_check(out, (n, nd))
    if n == 0:
        return
    (g_a, *arrays), numels = _bucket_arrays(grads, *stored)
    ds = arrays[0] if nd == 1 else (ctypes.c_void_p * (2 * n))()
    if nd == 2:  # tensor-major: ds[2k + j]
        ds[0::2], ds[1::2] = arrays[0], arrays[1]
    function(loader._library(), SIGNATURES, "hg_direction_dots", _dtype(grads))(
        n, g_a, ds, nd, numels, out.data_ptr(), torch.get_num_threads()
    )


def hyper_adam_dots(
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    params: Tensors | None,
    steps: Tensors,
    out: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """HyperAdam's dots for every tensor ``k`` of a bucket (``_adam_dots`` with a learned step
    size and fixed betas), one parallel pass: ``out[k, 0] <- <g, mhat / (sqrt(vhat) + eps)>`` of
    the last update (bias corrections from the fp32 step counters ``steps``, read in C) and, when
    ``params`` is given, ``out[k, 1] <- <g, x>``. ``out``: fp64 CPU, ``(len(grads), 1 or 2)``.
    Check ``accepts(...)`` first (and that ``steps`` are fp32 CPU tensors)."""
    n = len(grads)
    _out_check(out, (n, 1 if params is None else 2))
    if n == 0:
        return
    arrays, numels = _bucket_arrays(grads, exp_avgs, exp_avg_sqs, params)
    function(loader._library(), SIGNATURES, "hg_adam_dots", _dtype(grads))(
        n, *arrays, numels, _counters(steps, n), float(beta1), float(beta2), float(eps),
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip


def hyper_sgd_update(
    params: Tensors,
    grads: Tensors,
    bufs: Tensors,
    prevs: Tensors | None,
    ok: torch.Tensor,
    *,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    weight_decay: float,
    maximize: bool,
) -> None:
    """HyperSGD's update (``_sgd_update``) of every tensor of a bucket where the 0-dim bool
    ``ok`` is True: ``buf <- momentum buf + (g + wd x)``, ``x <- x - lr buf`` (and ``prev <-``
    the old ``buf`` when ``prevs`` is given: learned momentum). ``lr``, ``momentum``: 0-dim CPU
    tensors of one dtype, read from memory by the C code (``lr`` may instead hold one step size
    per tensor, :func:`_step_sizes`). Check ``accepts(...)`` first."""
    n = len(params)
    if n == 0:
        return
    _require(lr.dtype == momentum.dtype, "lr and momentum must have one dtype")
    arrays, numels = _bucket_arrays(params, grads, bufs, prevs)
    lr_ptr, per_tensor = _step_sizes(lr, n)
    function(loader._library(), SIGNATURES, "hg_sgd_update", _dtype(params))(
        n, *arrays, numels, lr_ptr, _hyper_scalar(momentum),
        int(lr.dtype == torch.float64), float(weight_decay), int(bool(maximize)) | per_tensor,
        _ok_flag(ok).data_ptr(), torch.get_num_threads(),
    )  # fmt: skip


def hyper_adam_update(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    steps: Tensors,
    ok: torch.Tensor,
    *,
    lr: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
) -> None:
    """HyperAdam's update with fixed betas (``_adam_update``) of every tensor of a bucket where
    the 0-dim bool ``ok`` is True; the fp32 step counters ``steps`` are read and then advanced by
    the C code. ``lr``: 0-dim CPU tensor (the learned step size times the schedule multiplier),
    or one per tensor (:func:`_step_sizes`), read from memory; ``1 - beta`` and
    ``lr * weight_decay`` are rounded in its dtype, as the torch path rounds them. Check
    ``accepts(...)`` first."""
    n = len(params)
    if n == 0:
        return
    lr_ptr, per_tensor = _step_sizes(lr, n)
    flags = int(bool(maximize)) | (int(bool(decoupled)) << 1) | per_tensor
    arrays, numels = _bucket_arrays(params, grads, exp_avgs, exp_avg_sqs)
    function(loader._library(), SIGNATURES, "hg_adam_update", _dtype(params))(
        n, *arrays, numels, _counters(steps, n), lr_ptr,
        int(lr.dtype == torch.float64), float(beta1), float(beta2), float(eps),
        float(weight_decay), flags, _ok_flag(ok).data_ptr(), torch.get_num_threads(),
    )  # fmt: skip


def hyper_adagrad_update(
    params: Tensors,
    grads: Tensors,
    sums: Tensors,
    directions: Tensors | None,
    ok: torch.Tensor,
    *,
    lr: torch.Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """HyperAdaGrad's update (``_adagrad_update``) of every tensor of a bucket where ``ok``:
    ``G += g^2``, ``x -= lr g / (sqrt(G) + eps)``, the direction kept when ``directions`` is
    given. ``lr``: 0-dim CPU tensor read from memory (or one per tensor: :func:`_step_sizes`).
    Check ``accepts(...)`` first."""
    n = len(params)
    if n == 0:
        return
    arrays, numels = _bucket_arrays(params, grads, sums, directions)
    lr_ptr, per_tensor = _step_sizes(lr, n)
    function(loader._library(), SIGNATURES, "hg_adagrad_update", _dtype(params))(
        n, *arrays, numels, lr_ptr, int(lr.dtype == torch.float64), float(eps),
        float(weight_decay), int(bool(maximize)) | per_tensor, _ok_flag(ok).data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip


def hyper_rmsprop_update(
    params: Tensors,
    grads: Tensors,
    square_avgs: Tensors,
    directions: Tensors | None,
    d_decays: Tensors | None,
    ok: torch.Tensor,
    *,
    lr: torch.Tensor,
    decay: torch.Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """HyperRMSProp's update (``_rmsprop_update``) of every tensor of a bucket where ``ok``:
    ``v = rho v + (1 - rho) g^2``, ``x -= lr g / (sqrt(v) + eps)``, the direction and
    ``d direction / d rho`` kept when given. ``lr``, ``decay``: 0-dim CPU tensors of one dtype,
    read from memory (``lr`` may hold one per tensor: :func:`_step_sizes`). Check
    ``accepts(...)`` first."""
    n = len(params)
    if n == 0:
        return
    _require(lr.dtype == decay.dtype, "lr and decay must have one dtype")
    arrays, numels = _bucket_arrays(params, grads, square_avgs, directions, d_decays)
    lr_ptr, per_tensor = _step_sizes(lr, n)
    function(loader._library(), SIGNATURES, "hg_rmsprop_update", _dtype(params))(
        n, *arrays, numels, lr_ptr, _hyper_scalar(decay), int(lr.dtype == torch.float64),
        float(eps), float(weight_decay), int(bool(maximize)) | per_tensor,
        _ok_flag(ok).data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
