"""The D-Adaptation family's pass machinery: ``TensorPass``, the C bridge, slicing and packing
helpers, and the per-element pieces every variant shares (:mod:`hf_tuningfree.optim.dadapt`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import _native
from ..base import (
    GroupBatch,
    bucket_by_device_and_dtype,
    compute_dtype,
)
from ..distributed import is_dtensor, local_view
from ..kernels import (
    CompiledKernel,
)
from ..validation import (
    check_positive,
)

#: ``d_groups``: one estimate of ``d`` for the model, or one per named param group.
D_GROUPS = ("model", "group")


def _scoped(stats: dict[str, torch.Tensor], scope: str) -> dict[str, torch.Tensor]:
    """The reduced sums of one estimate (keys ``name + scope``), under their plain names."""
    out = {}
    for key, value in stats.items():
        name, _, owner = key.partition("@")
        if ("@" + owner if owner else "") == scope:
            out[name] = value
    return out


def check_growth_rate(value: object) -> float:
    """``growth_rate`` is a factor >= 1 (``inf``: unrestricted)."""
    v = check_positive("growth_rate", value, allow_inf=True)
    if v < 1.0:
        raise ValueError(
            f"Invalid growth_rate: {value!r}; allowed: a number >= 1 (inf for no limit): d may "
            "only grow"
        )
    return v


@dataclass(frozen=True)
class TensorPass:
    """One per-tensor pass: ``fn(param, grad, *state[keys], *scalars, **static)`` returns a tuple
    of 0-dim partial sums named ``sums`` (nothing when ``sums`` is empty); ``compiled`` is the same
    function under ``torch.compile``; ``writes`` names what it updates in place (``"param"`` and
    state keys); ``native`` names the C kernel of :mod:`._native` that does the same for every
    tensor of a bucket in one call (None: there is none). An update pass may name a ``fused``
    C kernel that also computes the statistics pass's sums but ``g_sq`` (``fused_sums``) from
    the state before the step, reading ``fused_keys`` after ``keys``. ``optional`` names the
    keys a parameter's state may lack (``fn`` then gets None there, the C kernels a NULL
    pointer: see ``_native.DADAPT_OPTIONAL``). ``sliced`` (update passes, ``slice_p > 1``):
    ``sliced(param, grad, s, *scalars, **static)`` returns the new ``s`` from the kept elements
    of ``param`` and ``grad`` (the update's own expression for ``s``, which the update then
    leaves out)."""

    fn: Callable[..., tuple[torch.Tensor, ...]]
    compiled: CompiledKernel
    keys: tuple[str, ...]
    sums: tuple[str, ...]
    writes: frozenset[str] = frozenset()
    native: str | None = None
    fused: str | None = None
    fused_keys: tuple[str, ...] = ()
    fused_sums: tuple[str, ...] = ()
    optional: frozenset[str] = frozenset()
    sliced: Callable[..., torch.Tensor] | None = None


def _pass(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    name: str,
    keys: tuple[str, ...],
    sums: tuple[str, ...],
    writes: tuple[str, ...] = (),
    native: str | None = None,
    fused: str | None = None,
    fused_keys: tuple[str, ...] = (),
    fused_sums: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    sliced: Callable[..., torch.Tensor] | None = None,
) -> TensorPass:
    compiled = CompiledKernel(fn, name)
    return TensorPass(
        fn,
        compiled,
        keys,
        sums,
        frozenset(writes),
        native,
        fused,
        fused_keys,
        fused_sums,
        frozenset(optional),
        sliced,
    )


def check_slice_p(value: object) -> int:
    """``slice_p`` is an integer >= 1 (1: statistics over every element)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Invalid slice_p: {value!r}; allowed: an integer >= 1 (statistics on every "
            "slice_p-th element of each tensor; 1: every element)"
        )
    return value


def _kept(t: torch.Tensor, k: int) -> torch.Tensor:
    """Elements ``0, k, 2k, ...`` of contiguous ``t`` flattened (a strided view for torch ops
    only: never handed to the C kernels)."""
    return t.reshape(-1)[::k]


