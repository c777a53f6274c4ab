"""DoG's per-tensor functions, path choices and ``x0`` bookkeeping (implicit zero, ``slice_p``).

What :mod:`hf_tuningfree.optim.dog` states as maths, written per tensor and per bucket (the
reference of the C kernels in ``csrc/dog_adopt.c``), with T-DoG's taming factor.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _native
from ..distributed import is_dtensor, local_view
from ..kernels import (
    FUSED_SGD_CPU_DTYPES,
    fast_path_accepts,
)

#: Per-parameter 0-dim statistics kept in their own (fp32/fp64) dtype across ``load_state_dict``
#: (torch casts floating per-parameter state to the parameter's dtype, which would round them to
#: bf16 for bf16 parameters).
_SCALAR_STATE_KEYS = ("dist_sq", "rbar", "G")
#: The streams the C update takes, for its checks' messages.
_STREAMS = ("param", "grad", "x0")


# --------------------------------------------------------------------------- kernels
def dog_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor | None,
    dist_sq: torch.Tensor,
    ok: torch.Tensor,
    step_size: torch.Tensor,
    *,
    weight_decay: float,
    layout: tuple[int, int, float] = (1, 0, 1.0),
) -> None:
    """One tensor's DoG update in place, and the squared distance of the result from ``x0``.

    ``x <- x - step_size * (g + weight_decay * x)`` then ``dist_sq <- ||x - x0||^2`` (summed in
    ``dist_sq``'s dtype, from ``x`` as stored; ``x0`` None: an implicit all-zero ``x0``, the
    distance is ``||x||``; ``layout`` ``(stride, offset, scale)`` with ``stride > 1``: ``x0``
    holds elements ``offset, offset + stride, ...`` of the flattened tensor and the distance is
    estimated from those, times ``scale``: see :class:`DoG`, ``slice_p``). Where ``ok`` is False
    (a NaN/Inf gradient somewhere) nothing changes. The per-tensor ("loop") path, and the
    reference for the others.
    """
    g = torch.where(ok, grad, 0.0)  # a private copy: a skipped step's NaN/Inf never reaches x
    if weight_decay != 0.0:
        g = g.add_(param, alpha=weight_decay)  # coupled decay: the paper's g + wd * x
    param.addcmul_(g, step_size, value=-1.0)
    dist_sq.copy_(torch.where(ok, _distance_sq(param, x0, dist_sq.dtype, layout), dist_sq))


def _distance_sq(
    param: torch.Tensor,
    x0: torch.Tensor | None,
    sdt: torch.dtype,
    layout: tuple[int, int, float] = (1, 0, 1.0),
) -> torch.Tensor:
    """``||param - x0||^2`` (0-dim, summed in ``sdt``); ``x0`` None: ``||param||^2``; a
    subsampled ``x0`` (``layout``'s stride > 1): the scaled sum over the kept elements."""
    stride, offset, scale = layout
    if x0 is None:
        diff = param.to(sdt)
    elif stride == 1:
        diff = param.to(sdt) - x0.to(sdt)
    else:  # a strided view: torch ops only (never handed to the C or fused kernels)
        diff = param.reshape(-1)[offset::stride].to(sdt) - x0.to(sdt)
        return (diff * diff).sum() * scale
    return (diff * diff).sum()


def _fused_sgd_available(params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """Whether torch's fused SGD kernel takes this bucket: fp32/fp64 only, because on CPU (torch
    2.13) it leaves the vectorised part of bf16/fp16 tensors unchanged (``SGD(fused=True)`` has
    the same defect), and only contiguous tensors of their parameters' shapes
    (``fast_path_accepts``: it treats a strided tensor as contiguous memory)."""
    return (
        hasattr(torch, "_fused_sgd_")
        and params[0].device.type in ("cpu", "cuda", "xpu", "mps")
        and fast_path_accepts(
            [params, grads],
            ("param", "grad"),
            dtypes=FUSED_SGD_CPU_DTYPES,  # on every device: 16-bit on GPU is untested here
            cpu_only=False,
        )
    )


def _sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    step_size: torch.Tensor,
    skip: torch.Tensor,
    weight_decay: float,
) -> None:
    """``x <- x - step_size * (g + weight_decay * x)`` for a device/dtype bucket in one
    multi-tensor kernel (torch's fused SGD: reads ``x`` and ``g``, writes ``x``, leaves ``g``
    alone); a nonzero ``skip`` (0-dim fp32) leaves every tensor untouched, decided on the device."""
    torch._fused_sgd_(
        params,
        grads,
        [],
        weight_decay=weight_decay,
        momentum=0.0,
        lr=step_size,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        is_first_step=False,
        grad_scale=None,
        found_inf=skip,
    )


def _foreach_distances(
    params: list[torch.Tensor],
    x0s: list[torch.Tensor | None],
    sdt: torch.dtype,
    layouts: list[tuple[int, int, float]] | None = None,
) -> torch.Tensor:
    """``||x - x0||^2`` of each tensor (a vector), with foreach ops (``x0`` None: ``||x||^2``;
    subsampled ``x0`` (``layouts``): per tensor, as :func:`_distance_sq`)."""
    sliced = [] if layouts is None else [i for i, lay in enumerate(layouts) if lay[0] > 1]
    if sliced:
        out = list(_foreach_distances(
            [p for i, p in enumerate(params) if i not in sliced],
            [x for i, x in enumerate(x0s) if i not in sliced],
            sdt,
        ).unbind(0)) if len(sliced) < len(params) else []  # fmt: skip
        for i in sliced:  # the kept elements, a strided view: torch ops
            out.insert(i, _distance_sq(params[i], x0s[i], sdt, layouts[i]))  # type: ignore[index]
        return torch.stack(out)
    stored = [i for i, x0 in enumerate(x0s) if x0 is not None]
    if len(stored) == len(params):
        norms = torch._foreach_norm(torch._foreach_sub(params, x0s), 2, dtype=sdt)
        return torch.stack(norms).square()
    out: list[torch.Tensor | None] = [None] * len(params)
    if stored:
        diffs = torch._foreach_sub([params[i] for i in stored], [x0s[i] for i in stored])
        for i, n in zip(stored, torch._foreach_norm(diffs, 2, dtype=sdt), strict=True):
            out[i] = n
        del diffs
    implicit = [i for i, x0 in enumerate(x0s) if x0 is None]
    for i, n in zip(implicit, torch._foreach_norm([params[i] for i in implicit], 2, dtype=sdt),
                    strict=True):  # fmt: skip
        out[i] = n
    return torch.stack(out).square()  # type: ignore[arg-type]


def _read_flags(flags: torch.Tensor) -> list[bool]:
    """The one host read of the DoG family, made once at state creation (never in a later
    step): which fresh tensors are not all zero. For CPU tensors the values are already in host
    memory and are read through numpy (no device synchronisation exists to avoid); elsewhere
    ``tolist()`` is one synchronisation, for all the step's fresh tensors at once."""
    if flags.device.type == "cpu":
        return [bool(v) for v in flags.numpy().tolist()]
    return [bool(v) for v in flags.tolist()]


# --------------------------------------------------------------------------- T-DoG
def taming_factor(
    step: torch.Tensor, lbar: torch.Tensor, l0: torch.Tensor, *, delta: float
) -> torch.Tensor:
    """T-DoG's divisor of the DoG step (0-dim tensor, no host reads).

    ``8^4 * theta_{T,delta} * log_+^2(1 + t * lbar_t^2 / l_0^2)`` with ``log_+(z) = 1 + log z``,
    ``theta_{T,delta} = log(60 log(6T) / delta)`` and ``T = t + 1`` steps so far; ``lbar_t`` is
    the largest gradient norm seen up to step ``t`` and ``l_0`` the first one (see :class:`TDoG`).
    """
    t = step.to(lbar.dtype)
    horizon = t + 1.0
    theta = torch.log(60.0 * torch.log(6.0 * horizon) / delta)
    ratio = torch.where(
        l0 > 0, (lbar * lbar) / (l0 * l0).clamp_min(torch.finfo(l0.dtype).tiny), 1.0
    )
    log_plus = 1.0 + torch.log1p(t * ratio)
    return (8.0**4) * theta * log_plus * log_plus


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den`` is 0 (``eps=0`` with only zero gradients so far: no step,
    rather than ``inf * 0 = NaN``)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def _missing(device: torch.device) -> torch.Tensor:
    raise KeyError("DoG global state is incomplete (a checkpoint from another optimizer?)")


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def _x0_source(p: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor a parameter's ``x0`` is taken from (its real view if complex)."""
    local = local_view(p)
    return torch.view_as_real(local) if local.is_complex() else local


def _stored_x0(state: dict[str, Any]) -> torch.Tensor | None:
    """The rank-local stored ``x0`` of a parameter, None where it is implicitly all zero."""
    x0 = state.get("x0")
    return None if x0 is None else local_view(x0)


def _c_takes(
    params: list[torch.Tensor], grads: list[torch.Tensor], x0s: list[torch.Tensor | None]
) -> bool:
    """Whether the C update takes this bucket: parameters and gradients as ``_native.accepts``
    (which raises on a gradient of another shape), every stored ``x0`` a contiguous CPU tensor
    of the parameters' dtype (the base class has checked its shape); implicit ones are NULL."""
    if not _native.accepts([params, grads], _STREAMS[:2]):
        return False
    dtype = params[0].dtype
    return all(x is None or (x.is_cpu and x.dtype == dtype and x.is_contiguous()) for x in x0s)


def _check_slice_p(value: object) -> int:
    """``slice_p`` must be an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid slice_p: {value!r}; allowed: an int >= 1 (1: no subsampling)")
    return value


def _x0_kind(state: dict[str, Any], p: torch.Tensor, sliced: bool) -> str:
    """``"none"`` (implicit zero), ``"sliced"`` (with ``slice_p > 1``: not of the parameter's
    shape; its length is checked in ``_layouts``) or ``"full"`` (anything else: the base class
    checks it has the parameter's shape)."""
    x0 = state.get("x0")
    if x0 is None:
        return "none"
    if not sliced or is_dtensor(x0):
        return "full"
    shape = (torch.view_as_real(p) if p.is_complex() else p).shape
    return "full" if x0.shape == shape else "sliced"


def _slice_geometry(p: torch.Tensor, local_numel: int, k: int) -> tuple[int, float, int]:
    """``(offset, scale, kept)`` of the ``slice_p = k`` subsample of parameter ``p`` (rank-local
    part of ``local_numel`` real elements): the kept elements are those whose index in the
    flattened (whole) tensor is a multiple of ``k``, i.e. local elements ``offset, offset + k,
    ...`` (``kept`` of them), and ``scale = n / ceil(n / k)`` for the whole tensor's ``n``
    elements. A ``DTensor`` sharded on dim 0 only (FSDP2) keeps the same elements as the whole
    tensor would, so the ranks' scaled sums add up to the one-process estimate; other
    placements (and FSDP1 flat shards) subsample each rank's part on its own (offset 0, the
    local ``n``)."""
    n, start = local_numel, 0
    if is_dtensor(p):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape = tuple(p.shape)
        local_shape, offsets = compute_local_shape_and_global_offset(
            p.shape, p.device_mesh, p.placements
        )
        if len(shape) >= 1 and tuple(local_shape[1:]) == shape[1:]:
            row = math.prod(shape[1:]) * (2 if p.is_complex() else 1)
            n, start = p.numel() * (2 if p.is_complex() else 1), offsets[0] * row
    offset = (-start) % k
    kept = max(0, -(-(local_numel - offset) // k))
    total_kept = -(-n // k)
    return offset, (n / total_kept if total_kept else 1.0), kept


def _make_x0(param: torch.Tensor, k: int) -> torch.Tensor:
    """The stored ``x0`` of ``param`` (its real view if complex): a contiguous copy, or with
    ``slice_p = k > 1`` a 1-D rank-local copy of the kept elements (:func:`_slice_geometry`)."""
    if k == 1:
        x0 = param.detach().clone(memory_format=torch.preserve_format)
        return x0 if is_dtensor(x0) or x0.is_contiguous() else x0.contiguous()
    local = local_view(param).detach()
    offset, _, _ = _slice_geometry(param, local.numel(), k)
    return local.reshape(-1)[offset::k].clone()
