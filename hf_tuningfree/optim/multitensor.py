"""The multi-tensor (``"foreach"``) form of a per-element update function, without writing it
twice.

The D-Adaptation family states each pass once, as a function of one tensor
(``fn(param, grad, *state, *scalars, **static)``: elementwise torch ops, a few 0-dim
coefficients, ``_total`` reductions and ``copy_`` write-backs; see
:mod:`hf_tuningfree.optim.dadapt.passes`). The loop path calls it once per tensor, the compiled
path compiles it. :func:`run_multi` calls the *same* function once per device/dtype bucket with
every tensor argument a :class:`TensorList`: each elementwise operation on a ``TensorList`` is one
``torch._foreach_*`` call over the bucket's tensors (on CUDA a handful of kernel launches whatever
the number of tensors; the point of the form, after torch's own ``_multi_tensor_adam``), so the
multi-tensor form is the per-element statement, op for op, and cannot drift from it. The
hypergradient family's HyperAdaGrad and HyperRMSProp run their base update the same way, and
their per-tensor dot products through :func:`segment_dots`.

What maps to what (anything else runs per tensor, correct but one launch per tensor):

* ``+ - * /`` with a ``TensorList``, a 0-dim tensor or a number: ``_foreach_add/mul/div``
  (``a - b`` is ``a + (-1) b``, ``s - a`` is ``(-a) + s``: the same IEEE results);
* ``sqrt``, ``abs``, unary ``-`` (methods or ``torch.`` functions), ``torch.maximum``/``minimum``
  of two lists: their foreach ops;
* ``.to(dtype)``: one ``_foreach_copy_`` into new tensors (a no-op when the dtype matches, as
  ``Tensor.to``); ``.copy_(src)``: ``_foreach_copy_`` (it casts, as ``Tensor.copy_``);
* ``torch.where(cond, a, b)`` with a 0-dim ``cond`` (the non-finite guard's ``ok``): there is no
  foreach select and multiplying by 0 keeps a NaN, so the lists are concatenated (one ``cat``),
  selected once and split back into views: O(1) launches, bit-exact, one flat temporary
  (:func:`run_multi` calls ``fn`` on chunks of at most ``CHUNK_ELEMENTS``, which bounds it);
* ``.sum(dtype=...)``: the total over every tensor of the list (the pass's partial sum for the
  bucket), one ``cat`` and one reduction; the order of the additions differs from the loop's
  per-tensor sums added up, so sums agree to rounding (fp64 accumulation: ~1e-16 relative).

Everything else is exact: the same operations on the same dtypes in the same order per element.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["TensorList", "run_multi", "segment_dots"]

_Operand = Any  # TensorList | torch.Tensor (0-dim) | float | int


def _items(x: _Operand, n: int) -> list[Any]:
    return x.items if isinstance(x, TensorList) else [x] * n


class TensorList:
    """A bucket's tensors (same device and dtype) standing in for one tensor in a per-element
    update function: elementwise arithmetic is one ``torch._foreach_*`` op over all of them.
    See the module docstring for what maps to what."""

    __slots__ = ("items",)

    def __init__(self, items: Sequence[torch.Tensor]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"TensorList({len(self.items)} tensors)"

    @property
    def dtype(self) -> torch.dtype:
        return self.items[0].dtype

    # ------------------------------------------------------------------ arithmetic
    def __add__(self, other: _Operand) -> TensorList:
        return _binary("add", self, other)

    def __radd__(self, other: _Operand) -> TensorList:
        return _binary("add", other, self)

    def __sub__(self, other: _Operand) -> TensorList:
        return _binary("sub", self, other)

    def __rsub__(self, other: _Operand) -> TensorList:
        return _binary("sub", other, self)

    def __mul__(self, other: _Operand) -> TensorList:
        return _binary("mul", self, other)

    def __rmul__(self, other: _Operand) -> TensorList:
        return _binary("mul", other, self)

    def __truediv__(self, other: _Operand) -> TensorList:
        return _binary("div", self, other)

    def __rtruediv__(self, other: _Operand) -> TensorList:
        return _binary("div", other, self)

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.items))

    def __gt__(self, other: _Operand) -> TensorList:  # no foreach form: per tensor
        return _per_tensor(torch.gt, (self, other), {})

    def __lt__(self, other: _Operand) -> TensorList:
        return _per_tensor(torch.lt, (self, other), {})

    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self.items))

    def abs(self) -> TensorList:
        return TensorList(torch._foreach_abs(self.items))

    def to(self, dtype: torch.dtype) -> TensorList:
        """``Tensor.to(dtype)`` of every tensor: the list itself when nothing changes."""
        if all(t.dtype == dtype for t in self.items):
            return self
        out = [torch.empty_like(t, dtype=dtype) for t in self.items]
        torch._foreach_copy_(out, self.items)
        return TensorList(out)

    def copy_(self, src: _Operand) -> TensorList:
        """Write ``src`` (a list of the same shapes) into these tensors, casting as ``copy_``."""
        if isinstance(src, TensorList):
            torch._foreach_copy_(self.items, src.items)
        else:
            for t in self.items:
                t.copy_(src)
        return self

    def sum(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The sum of every element of every tensor (0-dim), accumulated in ``dtype``."""
        flat = _flat(self.items)
        return flat.sum() if dtype is None else flat.sum(dtype=dtype)

    # ------------------------------------------------------------------ torch functions
    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is torch.where and not kwargs and len(args) == 3:
            return _where(*args)
        if func in (torch.maximum, torch.minimum) and not kwargs and len(args) == 2:
            a, b = args
            if isinstance(a, TensorList) and isinstance(b, TensorList):
                op = torch._foreach_maximum if func is torch.maximum else torch._foreach_minimum
                return TensorList(op(a.items, b.items))
        unary = {"sqrt": torch._foreach_sqrt, "abs": torch._foreach_abs, "neg": torch._foreach_neg}
        if name in unary and not kwargs and len(args) == 1 and isinstance(args[0], TensorList):
            return TensorList(unary[name](args[0].items))
        binary = {
            "__add__": ("add", False), "__radd__": ("add", True), "add": ("add", False),
            "__sub__": ("sub", False), "__rsub__": ("sub", True), "sub": ("sub", False),
            "__mul__": ("mul", False), "__rmul__": ("mul", True), "mul": ("mul", False),
            "__truediv__": ("div", False), "__rtruediv__": ("div", True), "div": ("div", False),
        }  # fmt: skip
        if name in binary and not kwargs and len(args) == 2:
            op, swapped = binary[name]
            a, b = args
            return _binary(op, b, a) if swapped else _binary(op, a, b)
        return _per_tensor(func, args, kwargs)


