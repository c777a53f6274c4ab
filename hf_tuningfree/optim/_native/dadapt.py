"""ctypes bindings of the D-Adaptation family and Prodigy (``csrc/dadapt.c``).

The kernels of :mod:`hf_tuningfree.optim.dadapt` (DAdaptSGD, DAdaptAdam, DAdaptAdaGrad) and
:mod:`hf_tuningfree.optim.prodigy`, run by :func:`dadapt_kernel` (:data:`DADAPT_KERNELS` lists
them). Per optimizer a read-only statistics kernel (every model-wide sum of the step: the
numerator's term, ``||s_{k+1}||``, ``||g||^2``), an update kernel, and a fused kernel that computes
the statistics from the state before the step while it updates it, used with the guard's
``||g||^2`` kernel where no collective separates the two (one process, DDP; see
:mod:`hf_tuningfree.optim.dadapt`). Each is one call per bucket, all its tensors split into blocks
in one parallel loop; each block's sums are accumulated in double (as the torch path's
``sum(dtype=float64)``) and the blocks' sums added in block order afterwards, so the sums do not
depend on the thread count. The coefficients (``d``, ``d lr bc``, the betas' complements, ...) are
the 0-dim tensors the torch path computes, stacked into one fp64 tensor whose memory the C code
reads, rounded to the tensors' dtype as torch rounds them; the expressions follow the per-element
functions operation by operation (ISO C: no contraction into fma). Measured on the benchmark's
24.4M parameters, the statistics kernels run at the speed of reading their inputs, and a fused
kernel takes the time of the update plus reading what only the statistics read (Prodigy's
``x0``). Each loop is specialised for its flags (maximize, coupled decay) so that it has no branch
and vectorises (with the branch, GCC 12 left the statistics loops scalar: 20x slower).
"""

from __future__ import annotations

import array as _pyarray
from collections.abc import Sequence
from typing import Any

import torch

from . import loader
from .loader import I64, INT, PTR, _checked_pointers, _require, function

__all__ = ["DADAPT_KERNELS", "DADAPT_OPTIONAL", "DADAPT_SLICED", "SIGNATURES", "dadapt_kernel"]

#: The D-Adaptation/Prodigy kernels: name -> (number of tensor streams, number of float
#: coefficients, number of sums, whether it reads ``ok``). ``*_stats``: a read-only statistics
#: pass; ``*_update``: an update; ``*_fused``: the statistics of the state before the step and
#: the update in one sweep (the update's coefficients; its sums are the statistics pass's but
#: ``||g||^2``, which ``dadapt_grad_sq``, the guard's pass, provides).
DADAPT_KERNELS: dict[str, tuple[int, int, int, bool]] = {
    "dadapt_grad_sq": (1, 0, 1, False),
    "dadapt_adam_stats": (4, 4, 3, False),
    "dadapt_adam_update": (5, 8, 0, True),
    "dadapt_adam_fused": (5, 8, 2, True),
    "prodigy_stats": (4, 3, 3, False),
    "prodigy_update": (5, 9, 0, True),
    "prodigy_fused": (6, 9, 2, True),
    "dadapt_sgd_stats": (3, 2, 4, False),
    "dadapt_sgd_update": (3, 3, 0, True),
    "dadapt_sgd_fused": (3, 3, 3, True),
    "dadapt_sgd_momentum_update": (4, 4, 0, True),
    "dadapt_sgd_momentum_fused": (4, 4, 3, True),
    "dadapt_adagrad_stats": (4, 3, 3, False),
    "dadapt_adagrad_update": (5, 4, 0, True),
    "dadapt_adagrad_fused": (5, 4, 2, True),
    "dadapt_adam_fused_sliced": (5, 8, 2, True),
    "prodigy_fused_sliced": (6, 9, 2, True),
    "dadapt_sgd_fused_sliced": (3, 3, 3, True),
    "dadapt_sgd_momentum_fused_sliced": (4, 4, 3, True),
}

