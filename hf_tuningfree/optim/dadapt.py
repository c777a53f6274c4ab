"""D-Adaptation: SGD, Adam and AdaGrad whose step size is learned from the run itself.

Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023 (arXiv:2301.07733).

Every variant keeps ONE scalar ``d`` for the whole model: a lower bound on the distance
``D = ||x0 - x*||`` from the initial point to a solution, which starts at ``d0`` and never
decreases. It is read off a weighted sum of past gradients ``s``::

    d_hat = <weighted sum of lambda_i <g_i, s_i>> / ||s||      (a lower bound on D, convex case)
    d     = max(d, min(d_hat, growth_rate * d))

and the step is ``d * lr`` (``lr`` is a multiplier, default 1.0, that schedules and warm-up act
on). The three variants differ in the weighting and the norm; the class docstrings state each
rule as math.

How a step runs (the phases of :mod:`hf_tuningfree.optim.base`)::

    statistics  one read-only pass per tensor, before anything changes, returns this rank's
                contributions to every model-wide sum of the step: ``||g||^2`` (the non-finite
                guard; SGD's ``||g_0||``), the numerator terms, which the papers define on the
                state BEFORE the update (``<g_k, s_k>`` and its variants), and the norm of the
                UPDATED ``s``. The last one needs no second pass: ``s_{k+1}`` is an elementwise
                function of ``s_k``, ``g_k`` and scalars that are all known before the step
                (``d_k``, ``lr``, the bias correction), so the pass evaluates it without storing
                it. The sums go through the base's single stacked all-reduce
                (``_local_statistics``): ONE collective per step when the parameters are sharded
                (FSDP2 / FSDP1 / ``global_reduce``), none under DDP or in one process; every rank
                reaches it, also one whose shard received no gradient.
    update      one pass per tensor updates the state and the parameters with this step's ``d``
                (pure elementwise: nothing is reduced, so the compiled loop runs in place), then
                ``d`` is updated from the reduced sums.

Where no collective is made (one process, DDP) and the C kernels take every group (below), a
step runs in a FUSED form with the same results::

    guard       one read of the gradients: ``||g||^2`` per group, the non-finite guard's sum
                (and SGD's ``||g_0||``); a NaN/Inf anywhere still cancels the step before the
                first write;
    update      one C kernel per group computes the other sums from the state before the step
                while it updates that state (``_fused_update``), then ``d`` as above.

Every sum is an elementwise function of the old state, the gradient and scalars known before the
step, so evaluating it inside the update changes nothing but the memory traffic: the statistics
pass reads ``g`` and most of the state a second time (DAdaptAdam: ``g, v, s``; Prodigy: ``x, g,
s, x0``), the guard reads only ``g``. Sharded runs keep the two passes, because the sums must be
reduced across ranks in the step's one collective before ``d`` is updated. Both forms evaluate
the same expressions over the same blocks (tests/test_dadapt_native.py: equal to rounding of the
fp64 sums, bit-identical as measured).

Nothing in ``step()`` reads a device value on the host: ``d``, the numerator and the step counter
are 0-dim tensors in ``self.global_state`` (saved with the optimizer's state dict). The one
exception is Prodigy's ``implicit_zero_x0``: one batched read, at the step that creates a
parameter's state, of whether each new tensor is all zero.

Memory options (issue 17; the class docstrings give each one's effect on ``d``): ``betas[0] = 0``
keeps no first-moment buffer (DAdaptAdam, Prodigy); ``slice_p = k`` stores ``s`` (and Prodigy's
``x0``) on every k-th element only, the estimate's sums taken there (DAdaptSGD, DAdaptAdam,
Prodigy, schedule-free Prodigy; not AdaGrad, whose ``s`` is part of its iterate); Prodigy's
``implicit_zero_x0`` (on) stores no ``x0`` for tensors that start at zero. State per fp32
element: DAdaptAdam 12 bytes, 8 with ``beta1 = 0``, 4 + 4/k with ``slice_p = k`` as well;
Prodigy 16, 12, 4 + 8/k (LoRA's zero B: 4 less each, 4 + 4/k); DAdaptSGD 4 (8 with momentum),
4/k (4 + 4/k).

Code paths. Each pass is one function of one tensor and its state, run eagerly (``"loop"``, the
reference) or compiled (``"compiled"`` on GPU: one fused Triton loop per tensor, see
:mod:`hf_tuningfree.optim.kernels`). Every per-step coefficient enters those functions as a 0-dim
tensor computed outside them, so one compiled kernel serves every hyperparameter value and
schedule; only booleans (``maximize``, coupled weight decay, momentum on/off) select variants. On
CPU (fp32/fp64 contiguous tensors), ``"auto"`` and ``"compiled"`` run each pass (or the fused
update) as C loops of :mod:`hf_tuningfree.optim._native`, ONE call per group for all its tensors:
the ``torch.compile``d kernel made one call per tensor (147 for the benchmark's model), each
paying dynamo's guards, and two passes over memory, and measured 1.7-2.7x fused AdamW; the C path
measures 1.0-1.9x (README "Step time"). The C code reads the coefficients and ``ok`` from tensor
memory (no host read) and follows the per-element functions operation by operation: results
match the loop path to rounding (its sqrt is correctly rounded, torch's vectorised CPU sqrt not
always: ~1e-7 relative in fp32, ~1e-16 in fp64; DAdaptSGD, without a sqrt, bit-identical in the
tests). Without a C compiler (one warning), for 16-bit parameters and on GPUs the torch paths run.

Hyperparameters that define the model-wide estimate (``d0``, ``growth_rate``, ``betas`` of the
Adam variants' ``s``, ...) must be equal in every param group (checked); ``lr``, weight decay,
``eps``, momentum and ``maximize`` may differ per group. A group's ``lr`` scales both its step and
its contribution to the estimate, so ``lr = 0`` freezes a group and keeps it out of ``d``.
Parameters without a gradient in a step keep their ``s``, and it still counts in ``||s||`` (the
authors' code leaves them out of the norm for that step, which can raise ``d`` for good).
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from . import _native
from .base import (
    GroupBatch,
    StepBatch,
    TuningFreeOptimizer,
    _state_shapes,
    bucket_by_device_and_dtype,
    compute_dtype,
    real_dtype,
)
from .distributed import is_dtensor, local_view, plan_reduction
from .kernels import (
    IMPL_ENV_VAR,
    IMPLEMENTATIONS,
    CompiledKernel,
    order_for_compile,
    resolve_implementation,
)
from .validation import (
    check_betas,
    check_bool,
    check_choice,
    check_in_range,
    check_nonnegative,
    check_positive,
)

__all__ = [
    "DAdaptAdaGrad",
    "DAdaptAdam",
    "DAdaptSGD",
    "DAdaptationBase",
    "TensorPass",
    "dadapt_adagrad_statistics",
    "dadapt_adagrad_tensor_update",
    "dadapt_adam_statistics",
    "dadapt_adam_tensor_update",
    "dadapt_sgd_statistics",
    "dadapt_sgd_tensor_update",
]


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


def _wants_native(requested: str, device: torch.device, numel: int) -> bool:
    """Whether a bucket should try the C kernels of :mod:`._native`: on CPU for ``"compiled"``,
    and for ``"auto"`` at every size (a one-off ~1 s build per machine, not a compilation per
    process) unless ``HF_TUNINGFREE_IMPL`` overrides ``"auto"`` (as for ADOPT)."""
    if device.type != "cpu":
        return False
    if requested == "auto" and not os.environ.get(IMPL_ENV_VAR, "").strip():
        return True
    return resolve_implementation(requested, device, numel) == "compiled"


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


class DAdaptationBase(TuningFreeOptimizer):
    """What the D-Adaptation family (and Prodigy) share: the model-wide ``d`` and step counter in
    ``global_state``, the statistics and update passes over (packed) tensors, and the checks that
    model-wide hyperparameters agree across groups.

    A subclass sets ``_MODEL_WIDE`` (group keys that must agree) and implements:

    * ``_statistics_pass(gb, d, step)``: ``(TensorPass, scalars, static)`` of the read-only pass
      whose first sum is ``g_sq`` (``||g||^2`` of the raw gradient);
    * ``_combine_statistics(batch, per_group, d, step)``: this rank's sums from the per-group
      sums of that pass (plus ``_idle_contribution`` of parameters without a gradient);
    * ``_update_pass(gb, d, step, stats, ok)``: ``(TensorPass, scalars, static)`` of the update;
      every write must be a no-op where ``ok`` is False;
    * ``_finish(stats, ok, d, step)``: the new ``d`` and global scalars from the reduced sums.

    Tensors of fewer than ``PACK_BELOW`` elements (biases, norms) are packed: each of their lists
    is concatenated into one flat tensor, the pass runs once on the packed tensors and what it
    wrote is copied back. A call costs ~50-100 us of Python and dispatch whatever the size, so one
    call instead of one per bias is most of the step time of a small model, and of the packed part
    of a large one; the copies are a few hundred kB.
    """

    _MODEL_WIDE: tuple[str, ...] = ("d0", "growth_rate")
    PACK_BELOW = 1 << 14
    #: Whether a step may run in the fused form (see ``_fuses``); tests switch it off to compare.
    FUSE = True
    _fused_step = False
    #: The estimate being worked on: "" (the model's, or the unnamed groups' with
    #: ``d_groups="group"``) or "@<name>"; it suffixes every ``global_state`` key (``_global``).
    _scope = ""

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; model-wide hyperparameters must equal the first group's, per-group ones
        are validated like the constructor's."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(merged)
        if self.param_groups:
            first = self.param_groups[0]
            for key in (*self._MODEL_WIDE, "d_groups", "d0_rel"):
                if key in merged and merged[key] != first[key]:
                    raise ValueError(
                        f"{type(self).__name__}: {key}={merged[key]!r} in a param group differs "
                        f"from {first[key]!r} in the first group; {key} defines the one "
                        "model-wide step size d and must be the same in every group"
                    )
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's per-group hyperparameters (subclasses extend)."""
        check_nonnegative("lr", group["lr"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])
        check_choice("implementation", group["implementation"], IMPLEMENTATIONS)
        check_choice("d_groups", group.get("d_groups", "model"), D_GROUPS)
        check_nonnegative("d0_rel", group.get("d0_rel", 0.0))
        name = group.get("name")
        if (
            group.get("d_groups") == "group"
            and name is not None
            and (not isinstance(name, str) or not name or "@" in name)
        ):
            raise ValueError(
                f"Invalid param group name {name!r}; allowed with d_groups='group': a non-empty "
                "string without '@' (groups with the same name share one d)"
            )

    # ------------------------------------------------------------------ subclass hooks
    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def _combine_statistics(
        self,
        batch: StepBatch,
        per_group: list[dict[str, torch.Tensor]],
        d: torch.Tensor,
        step: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _update_pass(
        self,
        gb: GroupBatch,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        raise NotImplementedError

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Contributions to the sums of a parameter that has state but no gradient this step (its
        ``s`` is unchanged and still part of the model's ``||s||``)."""
        return {}

    def _guard_statistics(
        self, batch: StepBatch, g_sq: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """In a fused step, the sums that ``_update_pass`` reads, formed from the guard's
        per-group ``||g||^2`` alone (DAdaptSGD's ``||g_0||``); none by default."""
        return {}

    # ------------------------------------------------------------------ machinery
    def _scalar_dtype(self) -> torch.dtype:
        """fp64 if any parameter is fp64, else fp32: the dtype of ``d`` and of every model-wide
        sum. Derived from all parameters, not from this rank's gradients, so that every rank
        computes ``d`` in the same dtype (bit-identical across ranks). Found once per step (it is
        asked for dozens of times)."""
        cached = getattr(self, "_step_scalar_dtype", None)
        if cached is not None:
            return cached
        params = (p for g in self.param_groups for p in g["params"])
        fp64 = any(real_dtype(p.dtype) == torch.float64 for p in params)
        return torch.float64 if fp64 else torch.float32

    def _global(self, name: str, device: torch.device, value: float = 0.0) -> torch.Tensor:
        """The current estimate's ``name`` in ``global_state`` (see ``_scope``)."""
        dtype = self._scalar_dtype()
        return self.global_tensor(
            name + self._scope, device, lambda dev: torch.full((), value, dtype=dtype, device=dev)
        )

    def _estimates(self, batch: StepBatch) -> list[tuple[str, StepBatch]]:
        """``(scope, the groups it covers)`` for every estimate of ``d``: the whole batch with
        ``d_groups="model"``; with ``"group"`` one per distinct group ``name`` (groups without a
        name share the unnamed one, so the Trainer's decay/no-decay split stays one estimate),
        in the order of the param groups (the same on every rank)."""
        if self.param_groups[0].get("d_groups", "model") != "group":
            return [("", batch)]
        scopes: dict[str, list[GroupBatch]] = {}
        for gb in batch.groups:
            name = gb.group.get("name")
            scopes.setdefault("" if name is None else f"@{name}", []).append(gb)
        return [(scope, StepBatch(gbs, batch.device)) for scope, gbs in scopes.items()]

    def _d_and_step(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._global("d", device, self.param_groups[0]["d0"]), self._global("step", device)

    def _fuses(self, batch: StepBatch) -> bool:
        """Whether this step runs in the fused form: the guard's pass (``||g||^2``, one read of
        the gradients) as the local statistics, then one C kernel per group that computes the
        other sums from the state before the step while it updates it. That needs no collective
        between the sums and the update, so only where none is made (one process, DDP, not
        sharded) and where every group is one bucket the C kernels take; it reads the model's
        state once per step where the two-pass form reads most of it twice."""
        if not self.FUSE or _native.load() is None:
            return False
        # slice_p > 1: the fused *_sliced kernels take s (and x0) at 1/k size, checked there
        withheld = self.SLICED_KEYS if self._slice_p() > 1 else frozenset()
        params = (p for g in self.param_groups for p in g["params"])
        if plan_reduction(params, self.global_reduce).is_sharded:
            return False
        for gb in batch.groups:
            if not gb.params:
                continue
            numel = sum(p.numel() for p in gb.params)
            if not _wants_native(gb.group["implementation"], batch.device, numel):
                return False
            for streams, names in _state_streams(gb):
                kept = [i for i, n in enumerate(names) if n not in withheld]
                if len(kept) > 1 and not _native.accepts(
                    [streams[i] for i in kept], [names[i] for i in kept]
                ):
                    return False
        return True

    def _settle_fresh_state(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """Complete the state created in this step (``batch``'s ``fresh`` parameters) before
        any pass reads it; returns sums that must travel in the step's reduction for that (none
        by default). Prodigy decides its implicit ``x0`` here."""
        return {}

    def _settled(self, batch: StepBatch, stats: dict[str, torch.Tensor]) -> None:
        """After the reduction: use (and remove from ``stats``) what ``_settle_fresh_state``
        put into it."""

    def _local_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        self._step_scalar_dtype = None
        self._step_scalar_dtype = self._scalar_dtype()  # until the end of _update
        settling = self._settle_fresh_state(batch)
        self._fused_step = self._fuses(batch)
        self._guard_by_scope: dict[str, list[torch.Tensor]] = {}
        local: dict[str, torch.Tensor] = {}
        finite = []
        try:
            for scope, sub in self._estimates(batch):
                self._scope = scope
                sums = self._estimate_statistics(sub)
                local.update({name + scope: value for name, value in sums.items()})
                finite.append(self._finite_term)
        finally:
            self._scope = ""
        self._finite_term = torch.stack(finite).sum()
        return {**local, **settling}

    def _estimate_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """This rank's sums for the current estimate (the groups in ``batch``)."""
        dtype = self._step_scalar_dtype
        start = self._start_statistics(batch)
        if self._fused_step:
            # only the guard's sums now; the others come out of the fused update (_fused_update)
            guard = [self._grad_sq(gb) for gb in batch.groups]
            self._guard_by_scope[self._scope] = guard
            self._finite_term = torch.stack(guard).sum().to(dtype)
            return start
        d, step = self._d_and_step(batch.device)
        per_group = self._run_pass(batch, lambda gb: self._statistics_pass(gb, d, step))
        local = self._with_idle_sums(batch, self._combine_statistics(batch, per_group, d, step))
        # ||g||^2 is NaN/Inf exactly when a gradient is (short of |g| > 1e19): the guard's sum,
        # so the guard needs no pass of its own (see _finiteness_statistic).
        self._finite_term = torch.stack([g["g_sq"].to(dtype) for g in per_group]).sum()
        return {**local, **start}

    # ------------------------------------------------------------------ fast start
    #: How the weights' scale is measured for the fast start: ``"rms"`` (per coordinate, for the
    #: Adam and AdaGrad forms, whose d is a per-coordinate step) or ``"norm"`` (SGD's d is an
    #: L2 distance).
    _X0_SCALE = "rms"
    #: Global keys raised to the start value with ``d`` (Prodigy adds ``d_max``).
    _START_KEYS: tuple[str, ...] = ("d",)

    def _start_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """At the first ``step()`` (before any ``x0_scale`` exists) and with ``d0_rel > 0``, this
        rank's ``||x_0||^2`` and element count of the estimate's parameters with a gradient, in
        the groups with ``lr > 0`` (frozen groups stay out of ``d``; all groups when every
        ``lr`` is 0, as at the first step of a warm-up); they travel in the step's one
        reduction. Nothing afterwards."""
        if self.param_groups[0]["d0_rel"] == 0 or "x0_scale" + self._scope in self.global_state:
            return {}
        live = [gb for gb in batch.groups if gb.group["lr"] > 0] or batch.groups
        params = [p for gb in live for p in gb.params]
        sq = sum((_sq_sum(p, True) for p in params), torch.zeros((), dtype=torch.float64))
        # an FSDP1 flat shard ends in zero padding that is no weight: leave it out of the count
        padded = (getattr(o, "_shard_numel_padded", 0) for gb in live for o in gb.originals)
        count = float(sum(p.numel() for p in params) - sum(padded))
        return {"x0_sq": sq.to(batch.device), "x0_count": torch.tensor(count, device=batch.device)}

    def _x0_scale(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weights' scale from the first step's sums: ``sqrt(||x_0||^2 / n)`` (``"rms"``)
        or ``||x_0||`` (``"norm"``); an estimate whose weights are all zero (LoRA's B alone)
        takes the mean square of all the estimates' weights together: their RMS, or
        ``RMS sqrt(n)``, the norm its ``n`` weights would have at that RMS."""
        totals = getattr(self, "_x0_totals", None)
        sq, count = stats["x0_sq"], stats["x0_count"]
        if totals is not None:  # all zero: the model's mean square times this estimate's size
            sq = torch.where(sq > 0, sq, totals[0] / totals[1].clamp_min(1.0) * count)
        if self._X0_SCALE == "norm":
            return sq.sqrt()
        return torch.where(count > 0, (sq / count.clamp_min(1.0)).sqrt(), 0.0)

    def _fast_start(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        """After the first applied step, raise ``d`` to ``d0_rel`` times the weights' scale.

        The first step is a probe at ``d0``; no estimator can raise ``d`` there (its numerator
        is 0 at ``x = x_0``), and growing from ``d0 = 1e-6`` took Prodigy and D-Adapt Adam
        20-50 steps to half their final ``d`` on the suite's tasks, D-Adapt SGD and AdaGrad
        35-610 (README, "Fast start"). Starting from the weights' scale makes the start
        equivariant to a rescaling of the parameters (as DoG's ``r_eps`` relative to
        ``||x_0||``) and leaves ``d`` a lower bound where ``d0_rel`` is below the ratio
        ``d / scale`` a task settles at: 0.012-0.85 measured on the suite (the smallest on the
        pretrained full fine-tune, whose LayerNorm weights of ~1 raise the RMS), against the
        default 1e-2. ``d`` never decreases, so a start above that ratio would stay."""
        rel = self.param_groups[0]["d0_rel"]
        if rel == 0:
            return
        if "x0_sq" in stats:
            self._global("x0_scale", d.device).copy_(self._x0_scale(stats).to(d.dtype))
        start = rel * self._global("x0_scale", d.device)
        first = ok & (step == 0)
        for key in self._START_KEYS:
            value = d if key == "d" else self._global(key, d.device)
            value.copy_(torch.where(first, torch.maximum(value, start), value))

    @staticmethod
    def _grad_sq(gb: GroupBatch) -> torch.Tensor:
        """``||g||^2`` over a group's gradients (fp64, 0-dim), one C call (fused steps only)."""
        if not gb.params:
            return torch.zeros((), dtype=torch.float64)
        flags = {"maximize": False, "coupled": False}
        return _run_native("dadapt_grad_sq", 1, [gb.grads], [], flags)[0]  # type: ignore[index]

    def _with_idle_sums(
        self, batch: StepBatch, local: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        dtype = self._scalar_dtype()
        for name, values in self._idle_sums(batch).items():
            local[name] = local[name] + batch.sum_on_device(values).to(dtype)
        return local

    def _fused_update(
        self, batch: StepBatch, d: torch.Tensor, step: torch.Tensor, ok: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The update of a fused step, one C kernel per group; returns this step's sums as the
        two-pass form's statistics would have them (the fused kernels write zero sums and nothing
        else when ``ok`` is False)."""
        guard = self._guard_by_scope[self._scope]
        before = self._guard_statistics(batch, guard)
        stride = self._slice_p()
        scale = float(stride) if stride > 1 and self._SCALE_SLICED_SUMS else 1.0
        per_group = []
        for gb, g_sq in zip(batch.groups, guard, strict=True):
            tensor_pass, scalars, static = self._update_pass(gb, d, step, before, ok)
            assert tensor_pass.fused is not None
            names = tensor_pass.fused_sums
            sums = {"g_sq": g_sq}
            if gb.params:
                keys = (*tensor_pass.keys, *tensor_pass.fused_keys)
                optional = tensor_pass.optional
                if any(map(is_dtensor, gb.originals)):
                    states = [_column(gb, k, optional) for k in keys]
                elif optional:
                    states = [
                        [st.get(k) for st in gb.states] if k in optional else
                        [st[k] for st in gb.states]
                        for k in keys
                    ]  # fmt: skip
                else:  # plain tensors: no need to unwrap each (~0.3 us apiece)
                    states = [[st[k] for st in gb.states] for k in keys]
                lists = [gb.params, gb.grads, *states]
                kernel = tensor_pass.fused if stride == 1 else tensor_pass.fused + "_sliced"
                out = _run_native(kernel, len(names), lists, scalars, static, stride=stride)
                if scale != 1.0:
                    out = out * scale  # type: ignore[operator]
                sums.update(zip(names, out, strict=True))  # type: ignore[arg-type]
            else:
                sums.update({n: torch.zeros((), dtype=torch.float64) for n in names})
            per_group.append(sums)
        return self._with_idle_sums(batch, self._combine_statistics(batch, per_group, d, step))

    def _finiteness_statistic(self, batch: StepBatch) -> torch.Tensor:
        term = getattr(self, "_finite_term", None)
        self._finite_term = None
        return term if term is not None else super()._finiteness_statistic(batch)

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        stats = dict(stats)
        self._settled(batch, stats)
        sq = [v for k, v in stats.items() if k.partition("@")[0] == "x0_sq"]
        count = [v for k, v in stats.items() if k.partition("@")[0] == "x0_count"]
        self._x0_totals = (sum(sq), sum(count)) if len(sq) > 1 else None
        try:
            for scope, sub in self._estimates(batch):
                self._scope = scope
                self._update_estimate(sub, _scoped(stats, scope), ok)
        finally:
            self._scope = ""
            self._step_scalar_dtype = None

    def _update_estimate(
        self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor
    ) -> None:
        """Update the groups of the current estimate, then its ``d``."""
        self._scope_groups = [gb.group for gb in batch.groups]
        d, step = self._d_and_step(batch.device)
        reduced = stats
        if self._fused_step:
            stats = self._fused_update(batch, d, step, ok)
        else:
            self._run_pass(batch, lambda gb: self._update_pass(gb, d, step, stats, ok))
        self._finish(stats, ok, d, step)
        self._fast_start(reduced, ok, d, step)
        step.add_(ok.to(step.dtype))

    def _store_unless_skipped(self, ok: torch.Tensor, **values: torch.Tensor) -> None:
        """Write this step's model-wide scalars into ``global_state``; a skipped step (``ok``
        False) keeps the old ones."""
        for name, value in values.items():
            kept = self._global(name, value.device)
            kept.copy_(torch.where(ok, value, kept))

    def _idle_sums(self, batch: StepBatch) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        for gb in batch.groups:
            active = {id(p) for p in gb.originals}
            for p in gb.group["params"]:
                if id(p) in active or p not in self.state or not self.state[p]:
                    continue
                for name, value in self._idle_contribution(self.state[p]).items():
                    out.setdefault(name, []).append(value)
        return out

    def _run_pass(
        self,
        batch: StepBatch,
        describe: Callable[[GroupBatch], tuple[TensorPass, list[torch.Tensor], dict[str, Any]]],
    ) -> list[dict[str, torch.Tensor]]:
        """Run a pass over every group; per group, its sums added over the group's tensors (0 for
        a group without gradients, so that every rank stacks the same names). Sums stay in the
        dtype they were accumulated in (fp64 on CPU)."""
        d0 = torch.zeros((), dtype=self._scalar_dtype(), device=batch.device)
        k = self._slice_p()
        withheld = self.SLICED_KEYS if k > 1 else frozenset()
        results = []
        for gb in batch.groups:
            tensor_pass, scalars, static = describe(gb)
            if k > 1 and gb.params:
                if tensor_pass.sums:  # the statistics, on the kept elements (torch)
                    results.append(self._sliced_sums(batch, gb, tensor_pass, scalars, static))
                    continue
                # the update: s on the kept elements first (it reads x before the update),
                # then the full update without s
                self._sliced_state_update(gb, tensor_pass, scalars, static)
            partial: dict[str, list[torch.Tensor]] = {n: [] for n in tensor_pass.sums}
            if gb.params:
                keys = tensor_pass.keys
                optional = tensor_pass.optional
                lists = [gb.params, gb.grads]
                for key in keys:
                    none = [None] * len(gb.params)
                    lists.append(none if key in withheld else _column(gb, key, optional))
                written = ["param" in tensor_pass.writes, False]
                written += [k in tensor_pass.writes for k in keys]
                for (dev, dt), bucket in _buckets(lists):
                    numel = sum(p.numel() for p in bucket[0])
                    requested = gb.group["implementation"]
                    if (
                        tensor_pass.native is not None
                        and _wants_native(requested, dev, numel)
                        and _native_accepts(bucket, ["param", "grad", *keys])
                    ):
                        # one C call for the whole bucket, no packing needed
                        sums = len(tensor_pass.sums)
                        out = _run_native(tensor_pass.native, sums, bucket, scalars, static)
                        outputs = [] if out is None else [out]
                    else:
                        impl = resolve_implementation(requested, dev, numel)
                        cdt = compute_dtype(dt)
                        args = [
                            a.to(dev) if a.dtype == torch.bool else a.to(dev, cdt) for a in scalars
                        ]
                        # "foreach" runs the per-tensor loop: these passes have no foreach form
                        # (packing already makes one call of the small tensors).
                        kernel = tensor_pass.compiled if impl == "compiled" else tensor_pass.fn
                        flags = {**static, "acc64": dev.type == "cpu"}
                        outputs = self._run_bucket(bucket, written, kernel, args, flags)
                    if tensor_pass.sums:
                        for out in outputs:
                            for name, value in zip(tensor_pass.sums, out, strict=True):
                                partial[name].append(value)
            results.append(
                {n: batch.sum_on_device(v) if v else _scalar(0.0, d0) for n, v in partial.items()}
            )
        return results

    # ------------------------------------------------------------------ slice_p
    #: State keys stored on every ``slice_p``-th element only (``slice_p > 1``): the ones that
    #: serve only the estimate of ``d``.
    SLICED_KEYS: frozenset[str] = frozenset()
    #: Whether the subsampled sums are scaled by ``slice_p`` (estimates of the full sums): needed
    #: where ``d_hat`` is a ratio of sums of different degree (SGD's ``N / ||s||_2``); the ratios
    #: of the Adam forms (``r / ||s||_1``) are unchanged by it, and their sums are left plain.
    _SCALE_SLICED_SUMS = False

    def _slice_p(self) -> int:
        return self.param_groups[0].get("slice_p", 1) if self.param_groups else 1

    def _stat_zeros(self, param: torch.Tensor) -> torch.Tensor:
        """A zero state tensor for a key of ``SLICED_KEYS``: the parameter's shape, or with
        ``slice_p = k > 1`` a 1-D tensor for the kept elements (of the rank-local shard)."""
        k = self._slice_p()
        if k == 1:
            return torch.zeros_like(param, memory_format=torch.preserve_format)
        local = local_view(param)
        return local.new_zeros(_kept_count(local.numel(), k))

    def _stat_copy(self, param: torch.Tensor) -> torch.Tensor:
        """A copy of the parameter for a key of ``SLICED_KEYS`` (Prodigy's ``x0``)."""
        k = self._slice_p()
        if k == 1:
            return param.detach().clone(memory_format=torch.preserve_format)
        return _kept(local_view(param).detach().contiguous(), k).clone()

    def _misfit(self, param: torch.Tensor, state: dict[str, Any]) -> str | None:
        """As the base's, but with ``slice_p = k > 1`` the keys of ``SLICED_KEYS`` are 1-D with
        ``ceil(n / k)`` elements (``n`` the parameter's, or its rank-local shard's, size)."""
        k = getattr(self, "_loading_slice_p", None) or self._slice_p()
        sliced = [key for key in self.SLICED_KEYS if isinstance(state.get(key), torch.Tensor)]
        if k > 1 and sliced:
            sizes = [_kept_count(math.prod(shape), k) for shape in _state_shapes(param)]
            for key in sliced:
                shape = list(state[key].shape)
                if len(shape) != 1 or shape[0] not in sizes:
                    return (
                        f"{key!r} has shape {shape}, expected [{sizes[0]}] (slice_p={k}: every "
                        f"{k}-th element of a parameter of shape {list(param.shape)})"
                    )
            state = {key: v for key, v in state.items() if key not in sliced}
        return super()._misfit(param, state)

    def _check_fit(self, gb: GroupBatch) -> None:
        """The base's check, with ``slice_p = k > 1`` first as whole-list comparisons (every
        parameter with the same keys, the sliced keys 1-D with ``ceil(n / k)`` elements, the
        others of the parameter's shape); anything else goes to the base's per-parameter check
        (through :meth:`_misfit`)."""
        k = self._slice_p()
        states = gb.states
        if k == 1 or not states or any(map(torch.Tensor.is_complex, gb.originals)):
            return super()._check_fit(gb)
        keys = states[0].keys()
        try:
            if all(map(keys.__eq__, map(dict.keys, states))):
                shapes = [local_view(p).shape for p in gb.originals]
                kept = [torch.Size((_kept_count(math.prod(s), k),)) for s in shapes]
                for key in keys:
                    values = [local_view(st[key]).shape for st in states]
                    if key in self.SCALAR_STATE_KEYS or values != (
                        kept if key in self.SLICED_KEYS else shapes
                    ):
                        break
                else:
                    return
        except (AttributeError, TypeError):  # a state value that is not a tensor
            pass
        super()._check_fit(gb)

    def _check_state_shapes(self, state: dict[Any, Any], groups: list[dict[str, Any]]) -> None:
        # the state being loaded follows the slice_p of the groups it comes with
        self._loading_slice_p = groups[0].get("slice_p", 1) if groups else None
        try:
            super()._check_state_shapes(state, groups)
        finally:
            self._loading_slice_p = None

    def _sliced_sums(
        self,
        batch: StepBatch,
        gb: GroupBatch,
        tensor_pass: TensorPass,
        scalars: list[torch.Tensor],
        static: dict[str, Any],
    ) -> dict[str, torch.Tensor]:
        """A statistics pass with ``slice_p = k > 1``: ``g_sq`` (the guard's and the gradient
        bound's ``||g||^2``) over every element, the other sums over the kept elements (the
        per-element function run once per bucket on their concatenation; torch, 1/k of the
        memory traffic). The C kernels take only the full ``||g||^2`` (contiguous memory)."""
        k = self._slice_p()
        keys = tensor_pass.keys
        lists = [gb.params, gb.grads, *(_column(gb, key, tensor_pass.optional) for key in keys)]
        partial: dict[str, list[torch.Tensor]] = {n: [] for n in tensor_pass.sums}
        scale = float(k) if self._SCALE_SLICED_SUMS else 1.0
        for (dev, dt), bucket in _buckets(lists):
            params, grads = bucket[0], bucket[1]
            numel = sum(p.numel() for p in params)
            acc64 = dev.type == "cpu"
            flags = {"maximize": False, "coupled": False}
            if _wants_native(gb.group["implementation"], dev, numel) and _native.accepts(
                [grads], ["grad"]
            ):
                g_sq = _run_native("dadapt_grad_sq", 1, [grads], [], flags)[0]  # type: ignore[index]
            else:
                g_sq = torch.stack([_sq_sum(g, acc64) for g in grads]).sum()
            packed: list[torch.Tensor | None] = [
                _cat([_kept(p, k) for p in params]),
                _cat([_kept(g, k) for g in grads]),
            ]
            for key, stream in zip(keys, bucket[2:], strict=True):
                if key in self.SLICED_KEYS:
                    sizes = [_kept_count(p.numel(), k) for p in params]
                    if all(t is None for t in stream):
                        packed.append(None)
                    else:
                        pieces = [
                            p.new_zeros(n) if t is None else t.reshape(-1)
                            for t, p, n in zip(stream, params, sizes, strict=True)
                        ]
                        packed.append(_cat(pieces))
                else:
                    packed.append(_cat([_kept(t, k) for t in stream]))
            cdt = compute_dtype(dt)
            args = [a.to(dev) if a.dtype == torch.bool else a.to(dev, cdt) for a in scalars]
            out = tensor_pass.fn(*packed, *args, **static, acc64=acc64)
            partial[tensor_pass.sums[0]].append(g_sq)
            for name, value in zip(tensor_pass.sums[1:], out[1:], strict=True):
                partial[name].append(value * scale if scale != 1.0 else value)
        return {n: batch.sum_on_device(v) for n, v in partial.items()}

    def _sliced_state_update(
        self,
        gb: GroupBatch,
        tensor_pass: TensorPass,
        scalars: list[torch.Tensor],
        static: dict[str, Any],
    ) -> None:
        """``s`` of an update with ``slice_p = k > 1``, on the kept elements (torch, once per
        bucket on their concatenation), by the pass's ``sliced`` rule."""
        rule = tensor_pass.sliced
        assert rule is not None, "an update pass with slice_p > 1 needs its sliced rule"
        k = self._slice_p()
        for (dev, dt), bucket in _buckets([gb.params, gb.grads, gb.state_list("s")]):
            params, grads, ss = bucket
            cdt = compute_dtype(dt)
            args = [a.to(dev) if a.dtype == torch.bool else a.to(dev, cdt) for a in scalars]
            new = rule(
                _cat([_kept(p, k) for p in params]),
                _cat([_kept(g, k) for g in grads]),
                _cat([s.reshape(-1) for s in ss]),
                *args,
                **static,
                acc64=dev.type == "cpu",
            )
            if len(ss) == 1:
                ss[0].copy_(new)
            else:
                torch._foreach_copy_(ss, list(new.split([s.numel() for s in ss])))

    def _run_bucket(
        self,
        bucket: list[list[torch.Tensor]],
        written: list[bool],
        kernel: Callable[..., Any] | CompiledKernel,
        args: list[torch.Tensor],
        static: dict[str, Any],
    ) -> list[Any]:
        """Run ``kernel`` over a device/dtype bucket: small tensors packed into one call (see the
        class docstring), the others one call each (largest first while compiling)."""

        def run(tensors: list[Any]) -> Any:
            if isinstance(kernel, CompiledKernel):
                missing = tuple(i for i, t in enumerate(tensors) if t is None)
                if missing:  # an optional state tensor the parameter does not have
                    variant = _compiled_without(kernel, missing, len(tensors))
                    present = [t for t in tensors if t is not None]
                    return variant(present, *args, **static)
                return kernel(tensors, *args, **static)
            return kernel(*tensors, *args, **static)

        sizes = [p.numel() for p in bucket[0]]
        small = [i for i, n in enumerate(sizes) if n < self.PACK_BELOW]
        if len(small) < 2:
            small = []
        packed_set = set(small)
        order = (
            order_for_compile(kernel, sizes)
            if isinstance(kernel, CompiledKernel)
            else range(len(sizes))
        )
        outputs = [run([t[i] for t in bucket]) for i in order if i not in packed_set]
        if small:
            packed = [_pack([t[i] for i in small], [bucket[0][i] for i in small]) for t in bucket]
            outputs.append(run(packed))
            lengths = [sizes[i] for i in small]
            for flat, tensors, is_written in zip(packed, bucket, written, strict=True):
                if is_written and flat is not None:
                    pieces = flat.split(lengths)
                    pairs = [(tensors[i], x) for i, x in zip(small, pieces, strict=True)]
                    targets = [t for t, _ in pairs if t is not None]
                    sources = [x.view(t.shape) for t, x in pairs if t is not None]
                    torch._foreach_copy_(targets, sources)
        return outputs

    # ------------------------------------------------------------------ logging
    def _global_float(self, name: str, default: float = 0.0) -> float:
        t = self.global_state.get(name)
        return float(t) if t is not None else default

    def stats(self) -> dict[str, float]:
        out = super().stats()
        d0 = self.param_groups[0]["d0"]
        out["d"] = self._global_float("d", d0)
        names = [g.get("name") for g in self.param_groups]
        if self.param_groups[0].get("d_groups", "model") == "group":
            named = list(dict.fromkeys(n for n in names if n is not None))
            for name in named:  # d/<name> per named estimate; d stays the unnamed groups'
                out[f"d/{name}"] = self._global_float(f"d@{name}", d0)
            if named and None not in names:
                out["d"] = out[f"d/{named[0]}"]
        out["step"] = self._global_float("step")
        out["lr"] = max((g["lr"] for g in self.param_groups), default=0.0)
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
def dadapt_sgd_statistics(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    coupled_wd: torch.Tensor,
    lam: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of D-Adapted SGD for one tensor: ``||g||^2`` of the raw gradient, ``<g', s_k>``
    with ``g'`` the gradient the update uses, ``||s_k + lam g'||^2`` (``= ||s_{k+1}||^2``) and
    ``||g'||^2`` (for the step that fixes ``||g_0||``, where ``s_k = 0`` and ``lam`` is not known
    yet)."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    s_old = s.to(g.dtype)
    s_new = s_old + lam * g
    dot = _total(g * s_old, acc64)
    return _sq_sum(grad, acc64), dot, _total(s_new * s_new, acc64), _total(g * g, acc64)


def dadapt_sgd_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor | None,
    ok: torch.Tensor,
    lam: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> None:
    """One tensor of D-Adapted SGD without momentum, in place (``x = z``): ``s += lam g``,
    ``x -= lam g (+ decay x)``. ``lam`` is this group's ``d_k lr / ||g_0||`` (0 on a skipped
    step), ``decay`` the decoupled factor ``lam * wd``."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)  # a skipped step's NaN/Inf never reaches the state
    param.copy_(p - decay * p - lam * g)
    if s is not None:  # None: slice_p > 1, s updated on its own (dadapt_sgd_sliced_s)
        s.copy_(s.to(g.dtype) + lam * g)


def dadapt_sgd_sliced_s(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    lam: torch.Tensor,
    coupled_wd: torch.Tensor,
    *_: torch.Tensor,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> torch.Tensor:
    """DAdaptSGD's new ``s = s + lam g'`` on the kept elements (``slice_p > 1``)."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    return s.to(g.dtype) + lam * torch.where(ok, g, 0.0)


def dadapt_sgd_momentum_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor | None,
    z: torch.Tensor,
    ok: torch.Tensor,
    lam: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    average: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> None:
    """One tensor of D-Adapted SGD with primal-averaging momentum, in place: ``z -= lam g
    (+ decay z)``, ``x += average (z - x)`` with ``average = 1 - momentum`` (0 when skipped)."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)
    zz = z.to(g.dtype)
    zz = zz - decay * zz - lam * g
    param.copy_(p + average * (zz - p))
    if s is not None:
        s.copy_(s.to(g.dtype) + lam * g)
    z.copy_(zz)


_SGD_STATISTICS = _pass(
    dadapt_sgd_statistics,
    "DAdaptSGD statistics",
    ("s",),
    ("g_sq", "dot", "s_sq", "gg"),
    native="dadapt_sgd_stats",
)
_SGD_UPDATE = _pass(
    dadapt_sgd_tensor_update,
    "DAdaptSGD",
    ("s",),
    (),
    ("param", "s"),
    native="dadapt_sgd_update",
    fused="dadapt_sgd_fused",
    fused_sums=("dot", "s_sq", "gg"),
    optional=("s",),
    sliced=dadapt_sgd_sliced_s,
)
_SGD_MOMENTUM_UPDATE = _pass(
    dadapt_sgd_momentum_tensor_update,
    "DAdaptSGD",
    ("s", "z"),
    (),
    ("param", "s", "z"),
    native="dadapt_sgd_momentum_update",
    fused="dadapt_sgd_momentum_fused",
    fused_sums=("dot", "s_sq", "gg"),
    optional=("s",),
    sliced=dadapt_sgd_sliced_s,
)


class DAdaptSGD(DAdaptationBase):
    r"""SGD with D-Adaptation (Defazio & Mishchenko, ICML 2023), the form of the authors'
    ``dadaptation`` package: a dual-averaging gradient sum ``s`` and primal-averaging momentum.

    With ``gamma`` the group's ``lr`` and ``G_k`` the bound on the gradient norm (below)::

        lambda_k  = d_k * gamma / G_k
        N_{k+1}   = N_k + lambda_k <g_k, s_k>                   (summed over all groups)
        s_{k+1}   = s_k + lambda_k g_k
        z_{k+1}   = z_k - lambda_k g_k                           (z_0 = x_0)
        x_{k+1}   = beta x_k + (1 - beta) z_{k+1}                (beta = momentum; 0: x = z)
        d_hat     = 2 N_{k+1} / ||s_{k+1}||_2
        d_{k+1}   = max(d_k, min(d_hat, growth_rate * d_k))

    ``d`` is a lower bound on ``||x_0 - x*||`` for convex problems (the paper's Theorem), for any
    positive weights ``lambda_k``; the paper's step ``d / G`` takes ``G`` a bound on every
    gradient norm (G-Lipschitz objective). The authors' code estimates ``G`` by the first
    gradient's norm ``||g_0||`` (``gradient_bound="first"``). Here ``G_k`` is by default the
    largest gradient norm seen so far, this step's included (``gradient_bound="max"``): the
    tightest bound the run has shown. With ``||g_0||``, a run whose gradients grow (a small
    first gradient, a sharper region reached later) takes steps ``d / ||g_0||`` that the
    curvature cannot take, and ``d`` never decreases: a 10-32-1 MLP regressing noise diverges
    from loss 11.6 to 8e35 in 100 full-batch steps (issue 18), a 1.3M GPT-2 jumps from eval loss
    6.1 back to 8.7 mid-run (issue 13). With the running maximum the step shrinks as soon as the
    gradients grow, so the move ``lambda_k ||g_k||`` of a step stays at most ``d_k lr``.
    Gradient norms are of the raw gradients of the groups with ``lr > 0`` (as the authors').

    The step of the first iteration is ``d0 * lr`` (``G_0 = ||g_0||`` either way).
    ``stats()["d_lr"]`` is ``d * lr / G``.

    Args:
        params: parameters or param groups.
        lr: multiplier of the adapted step (default 1.0; schedules act on it).
        momentum: primal-averaging momentum ``beta`` in [0, 1) (default 0.0, the authors').
            The paper's deep-learning runs used 0.9.
        weight_decay: weight decay coefficient (default 0).
        decoupled_weight_decay: False (default, the authors'): L2 term ``wd * x`` added to the
            gradient (it then enters ``s`` and ``d``); True: ``z -= lambda_k * wd * z`` (SGDW
            style; ``x`` itself without momentum), kept out of ``s`` and ``d``.
        d0: lower bound on the distance to the solution at the first step (default 1e-6).
        d0_rel: after the first step, ``d`` is raised to ``d0_rel`` times the scale of the
            initial weights (``_X0_SCALE``; default 1e-2, chosen on the suite's five tasks; 0: the
            authors' start from ``d0``).
        growth_rate: ``d`` grows by at most this factor per step (default inf).
        d_groups: ``"model"`` (default: one ``d`` for all groups, the papers') or ``"group"``:
            one ``d`` per param-group ``name`` (groups without a name share one), e.g. for LoRA
            A/B or two networks; every estimate is the model-wide algorithm run on its groups.
        gradient_bound: ``"max"`` (default) or ``"first"`` (the authors'), see above.
        maximize: maximize the objective.
        slice_p: statistics on a deterministic subsample (default 1: every element; prodigy
            PR #22): with ``k > 1``, ``s`` is stored for elements ``0, k, 2k, ...`` of each
            flattened tensor only (``ceil(n / k)`` of them) and the sums that only estimate ``d``
            (``<g, s>``, ``||s||^2``) are taken over those elements and scaled by ``k`` (an
            estimate of the full sums: ``N / ||s||_2`` mixes degrees, and unscaled sums would
            bias ``d_hat`` by ``1 / sqrt(k)``); the update of ``x`` (and ``z``) and the gradient
            bound ``G`` (the full ``||g||``) are unchanged. ``d_hat`` is then a ratio of two
            subsample estimates: consistent as the subsample grows, with the small-sample bias
            of a ratio estimator (of order ``1 / (number of kept elements)``); a tensor with
            ``n <= k`` contributes one element (weighted as ``k``). Saves ``(1 - 1/k)`` of ``s``
            (4 bytes per fp32 element at ``k`` large). Model-wide (the same in every group). The
            kept set is deterministic: with ``k`` dividing a matrix's row length it is the same
            columns in every row, and where columns differ systematically (embeddings, heads) that
            aliasing biases ``d`` by more than sampling would: an odd ``k`` walks through the
            columns instead (not a measured improvement on the demo task).
        implementation: ``"auto"``, ``"loop"`` or ``"compiled"`` (see
            :mod:`hf_tuningfree.optim.kernels`); ``"foreach"`` runs the per-tensor loop. On CPU,
            ``"auto"`` and ``"compiled"`` run the C kernels (see the module docstring).
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``s`` (and ``z`` when ``momentum > 0``); model-wide in
    ``global_state``: ``d``, ``numerator`` (``N``), ``grad_bound_sq`` (``G^2``), ``s_sq``
    (``||s||^2``), ``step``.
    """

    _MODEL_WIDE = ("d0", "growth_rate", "gradient_bound", "slice_p")
    _X0_SCALE = "norm"  # d is an L2 distance: the start is d0_rel ||x_0||
    SLICED_KEYS = frozenset({"s"})
    _SCALE_SLICED_SUMS = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        d0: float = 1e-6,
        d0_rel: float = 1e-2,
        growth_rate: float = float("inf"),
        d_groups: str = "model",
        gradient_bound: str = "max",
        maximize: bool = False,
        implementation: str = "auto",
        *,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "d0": check_positive("d0", d0),
            "d0_rel": d0_rel,
            "growth_rate": check_growth_rate(growth_rate),
            "d_groups": d_groups,
            "gradient_bound": check_choice("gradient_bound", gradient_bound, ("max", "first")),
            "maximize": maximize,
            "implementation": implementation,
            "slice_p": check_slice_p(slice_p),
        }
        super().__init__(
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_in_range("momentum", group["momentum"], 0.0, 1.0)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
        check_choice("gradient_bound", group["gradient_bound"], ("max", "first"))

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["s"] = self._stat_zeros(param)

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        s = local_view(state["s"]).to(compute_dtype(state["s"].dtype))
        k = self._slice_p()
        return {"s_sq": (s * s).sum() * k if k > 1 else (s * s).sum()}

    @staticmethod
    def _inverse(bound_sq: torch.Tensor) -> torch.Tensor:
        """``1 / G`` (0 while no gradient has been seen, and for a NaN bound)."""
        return torch.where(bound_sq > 0, bound_sq.rsqrt(), 0.0)

    def _bound_sq(self, stats: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """``G_k^2`` of this step: the largest ``||g||^2`` so far, this step's included
        (``"max"``), or the first nonzero one (``"first"``). Gradients of groups with lr = 0 do
        not count (a warm-up from lr = 0 and frozen groups are skipped over)."""
        old = self._global("grad_bound_sq", device)
        new = stats["grad_sq"].to(old.dtype)
        if self.param_groups[0]["gradient_bound"] == "first":
            return torch.where(old > 0, old, new)
        return torch.maximum(old, new)

    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        # ||s_k + lambda g'||^2 with lambda of the bound known before this step; _finish corrects
        # it when this step raises the bound (and on the first step, where s_k = 0).
        lam = d * self._inverse(self._global("grad_bound_sq", d.device)) * gb.group["lr"]
        coupled, _ = _weight_decay_scalars(gb.group, lam)
        return _SGD_STATISTICS, [coupled, lam], _flags(gb.group)

    def _combine_statistics(
        self,
        batch: StepBatch,
        per_group: list[dict[str, torch.Tensor]],
        d: torch.Tensor,
        step: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        dtype = self._scalar_dtype()
        lrs = [gb.group["lr"] for gb in batch.groups]
        pairs = list(zip(per_group, lrs, strict=True))
        return {
            # sum lr <g', s_k> (the numerator's term is lambda_k times it, lambda_k / lr = d / G)
            "dot_lr": batch.sum_on_device(pg["dot"] * lr for pg, lr in pairs).to(dtype),
            "s_sq": batch.sum_on_device(pg["s_sq"] for pg, _ in pairs).to(dtype),
            "gg_lr2": batch.sum_on_device(pg["gg"] * lr * lr for pg, lr in pairs).to(dtype),
            **self._guard_statistics(batch, [pg["g_sq"] for pg in per_group]),
        }

    def _guard_statistics(
        self, batch: StepBatch, g_sq: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """For the gradient bound: the raw ``||g||^2`` of the groups with lr > 0."""
        lrs = [gb.group["lr"] for gb in batch.groups]
        grad_sq = batch.sum_on_device(v for v, lr in zip(g_sq, lrs, strict=True) if lr > 0)
        return {"grad_sq": grad_sq.to(self._scalar_dtype())}

    def _update_pass(
        self,
        gb: GroupBatch,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        # lambda = d lr / G_k: 0 until a gradient was nonzero, and on a skipped step.
        inverse = self._inverse(self._bound_sq(stats, d.device))
        lam = d * torch.where(ok, inverse, 0.0) * group["lr"]
        scalars = [ok, lam, *_weight_decay_scalars(group, lam)]
        if group["momentum"] == 0:
            return _SGD_UPDATE, scalars, _flags(group)
        for p, st in zip(gb.originals, gb.states, strict=True):
            if "z" not in st:  # momentum switched on after the first step: start z at x
                x = torch.view_as_real(p) if p.is_complex() else p
                st["z"] = x.detach().clone(memory_format=torch.contiguous_format)
        average = ok.to(lam.dtype) * (1.0 - group["momentum"])
        return _SGD_MOMENTUM_UPDATE, [*scalars, average], _flags(group)

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        growth = self.param_groups[0]["growth_rate"]
        numerator = self._global("numerator", d.device)
        before = self._inverse(self._global("grad_bound_sq", d.device))
        bound_sq = self._bound_sq(stats, d.device)
        after = self._inverse(bound_sq)
        new_s_sq = stats["s_sq"]
        if not self._fused_step:
            # ||s_k + lambda' g||^2 from ||s_k + lambda g||^2, lambda' - lambda = d lr (1/G' - 1/G)
            # (0 when the bound did not change: the same number as before)
            change = d * (after - before)
            new_s_sq = (
                new_s_sq
                + d * d * (after * after - before * before) * stats["gg_lr2"]
                + 2.0 * change * stats["dot_lr"]
            )
        new_numerator = numerator + d * after * stats["dot_lr"]
        d_hat = 2.0 * new_numerator / new_s_sq.sqrt()
        valid = ok & (new_s_sq > 0)
        d.copy_(_d_update(d, d_hat, valid, growth))
        self._store_unless_skipped(
            ok, numerator=new_numerator, s_sq=new_s_sq, grad_bound_sq=bound_sq
        )

    def stats(self) -> dict[str, float]:
        out = super().stats()
        bound_sq = self._global_float("grad_bound_sq")
        bound = math.sqrt(bound_sq) if bound_sq > 0 else 0.0
        out["grad_bound"] = bound
        out["d_lr"] = out["d"] * out["lr"] / bound if bound > 0 else 0.0
        out["numerator"] = self._global_float("numerator")
        out["s_norm"] = math.sqrt(max(self._global_float("s_sq"), 0.0))
        return out


# ====================================================================== Adam
def dadapt_adam_statistics(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    s: torch.Tensor,
    coupled_wd: torch.Tensor,
    eps: torch.Tensor,
    dlr: torch.Tensor,
    c_s: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of D-Adapted Adam for one tensor: ``||g||^2``, ``<g', s_k / (sqrt(v_k) +
    eps)>`` (the second moment BEFORE this step's update, as the published code) and
    ``||s_{k+1}||_1`` with ``s_{k+1} = s_k + c_s (dlr g' - s_k)``, the update's expression."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    v = exp_avg_sq.to(g.dtype)
    s_old = s.to(g.dtype)
    s_new = s_old + c_s * (dlr * g - s_old)
    dot = _total(g * s_old / (v.sqrt() + eps), acc64)
    return _sq_sum(grad, acc64), dot, _total(s_new.abs(), acc64)


def dadapt_adam_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor,
    s: torch.Tensor | None,
    ok: torch.Tensor,
    dlr: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    c_m: torch.Tensor,
    c_v: torch.Tensor,
    c_s: torch.Tensor,
    on: torch.Tensor,
    eps: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> None:
    """One tensor of D-Adapted Adam, in place. ``dlr`` is this group's ``d_k lr bc_k``, ``c_m,
    c_v, c_s`` are ``1 - beta1``, ``1 - beta2``, ``1 - sqrt(beta2)`` and ``on`` is 1: all 0 on a
    skipped step; ``decay`` is the decoupled factor ``dlr * wd``. ``exp_avg`` None (``beta1 =
    0``, no buffer): ``m_{k+1} = dlr g``."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)
    v = exp_avg_sq.to(g.dtype)
    dg = dlr * g
    m = dg if exp_avg is None else _momentum(exp_avg.to(g.dtype), dg, c_m)
    v = v + c_v * (g * g - v)
    param.copy_(p - decay * p - on * (m / (v.sqrt() + eps)))
    if exp_avg is not None:
        exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if s is not None:  # None: slice_p > 1 (dadapt_adam_sliced_s)
        s_old = s.to(g.dtype)
        s.copy_(s_old + c_s * (dg - s_old))


def dadapt_adam_sliced_s(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    dlr: torch.Tensor,
    coupled_wd: torch.Tensor,
    decay: torch.Tensor,
    c_m: torch.Tensor,
    c_v: torch.Tensor,
    c_s: torch.Tensor,
    *_: torch.Tensor,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> torch.Tensor:
    """DAdaptAdam's new ``s = s + c_s (dlr g' - s)`` on the kept elements (``slice_p > 1``)."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    s_old = s.to(g.dtype)
    return s_old + c_s * (dlr * torch.where(ok, g, 0.0) - s_old)


def _momentum(m: torch.Tensor, dg: torch.Tensor, c_m: torch.Tensor) -> torch.Tensor:
    """``m + c_m (dg - m)``: the first moment's update (``c_m = 1 - beta1``)."""
    return m + c_m * (dg - m)


_ADAM_STATISTICS = _pass(
    dadapt_adam_statistics,
    "DAdaptAdam statistics",
    ("exp_avg_sq", "s"),
    ("g_sq", "dot", "s_l1"),
    native="dadapt_adam_stats",
)
_ADAM_UPDATE = _pass(
    dadapt_adam_tensor_update,
    "DAdaptAdam",
    ("exp_avg", "exp_avg_sq", "s"),
    (),
    ("param", "exp_avg", "exp_avg_sq", "s"),
    native="dadapt_adam_update",
    fused="dadapt_adam_fused",
    fused_sums=("dot", "s_l1"),
    optional=("exp_avg", "s"),
    sliced=dadapt_adam_sliced_s,
)


def adam_bias_correction(step: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """Adam's ``sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))`` for a 0-dim step count ``k``."""
    k1 = step + 1.0
    return torch.sqrt(1.0 - torch.pow(beta2, k1)) / (1.0 - torch.pow(beta1, k1))


class AdamFormBase(DAdaptationBase):
    """What the Adam forms, :class:`DAdaptAdam` and :class:`~hf_tuningfree.optim.prodigy.Prodigy`,
    share: the state ``exp_avg``, ``exp_avg_sq``, ``s``; Adam's bias correction ``bc_k`` in the
    step ``dlr_k = d_k lr bc_k``; a numerator whose step-``k`` term is a weight times the sum over
    groups of ``lr <g', .>`` (the statistics pass's ``dot``); the denominator ``||s_{k+1}||_1``;
    the stats ``bias_correction`` and ``d_lr``.

    A subclass implements ``_numerator_weight(d, step)``, ``_statistics_pass`` (whose sums are
    ``g_sq``, ``dot``, ``s_l1``), ``_update_pass`` and ``_finish``.
    """

    SLICED_KEYS = frozenset({"s"})

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_betas("betas", group["betas"])
        check_positive("eps", group["eps"])
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        # beta1 = 0: no first-moment buffer (the update uses this step's d g directly)
        keys = ("exp_avg", "exp_avg_sq") if group["betas"][0] > 0 else ("exp_avg_sq",)
        for key in keys:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["s"] = self._stat_zeros(param)  # 1/k of it with slice_p = k

    def _first_moment_buffers(
        self, gb: GroupBatch, dg: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        """Make the batch's ``exp_avg`` match ``beta1`` before an update: with ``beta1 = 0`` a
        buffer left from before is dropped (the update is ``d g`` itself and the buffer would
        only hold a copy of it); with ``beta1 > 0`` a parameter without one (``beta1`` was 0
        until now) gets ``m_k = `` this step's ``d g`` (``dg(param, grad)``, 0 on a skipped
        step), so that ``m_{k+1} = m_k + (1 - beta1)(d g - m_k)`` is exactly ``d g``: the first
        step after switching on moves as the step before it would have, and the momentum builds
        up from there (rather than from 0, which would shrink that step by ``1 - beta1``)."""
        keep = gb.group["betas"][0] > 0
        for p, g, st in zip(gb.params, gb.grads, gb.states, strict=True):
            if not keep:
                st.pop("exp_avg", None)
            elif "exp_avg" not in st:
                # made like exp_avg_sq (the parameter's dtype, a DTensor for a DTensor)
                m = torch.zeros_like(st["exp_avg_sq"], memory_format=torch.contiguous_format)
                local_view(m).copy_(dg(p, g))
                st["exp_avg"] = m

    def _idle_contribution(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"s_l1": local_view(state["s"]).to(compute_dtype(state["s"].dtype)).abs().sum()}

    def _bias_correction(self, step: torch.Tensor) -> torch.Tensor | float:
        group = self.param_groups[0]
        if not group["use_bias_correction"]:
            return 1.0
        return adam_bias_correction(step, *group["betas"])

    def _dlr(self, group: dict[str, Any], d: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """This group's step ``dlr = d lr bc``."""
        return d * self._bias_correction(step) * group["lr"]

    def _numerator_weight(self, d: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """What multiplies ``sum over groups of lr <g', .>`` in this step's numerator term."""
        raise NotImplementedError

    def _combine_statistics(
        self,
        batch: StepBatch,
        per_group: list[dict[str, torch.Tensor]],
        d: torch.Tensor,
        step: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        dtype = self._scalar_dtype()
        pairs = list(zip(per_group, batch.groups, strict=True))
        terms = batch.sum_on_device(pg["dot"] * gb.group["lr"] for pg, gb in pairs)
        return {
            "numerator": self._numerator_weight(d, step) * terms.to(dtype),
            "s_l1": batch.sum_on_device(pg["s_l1"] for pg, _ in pairs).to(dtype),
        }

    def stats(self) -> dict[str, float]:
        out = super().stats()
        device = self.global_state["d"].device if "d" in self.global_state else None
        step = torch.tensor(out["step"], dtype=torch.float64, device=device)
        bc = float(self._bias_correction(step))
        out["bias_correction"] = bc
        out["d_lr"] = out["d"] * out["lr"] * bc
        return out


class DAdaptAdam(AdamFormBase):
    r"""Adam with D-Adaptation (Defazio & Mishchenko, ICML 2023), in its current published form
    (the authors' ``dadaptation`` package, v3): the step ``dlr`` is folded into the first moment
    and into ``s``.

    With ``gamma_k`` the group's ``lr``, ``beta3 = sqrt(beta2)`` and ``bc_k`` Adam's bias
    correction ``sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))`` (1 when off)::

        dlr_k     = d_k * gamma_k * bc_k
        r_{k+1}   = beta3 r_k + (1 - beta3) * sum dlr_k <g_k, s_k / (sqrt(v_k) + eps)>
        m_{k+1}   = beta1 m_k + (1 - beta1) dlr_k g_k
        v_{k+1}   = beta2 v_k + (1 - beta2) g_k^2
        s_{k+1}   = beta3 s_k + (1 - beta3) dlr_k g_k
        d_hat     = r_{k+1} / ((1 - beta3) ||s_{k+1}||_1)
        d_{k+1}   = max(d_k, min(d_hat, growth_rate * d_k))
        x_{k+1}   = x_k - dlr_k wd x_k - m_{k+1} / (sqrt(v_{k+1}) + eps)

    (the ``wd`` term with decoupled weight decay; coupled decay adds ``wd * x_k`` to ``g_k``
    instead). The sums run over every parameter of every group.

    Bias correction is ON by default, unlike the authors' code (``use_bias_correction=False``
    gives their setting). Measured on a short language-model run (FACTS.md: 400 steps of a
    small GPT-2, eval loss relative to AdamW at its best lr): without it the step reaches ~1e-2
    by step 10 and stays there (1.22); with it the early steps are damped by ``bc_k`` (0.32 at
    the first step) and it closed about half of the gap to tuned AdamW (1.11). Fine-tuning runs
    are short, so this early phase decides much of the result.

    Args:
        params: parameters or param groups.
        lr: multiplier of the adapted step (default 1.0; schedules act on it).
        betas: ``(beta1, beta2)`` (default ``(0.9, 0.999)``, the paper's). ``beta1 = 0``
            keeps no first-moment buffer (``m_{k+1} = dlr_k g_k`` is used directly; prodigy
            PR #32): 4 bytes less state per fp32 element, the same numbers as a zero-momentum
            buffer to rounding (``m + (x - m)`` is ``x`` up to one rounding), and ``d`` is
            estimated as before (its sums do not involve ``m``). Setting ``beta1`` from 0 to
            > 0 on a live optimizer creates the buffer as that step's ``dlr g`` (so the step
            equals a ``beta1 = 0`` step and the momentum builds from there); back to 0 drops it.
        eps: added to ``sqrt(v)`` (default 1e-8).
        weight_decay: weight decay coefficient (default 0).
        decoupled_weight_decay: True (default): AdamW-style ``x -= dlr * wd * x``, what users of
            AdamW and the Trainer expect; False: ``wd * x`` added to the gradient (the authors'
            default, ``decouple=False``).
        use_bias_correction: see above (default True).
        d0: lower bound on the distance to the solution at the first step (default 1e-6).
        d0_rel: after the first step, ``d`` is raised to ``d0_rel`` times the scale of the
            initial weights (``_X0_SCALE``; default 1e-2, chosen on the suite's five tasks; 0: the
            authors' start from ``d0``).
        growth_rate: ``d`` grows by at most this factor per step (default inf).
        d_groups: ``"model"`` (default: one ``d`` for all groups, the papers') or ``"group"``:
            one ``d`` per param-group ``name`` (groups without a name share one), e.g. for LoRA
            A/B or two networks; every estimate is the model-wide algorithm run on its groups.
        maximize: maximize the objective.
        slice_p: statistics on a deterministic subsample (default 1: every element; prodigy
            PR #22, reported to halve optimizer memory in OneTrainer PR #550): with ``k > 1``,
            ``s`` is stored for elements ``0, k, 2k, ...`` of each flattened tensor only
            (``ceil(n / k)`` of them) and the sums that only estimate ``d`` (the numerator
            term and ``||s||_1``) are taken over those elements; ``m``, ``v`` and the update of
            ``x`` are unchanged and full, as is the non-finite guard's ``||g||^2``. ``d_hat``
            is then the ratio of the subsampled sums: a consistent estimate of the full ratio
            (both scale with the kept fraction), with the small-sample bias of a ratio
            estimator (of order ``1 / (number of kept elements)``); a tensor with ``n <= k``
            contributes one element, so tensors smaller than ``k`` weigh more per element than
            larger ones (``k / n`` times). Saves ``(1 - 1/k)`` of ``s``. The kept set is
            deterministic: with ``k`` dividing a matrix's row length it is the same columns in every
            row, and where columns differ systematically (embeddings, heads) that aliasing biases
            ``d`` by more than sampling would: an odd ``k`` walks through the columns instead (not a
            measured improvement: on the demo task k = 7 varied more across seeds than k = 8).
            Model-wide (the same in every group). On the C path, unsharded: one fused sweep per
            group (``*_fused_sliced``: per block the kept elements' sums and ``s``, then the
            block's full update); sharded (two-pass): the update in C without ``s``, the
            statistics and ``s`` on the kept elements in torch (strided views never reach C).
        implementation: ``"auto"``, ``"loop"`` or ``"compiled"``; ``"foreach"`` runs the loop.
            On CPU, ``"auto"`` and ``"compiled"`` run the C kernels (see the module docstring).
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``exp_avg`` (m; none with ``beta1 = 0``), ``exp_avg_sq`` (v), ``s``;
    model-wide ``d``, ``numerator`` (r), ``s_l1``, ``step``.
    """

    _MODEL_WIDE = ("d0", "growth_rate", "betas", "use_bias_correction", "slice_p")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        use_bias_correction: bool = True,
        d0: float = 1e-6,
        d0_rel: float = 1e-2,
        growth_rate: float = float("inf"),
        d_groups: str = "model",
        maximize: bool = False,
        implementation: str = "auto",
        *,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": check_betas("betas", betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "use_bias_correction": check_bool("use_bias_correction", use_bias_correction),
            "d0": check_positive("d0", d0),
            "d0_rel": d0_rel,
            "growth_rate": check_growth_rate(growth_rate),
            "d_groups": d_groups,
            "maximize": maximize,
            "implementation": implementation,
            "slice_p": check_slice_p(slice_p),
        }
        super().__init__(
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        dlr = self._dlr(group, d, step)
        coupled, _ = _weight_decay_scalars(group, dlr)
        c_s = _scalar(1.0 - math.sqrt(group["betas"][1]), d)
        return _ADAM_STATISTICS, [coupled, _scalar(group["eps"], d), dlr, c_s], _flags(group)

    def _numerator_weight(self, d: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # the term is sum over groups of dlr <g', s_k / (sqrt(v_k) + eps)>, dlr = d lr bc
        return d * self._bias_correction(step)

    def _update_pass(
        self,
        gb: GroupBatch,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        beta1, beta2 = group["betas"]
        on = ok.to(d.dtype)  # every coefficient is 0 on a skipped step
        dlr = on * self._dlr(group, d, step)
        coupled_wd, _ = _weight_decay_scalars(group, dlr)
        flags = _flags(group)

        def dg(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            g, _ = effective_grad(grad, param, coupled_wd.to(param.dtype), **flags)
            return dlr.to(g.dtype) * torch.where(ok, g, 0.0)

        self._first_moment_buffers(gb, dg)
        scalars = [
            ok,
            dlr,
            *_weight_decay_scalars(group, dlr),
            on * (1.0 - beta1),
            on * (1.0 - beta2),
            on * (1.0 - math.sqrt(beta2)),
            on,
            _scalar(group["eps"], d),
        ]
        return _ADAM_UPDATE, scalars, _flags(group)

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        group = self.param_groups[0]
        beta3 = math.sqrt(group["betas"][1])
        numerator = self._global("numerator", d.device)
        new_numerator = beta3 * numerator + (1.0 - beta3) * stats["numerator"]
        d_hat = new_numerator / ((1.0 - beta3) * stats["s_l1"])
        valid = ok & (stats["s_l1"] > 0)
        d.copy_(_d_update(d, d_hat, valid, group["growth_rate"]))
        self._store_unless_skipped(ok, numerator=new_numerator, s_l1=stats["s_l1"])

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out["numerator"] = self._global_float("numerator")
        out["s_l1"] = self._global_float("s_l1")
        beta3 = math.sqrt(self.param_groups[0]["betas"][1])
        denom = (1.0 - beta3) * out["s_l1"]
        out["d_hat"] = out["numerator"] / denom if denom > 0 else 0.0
        return out


# ====================================================================== AdaGrad
def dadapt_adagrad_statistics(
    param: torch.Tensor,
    grad: torch.Tensor,
    alpha: torch.Tensor,
    s: torch.Tensor,
    coupled_wd: torch.Tensor,
    dlr: torch.Tensor,
    eps: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1 of D-Adapted AdaGrad for one tensor: ``||g||^2`` and the changes this step makes
    to the model-wide numerator ``sum s^2 / w - sum_i dlr_i^2 g_i^2 / w_{i+1}`` (``w = sqrt(alpha)
    + eps``) and to ``||s||_1``; all are known before the update since ``dlr = d_k lr`` is.

    Written as changes, a tensor without a gradient this step keeps its earlier contribution
    without being read; the numerator change is ``(s_k^2 + 2 dlr g s_k) / w_{k+1} - s_k^2 / w_k``,
    in which the ``dlr^2 g^2`` terms cancel exactly."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    a = alpha.to(g.dtype)
    s_old = s.to(g.dtype)
    w_old = a.sqrt() + eps
    w_new = (a + g * g).sqrt() + eps
    dg = dlr * g
    s_sq = s_old * s_old
    numerator = _total((s_sq + 2.0 * dg * s_old) / w_new - s_sq / w_old, acc64)
    l1 = _total((s_old + dg).abs() - s_old.abs(), acc64)
    return _sq_sum(grad, acc64), numerator, l1


def dadapt_adagrad_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    alpha: torch.Tensor,
    s: torch.Tensor,
    x0: torch.Tensor,
    ok: torch.Tensor,
    dlr: torch.Tensor,
    coupled_wd: torch.Tensor,
    average: torch.Tensor,
    eps: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    averaged: bool,
    acc64: bool,
) -> None:
    """One tensor of D-Adapted AdaGrad, in place: ``alpha += g^2``, ``s += dlr g``, ``z = x0 - s
    / (sqrt(alpha) + eps)``, ``x = z`` or, with momentum, ``x += average (z - x)`` (``average =
    1 - momentum``). ``dlr`` and ``average`` are 0 on a skipped step."""
    g, p = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)
    a_new = alpha.to(g.dtype) + g * g
    s_new = s.to(g.dtype) + dlr * g
    z = x0.to(g.dtype) - s_new / (a_new.sqrt() + eps)
    param.copy_(p + average * (z - p) if averaged else torch.where(ok, z, p))
    alpha.copy_(a_new)
    s.copy_(s_new)


_ADAGRAD_STATISTICS = _pass(
    dadapt_adagrad_statistics,
    "DAdaptAdaGrad statistics",
    ("alpha", "s"),
    ("g_sq", "numerator", "s_l1"),
    native="dadapt_adagrad_stats",
)
_ADAGRAD_UPDATE = _pass(
    dadapt_adagrad_tensor_update,
    "DAdaptAdaGrad",
    ("alpha", "s", "x0"),
    (),
    ("param", "alpha", "s"),
    native="dadapt_adagrad_update",
    fused="dadapt_adagrad_fused",
    fused_sums=("numerator", "s_l1"),
)


class DAdaptAdaGrad(DAdaptationBase):
    r"""AdaGrad with D-Adaptation (Defazio & Mishchenko, ICML 2023), dual-averaging form as in the
    authors' ``dadaptation`` package (v3).

    With ``gamma`` the group's ``lr``, per coordinate ``alpha_0 = initial_accumulator_value`` and
    ``w_k = sqrt(alpha_k) + eps``::

        dlr_k     = d_k * gamma
        alpha_{k+1} = alpha_k + g_k^2
        s_{k+1}   = s_k + dlr_k g_k
        N_{k+1}   = sum s_{k+1}^2 / w_{k+1} - sum_{i<=k} dlr_i^2 sum g_i^2 / w_{i+1}
        d_hat     = N_{k+1} / ||s_{k+1}||_1
        d_{k+1}   = max(d_k, min(d_hat, growth_rate * d_k))
        z_{k+1}   = x_0 - s_{k+1} / w_{k+1}
        x_{k+1}   = beta x_k + (1 - beta) z_{k+1}      (beta = momentum; 0: x = z)

    The authors recommend the Adam or SGD variants in most situations: on top of AdaGrad the
    estimate adapts more slowly in practice. It has none of the memory options of the other
    variants: its ``s`` and ``x0`` enter the iterate itself (``z = x_0 - s / w``), so they
    cannot be subsampled (``slice_p``) without changing the method.

    Weight decay is coupled only (``wd * x`` added to the gradient, as the authors): ``x`` is
    recomputed from ``x_0`` every step, so a decoupled decay of ``x`` would be undone at the next
    step.

    Args:
        params: parameters or param groups.
        lr: multiplier of the adapted step (default 1.0).
        momentum: primal-averaging momentum in [0, 1) (default 0).
        weight_decay: L2 coefficient added to the gradient (default 0).
        eps: added to ``sqrt(alpha)`` (default 1e-6, the authors').
        initial_accumulator_value: ``alpha_0`` (default 1e-6, the authors' fixed value).
        d0, d0_rel, growth_rate, d_groups, maximize, implementation: as :class:`DAdaptSGD`.
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    State: per parameter ``alpha``, ``s``, ``x0``; model-wide ``d``, ``numerator`` (N),
    ``s_l1``, ``step``.
    """

    _MODEL_WIDE = ("d0", "growth_rate")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-6,
        initial_accumulator_value: float = 1e-6,
        d0: float = 1e-6,
        d0_rel: float = 1e-2,
        growth_rate: float = float("inf"),
        d_groups: str = "model",
        maximize: bool = False,
        implementation: str = "auto",
        *,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eps": eps,
            "initial_accumulator_value": initial_accumulator_value,
            "d0": check_positive("d0", d0),
            "d0_rel": d0_rel,
            "growth_rate": check_growth_rate(growth_rate),
            "d_groups": d_groups,
            "maximize": maximize,
            "implementation": implementation,
        }
        super().__init__(
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_in_range("momentum", group["momentum"], 0.0, 1.0)
        check_positive("eps", group["eps"])
        check_nonnegative("initial_accumulator_value", group["initial_accumulator_value"])

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["alpha"] = torch.full_like(
            param, group["initial_accumulator_value"], memory_format=torch.preserve_format
        )
        state["s"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["x0"] = param.detach().clone(memory_format=torch.preserve_format)

    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        scalars = [_scalar(group["weight_decay"], d), d * group["lr"], _scalar(group["eps"], d)]
        return _ADAGRAD_STATISTICS, scalars, _flags(group)

    def _combine_statistics(
        self,
        batch: StepBatch,
        per_group: list[dict[str, torch.Tensor]],
        d: torch.Tensor,
        step: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return {
            name: torch.stack([pg[name] for pg in per_group]).sum()
            for name in ("numerator", "s_l1")
        }

    def _update_pass(
        self,
        gb: GroupBatch,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        on = ok.to(d.dtype)
        scalars = [
            ok,
            on * d * group["lr"],
            _scalar(group["weight_decay"], d),
            on * (1.0 - group["momentum"]),
            _scalar(group["eps"], d),
        ]
        return _ADAGRAD_UPDATE, scalars, {**_flags(group), "averaged": group["momentum"] > 0}

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        numerator = self._global("numerator", d.device)
        s_l1 = self._global("s_l1", d.device)
        new_numerator = numerator + stats["numerator"]
        new_l1 = s_l1 + stats["s_l1"]
        d_hat = new_numerator / new_l1
        valid = ok & (new_l1 > 0)
        d.copy_(_d_update(d, d_hat, valid, self.param_groups[0]["growth_rate"]))
        self._store_unless_skipped(ok, numerator=new_numerator, s_l1=new_l1)

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out["d_lr"] = out["d"] * out["lr"]
        out["numerator"] = self._global_float("numerator")
        out["s_l1"] = self._global_float("s_l1")
        out["d_hat"] = out["numerator"] / out["s_l1"] if out["s_l1"] > 0 else 0.0
        return out