def _kept_count(n: int, k: int) -> int:
    return -(-n // k)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


_VARIANTS: dict[tuple[int, tuple[int, ...], int], CompiledKernel] = {}


def _compiled_without(
    kernel: CompiledKernel, missing: tuple[int, ...], ntensors: int
) -> CompiledKernel:
    """``kernel`` for a call whose tensors at positions ``missing`` are None: a compiled
    function of the present tensors that puts None back in its place (one compilation per
    pattern; ``CompiledKernel`` itself takes tensors only)."""
    key = (id(kernel), missing, ntensors)
    variant = _VARIANTS.get(key)
    if variant is None:
        fn = kernel.fn
        present = ntensors - len(missing)

        def without(*args: Any, **kwargs: Any) -> Any:
            tensors: list[Any] = list(args[:present])
            for i in missing:
                tensors.insert(i, None)
            return fn(*tensors, *args[present:], **kwargs)

        variant = _VARIANTS[key] = CompiledKernel(without, f"{kernel.name} without {missing}")
    return variant


def _column(gb: GroupBatch, key: str, optional: frozenset[str]) -> list[Any]:
    """``state[key]`` of every parameter of the batch (rank-local views); None where an
    ``optional`` key is missing."""
    if key not in optional:
        return gb.state_list(key)
    return [local_view(st[key]) if key in st else None for st in gb.states]


def _native_accepts(bucket: list[list[Any]], names: list[str]) -> bool:
    """``_native.accepts`` of a bucket whose optional streams may hold None (the parameter
    stands in for a missing tensor in the checks; the kernel gets a NULL pointer there)."""
    if any(t is None for stream in bucket for t in stream):
        params = bucket[0]
        bucket = [
            [p if t is None else t for p, t in zip(params, stream, strict=True)]
            for stream in bucket
        ]
    return _native.accepts(bucket, names)


def _host_flags(flags: list[torch.Tensor]) -> list[bool]:
    """The values of 0-dim bool tensors, read on the host in one device-to-host copy per
    device: the ONE host read of the D-Adaptation family, made only at the step that creates a
    parameter's state (never in a step that creates none). Read through the copied storage, so
    that the per-step no-host-read checks (which patch ``Tensor.item``/``__bool__``...) keep
    guarding every other step."""
    out: list[bool] = [False] * len(flags)
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    for idx in by_device.values():
        host = torch.stack([flags[i] for i in idx]).to("cpu", torch.uint8)
        for i, byte in zip(idx, bytes(host.untyped_storage()), strict=True):
            out[i] = bool(byte)
    return out


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _buckets(
    lists: list[list[torch.Tensor]],
) -> list[tuple[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]]]:
    """``lists`` split by the first list's device and dtype; in the common case of one device
    and dtype, ``lists`` itself without rebuilding it."""
    ref = lists[0][0]
    device, dtype = ref.device, ref.dtype
    if all(t.dtype == dtype and t.device == device for t in lists[0]):
        return [((device, dtype), lists)]
    return [(key, bucket) for key, (bucket, _) in bucket_by_device_and_dtype(lists).items()]


def _run_native(
    kernel: str,
    nsums: int,
    bucket: list[list[Any]],
    scalars: list[torch.Tensor],
    static: dict[str, Any],
    stride: int = 1,
) -> torch.Tensor | None:
    """The C ``kernel`` over a whole bucket in one call: the pass's 0-dim coefficients go to the
    C code as one fp64 tensor (read from its memory there, like ``ok``: no host read); returns the
    bucket's ``nsums`` sums (fp64), or None when there are none (an update). ``stride``: the
    ``slice_p`` of a ``*_sliced`` kernel."""
    ok = next((a for a in scalars if a.dtype == torch.bool), None)
    floats = [a.to("cpu", torch.float64) for a in scalars if a is not ok]
    coefficients = torch.stack(floats) if floats else torch.zeros(0, dtype=torch.float64)
    out = torch.empty(nsums, dtype=torch.float64) if nsums else None
    _native.dadapt_kernel(
        kernel,
        bucket,
        coefficients,
        maximize=static["maximize"],
        coupled=static["coupled"],
        averaged=static.get("averaged", False),
        ok=None if ok is None else ok.to("cpu"),
        out=out,
        stride=stride,
    )
    return out