#: The argument types of these C functions (each exists as ``NAME_f32`` and ``NAME_f64``): tensors
#: per stream, the pointers (stream-major), the element counts, the coefficients (fp64), the flags,
#: then ``ok`` where the kernel reads it and the sums' output where it writes sums, the threads.
SIGNATURES: dict[str, list[Any]] = {
    name: [I64, PTR, PTR, PTR, INT, *[PTR] * (int(takes_ok) + int(nsums > 0)), INT]
    for name, (_, _, nsums, takes_ok) in DADAPT_KERNELS.items()
}

#: Streams of a kernel that may hold None (a NULL pointer in C, read as described in
#: ``csrc/dadapt.c``; a per-tensor branch): ``m`` of the Adam-form updates when ``beta1 = 0`` (no
#: first-moment buffer), Prodigy's ``x0`` of a tensor that was all zero at its first step
#: (``implicit_zero_x0``), ``s`` of the updates when ``slice_p > 1`` (``s`` is then updated on
#: the 1/k subsample by torch). Every other stream must hold a tensor.
DADAPT_OPTIONAL: dict[str, frozenset[int]] = {
    "dadapt_adam_update": frozenset({2, 4}),
    "dadapt_adam_fused": frozenset({2}),
    "prodigy_stats": frozenset({3}),
    "prodigy_update": frozenset({2, 4}),
    "prodigy_fused": frozenset({2, 5}),
    "dadapt_sgd_update": frozenset({2}),
    "dadapt_sgd_momentum_update": frozenset({2}),
    "dadapt_adam_fused_sliced": frozenset({2}),
    "prodigy_fused_sliced": frozenset({2, 5}),
}

#: ``slice_p``: the fused kernels whose streams listed here hold only every ``stride``-th element
#: of their tensor (``ceil(n / stride)`` elements, checked); ``stride`` reaches the C code in the
#: flags (``flags >> 8``), from the same Python int the check used.
DADAPT_SLICED: dict[str, frozenset[int]] = {
    "dadapt_adam_fused_sliced": frozenset({4}),
    "prodigy_fused_sliced": frozenset({4, 5}),
    "dadapt_sgd_fused_sliced": frozenset({2}),
    "dadapt_sgd_momentum_fused_sliced": frozenset({2}),
}


