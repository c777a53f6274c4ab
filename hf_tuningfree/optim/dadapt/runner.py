"""How a described pass runs over a step's tensors: :class:`PassRunner`, the part of
:class:`~hf_tuningfree.optim.dadapt.machinery.DAdaptationBase` that takes a
:class:`~hf_tuningfree.optim.dadapt.passes.TensorPass` with its scalars and runs it.

Per device/dtype bucket it picks the path (the C kernels of :mod:`hf_tuningfree.optim._native`
in one call for the bucket; the pass's function over the whole bucket as foreach ops
(:func:`~hf_tuningfree.optim.multitensor.run_multi`); else the compiled function or the loop,
which pack the small tensors into one call); with ``slice_p > 1`` it runs the statistics and
the update of ``s`` on the kept elements; in a fused step it makes the one C call per group
that updates the state and returns the sums. What a step computes, and when, is the base
class's (:mod:`~hf_tuningfree.optim.dadapt.machinery`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .. import _native
from ..base import GroupBatch, StepBatch, compute_dtype
from ..distributed import is_dtensor
from ..kernels import CompiledKernel, order_for_compile
from ..multitensor import run_multi
from .passes import (
    TensorPass,
    _buckets,
    _cat,
    _column,
    _compiled_without,
    _kept,
    _kept_count,
    _native_accepts,
    _pack,
    _run_native,
    _scalar,
    _sq_sum,
    _state_streams,
)


def _fusable(gb: GroupBatch, withheld: frozenset[str]) -> bool:
    """Whether the fused C kernels take every stream of ``gb`` (``withheld``: state kept at
    ``1/k`` size under ``slice_p``, checked by the kernels themselves)."""
    for streams, names in _state_streams(gb):
        kept = [i for i, n in enumerate(names) if n not in withheld]
        if len(kept) > 1 and not _native.accepts(
            [streams[i] for i in kept], [names[i] for i in kept]
        ):
            return False
    return True


class PassRunner:
    """Runs the passes of a D-Adaptation step (mixed into
    :class:`~hf_tuningfree.optim.dadapt.machinery.DAdaptationBase`, whose ``_path``,
    ``_slice_p``, ``_scalar_dtype``, ``SLICED_KEYS`` and ``_SCALE_SLICED_SUMS`` it reads).

    Tensors of fewer than ``PACK_BELOW`` elements (biases, norms) are packed: each of their lists
    is concatenated into one flat tensor, the pass runs once on the packed tensors and what it
    wrote is copied back. A call costs ~50-100 us of Python and dispatch whatever the size, so one
    call instead of one per bias is most of the step time of a small model, and of the packed part
    of a large one; the copies are a few hundred kB.
    """

    PACK_BELOW = 1 << 14

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
                    takes = None
                    if tensor_pass.native is not None:
                        takes = functools.partial(_native_accepts, bucket, ["param", "grad", *keys])
                    impl = self._path(gb.group, dev, numel, native=takes)
                    if impl == "native":
                        # one C call for the whole bucket, no packing needed
                        sums = len(tensor_pass.sums)
                        out = _run_native(tensor_pass.native, sums, bucket, scalars, static)
                        outputs = [] if out is None else [out]
                    else:
                        cdt = compute_dtype(dt)
                        args = [
                            a.to(dev) if a.dtype == torch.bool else a.to(dev, cdt) for a in scalars
                        ]
                        flags = {**static, "acc64": dev.type == "cpu"}
                        if impl == "foreach":  # the same function over the whole bucket
                            outputs = run_multi(tensor_pass.fn, bucket, args, flags)
                        else:
                            kernel = tensor_pass.compiled if impl == "compiled" else tensor_pass.fn
                            outputs = self._run_bucket(bucket, written, kernel, args, flags)
                    if tensor_pass.sums:
                        for out in outputs:
                            for name, value in zip(tensor_pass.sums, out, strict=True):
                                partial[name].append(value)
            results.append(
                {n: batch.sum_on_device(v) if v else _scalar(0.0, d0) for n, v in partial.items()}
            )
        return results

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
            takes = functools.partial(_native.accepts, [grads], ["grad"])
            if self._path(gb.group, dev, numel, native=takes) == "native":
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

    def _run_fused(
        self,
        gb: GroupBatch,
        tensor_pass: TensorPass,
        scalars: list[torch.Tensor],
        static: dict[str, Any],
    ) -> dict[str, torch.Tensor]:
        """The update pass of ``gb`` as its ``fused`` C kernel, one call for the group; returns
        the statistics it computes from the state before the step (``fused_sums``; zeros for a
        group without gradients)."""
        assert tensor_pass.fused is not None
        names = tensor_pass.fused_sums
        if not gb.params:
            return {n: torch.zeros((), dtype=torch.float64) for n in names}
        stride = self._slice_p()
        scale = float(stride) if stride > 1 and self._SCALE_SLICED_SUMS else 1.0
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
        return dict(zip(names, out, strict=True))  # type: ignore[arg-type]

    @staticmethod
    def _grad_sq(gb: GroupBatch) -> torch.Tensor:
        """``||g||^2`` over a group's gradients (fp64, 0-dim), one C call (fused steps only)."""
        if not gb.params:
            return torch.zeros((), dtype=torch.float64)
        flags = {"maximize": False, "coupled": False}
        return _run_native("dadapt_grad_sq", 1, [gb.grads], [], flags)[0]  # type: ignore[index]
