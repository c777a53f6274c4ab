"""Which code path runs an optimizer's elementwise update (:func:`choose_path`, the one dispatch
rule of every optimizer here), and the compiled per-tensor kernel.

Every optimizer here writes its elementwise update once, as a function of ONE parameter tensor and
its state (plus 0-dim tensors for the per-step coefficients). ``implementation=`` names the form
that runs it; each value means one thing on every device:

``"native"``
    the C loops of :mod:`hf_tuningfree.optim._native`: every tensor of a bucket in one call,
    built once per machine with the system C compiler. CPU only, fp32/fp64, contiguous tensors of
    their parameters' shapes; a bucket they cannot take (another device or dtype, a strided
    tensor, no compiler) runs ``"loop"``.
``"compiled"``
    the per-tensor function compiled once with ``torch.compile(dynamic=True)`` and called on
    flattened views, so one compiled kernel serves every shape. Inductor emits one fused loop (C++
    with OpenMP on CPU, Triton on GPU) that reads and writes each tensor once, like the fused AdamW.
    Compilation that fails (no C++ compiler, no Triton, an unsupported torch) warns once and runs
    ``"loop"``: training never stops for it.
``"foreach"``
    a multi-tensor form: ``torch._foreach_*`` ops or torch's fused multi-tensor kernels
    (``torch._fused_sgd_``, ``torch._fused_adam_``), O(1) launches per bucket on GPUs. Only the
    optimizers that have one offer it (their ``PATHS``); asking one without it is a ValueError when
    the optimizer is built. A bucket the fused kernels cannot take runs ``"loop"``.
``"loop"``
    eagerly, tensor by tensor: the readable path, the one every other is tested against.

``"auto"`` walks the optimizer's measured order of preference for the device (``AUTO_ORDER``; see
:func:`choose_path` and ``benchmarks/step_time.py``) and takes the first form the bucket can run.
The environment variable ``HF_TUNINGFREE_IMPL`` replaces ``"auto"`` by one form (for quick tests);
an optimizer that does not offer that form keeps its own ``"auto"``.

Which tensors a path that takes raw memory may see is decided in one place,
:func:`fast_path_accepts`: torch's fused multi-tensor kernels (``torch._fused_sgd_``,
``torch._fused_adam(w)_``; on CPU in torch 2.13 they treat every tensor as contiguous memory of
its parameter's size and check neither) and the C loops of :mod:`hf_tuningfree.optim._native`
get a bucket only when every tensor in it is contiguous, of the bucket's dtype and device, and of
its parameter's shape; a state tensor of another shape raises :class:`StateShapeError` before
anything is written.
"""

from __future__ import annotations

import operator
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Every value of ``implementation=``: ``"auto"`` and the four forms (see the module docstring).
IMPLEMENTATIONS = ("auto", "native", "compiled", "foreach", "loop")
#: The forms, without ``"auto"``.
PATHS = IMPLEMENTATIONS[1:]

#: Environment variable that overrides what ``"auto"`` resolves to (e.g. ``loop`` in quick tests).
IMPL_ENV_VAR = "HF_TUNINGFREE_IMPL"

#: On CPU, compile only when a parameter group holds at least this many elements: below it the
#: one-off compile (seconds) costs more than the per-step saving. Measured in
#: benchmarks/step_time.py; see README "Performance".
CPU_COMPILE_MIN_NUMEL = 1 << 22
#: torch 2.13's CPU ``_fused_sgd_`` (``SGD(fused=True)`` too) leaves the vectorised part of
#: bf16/fp16 tensors unchanged (3 of 4,099 bf16 elements updated): on CPU it gets these only.
FUSED_SGD_CPU_DTYPES = (torch.float32, torch.float64)


class StateShapeError(RuntimeError):
    """A per-parameter state tensor (or gradient) whose shape differs from its parameter's: the
    fused and C paths would read or write past its end. ``param`` is the parameter (as the kernel
    saw it) and ``key`` the state key, so the optimizer can name both."""

    def __init__(self, message: str, *, param: torch.Tensor, key: str) -> None:
        super().__init__(message)
        self.param = param
        self.key = key