def _kernel_pointers(
    name: str, streams: Sequence[Sequence[torch.Tensor | None]], stride: int
) -> list[int]:
    """The addresses for kernel ``name``: :func:`_optional_pointers`, where the streams of
    ``DADAPT_SLICED[name]`` hold ``ceil(n / stride)`` elements of their parameter's ``n``
    (checked here; the parameter stands in for them in the other checks)."""
    sliced = DADAPT_SLICED.get(name, frozenset())
    if not sliced:
        return _optional_pointers(name, streams)
    params = streams[0]
    dtype = params[0].dtype if params else None
    addresses = {}
    for j in sliced:
        _require(len(streams[j]) == len(params), f"{name}: stream {j} has another length")
        for t, p in zip(streams[j], params, strict=True):
            _require(
                t is None or (
                    t.numel() == -(-p.numel() // stride)
                    and t.is_contiguous() and t.is_cpu and t.dtype == dtype
                ),
                f"{name}: stream {j} holds a tensor that is not a contiguous {dtype} CPU "
                f"tensor of ceil(n / {stride}) elements",
            )  # fmt: skip
        addresses[j] = [0 if t is None else t.data_ptr() for t in streams[j]]
    stand_in = [params if j in sliced else s for j, s in enumerate(streams)]
    flat = _optional_pointers(name, stand_in)
    n = len(params)
    for j, ptrs in addresses.items():
        flat[j * n : (j + 1) * n] = ptrs
    return flat


def _optional_pointers(name: str, streams: Sequence[Sequence[torch.Tensor | None]]) -> list[int]:
    """:func:`_checked_pointers` of ``streams`` where the streams of ``DADAPT_OPTIONAL[name]``
    may hold None (address 0); each present tensor is checked against its parameter as the
    others are (a None anywhere else is an error)."""
    optional = DADAPT_OPTIONAL.get(name, frozenset())
    if not any(t is None for stream in streams for t in stream):
        return _checked_pointers(streams)  # type: ignore[arg-type]
    for j, stream in enumerate(streams):
        _require(
            j in optional or all(t is not None for t in stream),
            f"{name}: stream {j} holds None (allowed only in streams {sorted(optional)})",
        )
    filled = [
        [p if t is None else t for p, t in zip(streams[0], stream, strict=True)]
        for stream in streams
    ]  # the parameter stands in for a missing tensor in the checks
    flat = _checked_pointers(filled)  # type: ignore[arg-type]
    n = len(streams[0])
    return [0 if streams[i // n][i % n] is None else ptr for i, ptr in enumerate(flat)]


def dadapt_kernel(
    name: str,
    streams: Sequence[Sequence[torch.Tensor | None]],
    coefficients: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    averaged: bool = False,
    ok: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    stride: int = 1,
) -> None:
    """Run the D-Adaptation/Prodigy kernel ``name`` (a key of :data:`DADAPT_KERNELS`) over every
    tensor of a bucket in one call.

    ``streams``: ``[params, grads, *state lists]`` in the order of the per-element function's
    arguments (a fused kernel: the update's, then any state only the statistics read; equal
    lengths, one dtype, contiguous CPU tensors: check ``accepts`` first; None entries only in
    the streams of :data:`DADAPT_OPTIONAL`); ``coefficients``: the
    pass's float coefficients, in the order of its 0-dim tensor arguments (``ok`` left out), as a
    1-D fp64 CPU tensor, read by the C code from its memory. A statistics or fused kernel writes
    its sums into ``out`` (fp64, one entry each, accumulated in double, the same bits for any
    thread count); an update or fused kernel reads the 0-dim bool ``ok`` from memory and writes
    nothing when it is False (a fused kernel then writes zero sums). ``stride``: the ``slice_p``
    of a kernel of :data:`DADAPT_SLICED` (>= 2), 1 for every other kernel."""
    lib = loader._library()
    nstreams, ncoef, nsums, takes_ok = DADAPT_KERNELS[name]
    _require(
        isinstance(stride, int) and (stride >= 2 if name in DADAPT_SLICED else stride == 1)
        and stride < (1 << 22),
        f"{name} takes stride={'an int >= 2' if name in DADAPT_SLICED else 1}, got {stride!r}",
    )  # fmt: skip
    _require(len(streams) == nstreams, f"{name} takes {nstreams} tensor lists, got {len(streams)}")
    _require(
        coefficients.dtype == torch.float64 and coefficients.is_cpu
        and coefficients.is_contiguous() and coefficients.numel() == ncoef,
        f"{name} takes its {ncoef} coefficients as a contiguous 1-D fp64 CPU tensor",
    )  # fmt: skip
    n = len(streams[0])
    targets = []
    if takes_ok:
        _require(
            ok is not None and ok.is_cpu and ok.dtype in (torch.bool, torch.uint8)
            and ok.numel() == 1,
            f"{name} reads ok: a one-element bool CPU tensor",
        )  # fmt: skip
        targets.append(ok.data_ptr())  # type: ignore[union-attr]
    if nsums:
        _require(
            out is not None and out.dtype == torch.float64 and out.is_cpu
            and out.is_contiguous() and out.numel() == nsums,
            f"{name} writes {nsums} sums into a contiguous fp64 CPU tensor",
        )  # fmt: skip
        targets.append(out.data_ptr())  # type: ignore[union-attr]
    if n == 0:
        if nsums:
            out.zero_()  # type: ignore[union-attr]
        return
    fn = function(lib, SIGNATURES, name, streams[0][0].dtype)
    # array.array: built about twice as fast as a ctypes array from 700 Python ints
    pointers = _pyarray.array("q", _kernel_pointers(name, streams, stride))
    numels = _pyarray.array("q", [t.numel() for t in streams[0]])
    fn(
        n,
        pointers.buffer_info()[0],
        numels.buffer_info()[0],
        coefficients.data_ptr(),
        int(maximize) | (int(coupled) << 1) | (int(averaged) << 2) | (stride << 8),
        *targets,
        torch.get_num_threads(),
    )