def _state_streams(gb: Any) -> list[tuple[list[list[torch.Tensor]], list[str]]]:
    """The group's tensors as the C path's checks take them (``gb.params``/``gb.grads`` are
    rank-local already; state tensors are made so): ``[params, grads, *state lists]`` when every
    parameter has the same state keys, else ``[params, grads]`` and, for each state key,
    ``[params that have it, their state under it]`` (a parameter at its first step may lack a key
    the update creates, e.g. DAdaptSGD's ``z``)."""
    states = gb.states
    sharded = any(map(is_dtensor, gb.originals))

    def local(tensors: list[Any]) -> list[Any]:
        return [local_view(t) for t in tensors] if sharded else tensors

    keys = states[0].keys()
    if all(map(keys.__eq__, map(dict.keys, states))):  # the common case, in C-level loops
        lists = [local(list(map(operator.itemgetter(k), states))) for k in keys]
        return [([gb.params, gb.grads, *lists], ["param", "grad", *keys])]
    out = [([gb.params, gb.grads], ["param", "grad"])]
    for key in dict.fromkeys(k for st in states for k in st):
        pairs = [(p, st[key]) for p, st in zip(gb.params, states, strict=True) if key in st]
        out.append(([[p for p, _ in pairs], local([t for _, t in pairs])], ["param", key]))
    return out


def _pack(tensors: list[Any], params: list[torch.Tensor]) -> torch.Tensor | None:
    """The small tensors of one stream as one flat tensor: None if every one is missing (an
    optional state nobody has), zeros in the place of a missing one among present ones (a
    missing optional state is read as zero, e.g. an implicit ``x0``)."""
    if all(t is None for t in tensors):
        return None
    return torch.cat(
        [
            (torch.zeros_like(p) if t is None else t).reshape(-1)
            for t, p in zip(tensors, params, strict=True)
        ]
    )


# ---------------------------------------------------------------------- shared kernel pieces
def effective_grad(
    grad: torch.Tensor,
    param: torch.Tensor,
    coupled_wd: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient in the compute dtype, sign-flipped for ``maximize``, with the coupled (L2)
    weight-decay term when ``coupled``; the parameter in the compute dtype). ``coupled`` is a
    compile-time flag: reading the parameter into the gradient costs a separate pass in the
    compiled kernels, so it is only done when coupled decay is on."""
    cdt = compute_dtype(param.dtype)
    g = grad.to(cdt)
    if maximize:
        g = -g
    p = param.to(cdt)
    if coupled:
        g = g + coupled_wd * p
    return g, p


def _total(x: torch.Tensor, acc64: bool) -> torch.Tensor:
    """``x.sum()``, accumulated in fp64 when ``acc64`` (on CPU: Inductor sums fp32 with a cascade
    helper that made these reductions ~1.6x slower than an fp64 accumulator, which is also the
    more accurate of the two)."""
    return x.sum(dtype=torch.float64) if acc64 else x.sum()


def _sq_sum(grad: torch.Tensor, acc64: bool) -> torch.Tensor:
    g = grad.to(compute_dtype(grad.dtype))
    return _total(g * g, acc64)


def _d_update(
    d: torch.Tensor, d_hat: torch.Tensor, valid: torch.Tensor, growth_rate: float
) -> torch.Tensor:
    """``max(d, min(d_hat, growth_rate * d))`` where ``valid``, else ``d`` (no host read)."""
    capped = d_hat if math.isinf(growth_rate) else torch.minimum(d_hat, d * growth_rate)
    return torch.where(valid, torch.maximum(d, capped), d)


def _weight_decay_scalars(group: dict[str, Any], rate: torch.Tensor) -> list[torch.Tensor]:
    """``[coupled coefficient, decoupled factor rate * wd]`` of a group (one of them 0)."""
    wd = group["weight_decay"]
    decoupled = group.get("decoupled_weight_decay", False)
    coupled = _scalar(0.0 if decoupled else wd, rate)
    return [coupled, rate * (wd if decoupled else 0.0)]


def _flags(group: dict[str, Any]) -> dict[str, bool]:
    coupled = group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False)
    return {"maximize": group["maximize"], "coupled": coupled}


# ====================================================================== SGD