def fast_path_accepts(
    streams: Sequence[Sequence[torch.Tensor]],
    names: Sequence[str],
    *,
    dtypes: Sequence[torch.dtype],
    cpu_only: bool,
) -> bool:
    """Whether a fused multi-tensor kernel or a C loop may take this bucket.

    ``streams``: parallel lists, the parameters first, then gradients and state (``names`` gives
    each stream's name for errors). Every tensor must have its parameter's shape, else
    :class:`StateShapeError` (whatever path would run: a mismatched state is an error on every
    path). Returns False, so that the caller runs its per-tensor torch path, when a tensor is not
    contiguous, not of the parameters' dtype (one of ``dtypes``) or not on the parameters' device
    (on CPU when ``cpu_only``)."""
    params = streams[0]
    if not params:
        return False
    dtype = params[0].dtype
    device = params[0].device
    # Whole-list comparisons (C-level iteration): this runs for every bucket at every step.
    shapes = list(map(_shape, params))
    accepted = dtype in dtypes and (params[0].is_cpu or not cpu_only)
    for stream, name in zip(streams, names, strict=True):
        if len(stream) != len(params):
            raise ValueError(
                f"{name}: {len(stream)} tensors for {len(params)} parameters in one bucket"
            )
        if list(map(_shape, stream)) != shapes:
            t, p = next((t, p) for t, p in zip(stream, params, strict=True) if t.shape != p.shape)
            raise StateShapeError(
                f"{name} has shape {list(t.shape)} but its parameter has shape {list(p.shape)}",
                param=p,
                key=name,
            )
        accepted = accepted and (
            all(map(_is_contiguous, stream))
            and {*map(_dtype, stream)} == {dtype}
            and (all(map(_is_cpu, stream)) if cpu_only else {*map(_device, stream)} == {device})
        )
    return accepted


_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_is_cpu = operator.attrgetter("is_cpu")
_is_contiguous = torch.Tensor.is_contiguous


def _compile_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    try:
        import torch._dynamo.exc as dynamo_exc

        errors += [dynamo_exc.TorchDynamoException]
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch._inductor.exc as inductor_exc

        errors += [inductor_exc.InductorError, inductor_exc.CppCompileError]
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    # A missing compiler or Triton surfaces as one of these before any tensor is written.
    errors += [ImportError, OSError, NotImplementedError]
    return tuple(errors)