def _flat(items: list[torch.Tensor]) -> torch.Tensor:
    """One 1-D tensor of every element of ``items`` (a view when there is one tensor)."""
    flats = [t.reshape(-1) for t in items]
    return flats[0] if len(flats) == 1 else torch.cat(flats)


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> TensorList:
    pieces = flat.split([t.numel() for t in like])
    return TensorList([x.view(t.shape) for x, t in zip(pieces, like, strict=True)])


_SCALAR_OPS = {"add": torch._foreach_add, "mul": torch._foreach_mul, "div": torch._foreach_div}


def _binary(op: str, a: _Operand, b: _Operand) -> TensorList:
    """``a <op> b`` where at least one side is a :class:`TensorList`; the other a list, a 0-dim
    tensor or a number."""
    if isinstance(a, TensorList) and isinstance(b, TensorList):
        if op == "sub":
            return TensorList(torch._foreach_sub(a.items, b.items))
        return TensorList(_SCALAR_OPS[op](a.items, b.items))
    if isinstance(a, TensorList):  # list <op> scalar
        if isinstance(b, torch.Tensor) and b.dim() != 0:
            return _per_tensor(_TENSOR_OPS[op], (a, b), {})
        if op == "sub":  # a - b == a + (-1) b exactly
            if isinstance(b, torch.Tensor):
                return TensorList(torch._foreach_add(a.items, b, alpha=-1))
            return TensorList(torch._foreach_add(a.items, -b))
        return TensorList(_SCALAR_OPS[op](a.items, b))
    assert isinstance(b, TensorList)
    if isinstance(a, torch.Tensor) and a.dim() != 0:
        return _per_tensor(_TENSOR_OPS[op], (a, b), {})
    if op in ("add", "mul"):  # commutative in IEEE arithmetic: the same bits
        return TensorList(_SCALAR_OPS[op](b.items, a))
    if op == "sub":  # s - b == (-b) + s exactly
        return TensorList(_SCALAR_OPS["add"](torch._foreach_neg(b.items), a))
    return _per_tensor(_TENSOR_OPS[op], (a, b), {})  # s / b: no foreach form that rounds alike


_TENSOR_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
}


def _where(cond: Any, a: _Operand, b: _Operand) -> Any:
    """``torch.where(cond, a, b)`` over lists; a 0-dim ``cond`` selects on the concatenation
    (one ``cat`` per list operand, one ``where``, views back)."""
    if not (isinstance(cond, torch.Tensor) and cond.dim() == 0):
        return _per_tensor(torch.where, (cond, a, b), {})
    like = a if isinstance(a, TensorList) else b
    assert isinstance(like, TensorList)

    def flat(x: _Operand) -> Any:
        if isinstance(x, TensorList):
            return _flat(x.items)
        if isinstance(x, torch.Tensor) and x.dim() != 0:
            raise TypeError("torch.where on a TensorList takes lists, 0-dim tensors or numbers")
        return x

    return _unflat(torch.where(cond, flat(a), flat(b)), like.items)