def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can be tried for kernels on ``device``."""
    if not hasattr(torch, "compile"):
        return False
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return device.type == "cpu"


@dataclass(frozen=True)
class AutoOrder:
    """What ``"auto"`` tries, in order, per device kind (measured in benchmarks/step_time.py).

    ``"compiled"`` in the CPU order is taken only for buckets of at least
    ``CPU_COMPILE_MIN_NUMEL`` elements (below it the one-off compile costs more than it saves)."""

    cpu: tuple[str, ...] = ("native", "compiled", "loop")
    cuda: tuple[str, ...] = ("compiled", "foreach", "loop")
    other: tuple[str, ...] = ("foreach", "loop")

    def for_device(self, device: torch.device) -> tuple[str, ...]:
        return {"cpu": self.cpu, "cuda": self.cuda}.get(device.type, self.other)


def check_implementation(owner: str, value: object, offered: Sequence[str]) -> str:
    """``value`` must be ``"auto"`` or one of the forms ``owner`` offers (``offered``); a form it
    lacks is named as such, so that ``"foreach"`` on an optimizer without one says so."""
    allowed = ["auto", *offered]
    if value in allowed:
        return value  # type: ignore[return-value]
    if value in PATHS:
        raise ValueError(
            f"Invalid implementation for {owner}: {value!r} (it has no {value} form); allowed: "
            f"one of {allowed}"
        )
    raise ValueError(f"Invalid implementation: {value!r}; allowed: one of {allowed}")


def _env_path() -> str | None:
    env = os.environ.get(IMPL_ENV_VAR, "").strip()
    if not env:
        return None
    if env not in PATHS:
        raise ValueError(f"Invalid {IMPL_ENV_VAR}={env!r}; allowed: one of {list(PATHS)}")
    return env


def choose_path(
    requested: str,
    device: torch.device,
    numel: int,
    *,
    offered: Sequence[str],
    order: AutoOrder,
    native: Callable[[], bool] | None = None,
    foreach: Callable[[], bool] | None = None,
) -> str:
    """The form that runs one bucket (one device, one dtype) of ``numel`` elements: one of
    ``"native"``, ``"compiled"``, ``"foreach"``, ``"loop"``. Every optimizer here dispatches
    through this function.

    ``offered``: the forms the optimizer (or the piece of its step) has; ``order``: what ``"auto"``
    tries. ``native`` / ``foreach``: whether the C loops / the fused multi-tensor kernels take this
    bucket (called only when that form is considered; None: never). A requested form the bucket
    cannot take runs ``"loop"``; ``"auto"`` moves on to its next choice. ``HF_TUNINGFREE_IMPL``
    replaces ``"auto"`` by the form it names where ``offered`` holds it."""

    def runs(path: str, explicit: bool) -> bool:
        if path not in offered:
            return False
        if path == "native":
            return device.type == "cpu" and native is not None and native()
        if path == "compiled":
            if explicit:
                return True  # a failed compile warns and runs the loop (CompiledKernel)
            if device.type == "cpu":
                return numel >= CPU_COMPILE_MIN_NUMEL and compile_available(device)
            return compile_available(device)
        if path == "foreach":
            return foreach is None or foreach()
        return True

    if requested == "auto":
        env = _env_path()
        if env is not None and env in offered:
            requested = env
    if requested != "auto":
        return requested if runs(requested, explicit=True) else "loop"
    for path in order.for_device(device):
        if runs(path, explicit=False):
            return path
    return "loop"


class CompiledKernel:
    """A per-tensor update function, compiled lazily on first use.

    ``kernel(tensors, *args, **kwargs)`` calls ``fn(*flat_tensors, *args, **kwargs)`` where every
    tensor in ``tensors`` is passed as a flat 1-D alias (see ``flat_alias``); tensors that cannot
    be flattened without a copy (non-contiguous) go through ``fn`` eagerly.
    Compile time is recorded in ``compile_seconds``.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self._compiled: Callable[..., Any] | None = None
        self._failed = False
        self._warmed: set[tuple[Any, ...]] = set()
        self.compile_seconds = 0.0

    @property
    def failed(self) -> bool:
        return self._failed

    def _get(self) -> Callable[..., Any]:
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        return self._compiled

    def __call__(self, tensors: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """Run the kernel; returns what ``fn`` returns (``None`` for in-place updates, 0-dim
        tensors for reductions)."""
        # Tensors of 0 or 1 elements would each cost a specialised recompile (dynamo treats sizes
        # 0 and 1 specially) for no speed-up; non-contiguous ones cannot be viewed flat.
        if self._failed or tensors[0].numel() <= 1 or not all(t.is_contiguous() for t in tensors):
            return self.fn(*tensors, *args, **kwargs)
        flat = [flat_alias(t) for t in tensors]
        # A (dtype, device, static-arguments) combination compiles once; time its first call.
        key = (tensors[0].dtype, tensors[0].device.type, *sorted(kwargs.items()))
        if key in self._warmed:
            return self._get()(*flat, *args, **kwargs)
        start = time.perf_counter()
        try:
            with _room_for_variants():
                out = self._get()(*flat, *args, **kwargs)
        except _compile_errors() as exc:
            self._failed = True
            warnings.warn(
                f"hf_tuningfree: compiling the {self.name} kernel failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); falling back to the eager "
                "per-tensor path for the rest of this process.",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn(*tensors, *args, **kwargs)
        self._warmed.add(key)
        self.compile_seconds += time.perf_counter() - start
        return out


def flat_alias(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor over the same memory as contiguous ``t`` that is not a *view* of it.

    ``t.view(-1)`` would do, but dynamo guards on a view's base, so every parameter rank would
    compile its own kernel; an alias made with ``set_`` has no base and one kernel serves all."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def _room_for_variants() -> Any:
    """Each (dtype, flags) variant of a kernel is one dynamo cache entry; allow more than the
    default 8 so a process that trains several kinds of models keeps every variant compiled."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), 64)})


def order_for_compile(kernel: CompiledKernel, sizes: Sequence[int]) -> list[int]:
    """Index order for calling ``kernel`` over tensors of ``sizes``.

    Inductor sizes its CPU parallelisation from the first example it compiles for; compiling on
    the largest tensor first keeps a leading bias vector from producing a single-threaded kernel.
    """
    order = list(range(len(sizes)))
    if not kernel._warmed and sizes:
        largest = max(order, key=lambda i: sizes[i])
        order.remove(largest)
        order.insert(0, largest)
    return order