def _per_tensor(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``func`` once per tensor of the lists among ``args`` (the fallback for an operation with
    no foreach form); a list of tensors comes back as a :class:`TensorList`."""
    lengths = {len(a) for a in [*args, *kwargs.values()] if isinstance(a, TensorList)}
    if len(lengths) != 1:
        raise ValueError(f"TensorList operands of different lengths: {sorted(lengths)}")
    (n,) = lengths
    outs = [
        func(*(_items(a, n)[i] for a in args), **{k: _items(v, n)[i] for k, v in kwargs.items()})
        for i in range(n)
    ]
    if all(isinstance(o, torch.Tensor) for o in outs):
        return TensorList(outs)
    return outs


def run_multi(
    fn: Callable[..., Any],
    streams: Sequence[Sequence[torch.Tensor | None]],
    scalars: Sequence[torch.Tensor],
    static: dict[str, Any],
) -> list[Any]:
    """``fn`` over every tensor of a device/dtype bucket as multi-tensor calls: ``streams[j]``
    is the ``j``-th tensor argument of every tensor (``None`` where an optional state is
    missing). Tensors whose streams lack the same optional arguments are called together (one
    call per pattern of missing arguments; usually one), in chunks of at most ``CHUNK_ELEMENTS``
    elements (a tensor larger than that alone), so that the flat temporaries of ``where`` and
    ``sum`` stay bounded on a large model. Returns what each call returned."""
    n = len(streams[0])
    patterns: dict[tuple[bool, ...], list[int]] = {}
    for i in range(n):
        key = tuple(s[i] is None for s in streams)
        patterns.setdefault(key, []).append(i)
    sizes = [t.numel() for t in streams[0]]  # type: ignore[union-attr]
    outputs = []
    for missing, idx in patterns.items():
        for chunk in _chunks(idx, sizes):
            args = [
                None if absent else TensorList([s[i] for i in chunk])  # type: ignore[misc]
                for s, absent in zip(streams, missing, strict=True)
            ]
            outputs.append(fn(*args, *scalars, **static))
    return outputs


#: The most elements one multi-tensor call takes (64M: 256 MB per fp32 temporary).
CHUNK_ELEMENTS = 1 << 26


def _chunks(idx: list[int], sizes: Sequence[int]) -> list[list[int]]:
    """``idx`` cut, in order, into runs of at most ``CHUNK_ELEMENTS`` elements."""
    out: list[list[int]] = [[]]
    total = 0
    for i in idx:
        if out[-1] and total + sizes[i] > CHUNK_ELEMENTS:
            out.append([])
            total = 0
        out[-1].append(i)
        total += sizes[i]
    return out


_LENGTHS: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def _lengths(device: torch.device, sizes: tuple[int, ...]) -> torch.Tensor:
    """The segment lengths ``sizes`` as a tensor on ``device``, made once per (device, sizes):
    a host-to-device copy every step would make the step wait for the device."""
    key = (device, sizes)
    out = _LENGTHS.get(key)
    if out is None:
        if len(_LENGTHS) > 256:
            _LENGTHS.clear()
        out = _LENGTHS[key] = torch.tensor(sizes, dtype=torch.int64, device=device)
    return out


def segment_dots(
    a: Sequence[torch.Tensor], bs: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype
) -> torch.Tensor:
    """``(n, len(bs))``: row ``i`` holds ``<a[i], b[i]>`` for each list ``b`` of ``bs``, in
    ``dtype``; per ``b`` one foreach multiply, one ``cat`` and one ``segment_reduce`` whatever
    ``n`` (the per-tensor dot products a hypergradient needs). Tensors of one device and dtype;
    ``a`` and each ``b`` are cast to ``dtype`` first, as the per-tensor form does."""
    sizes = [t.numel() for t in a]
    rows = []
    for chunk in _chunks(list(range(len(a))), sizes):  # bounded temporaries, as run_multi
        left = TensorList([a[i] for i in chunk]).to(dtype)
        lengths = _lengths(a[0].device, tuple(sizes[i] for i in chunk))
        cols = []
        for b in bs:
            prods = (left * TensorList([b[i] for i in chunk]).to(dtype)).items
            cols.append(torch.segment_reduce(_flat(prods), "sum", lengths=lengths))
        rows.append(torch.stack(cols, dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows)
