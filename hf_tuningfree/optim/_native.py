"""Fused CPU loops for DoG, ADOPT, the D-Adaptation family, Prodigy and the hypergradient
optimizers, built from C once per machine, called through ``ctypes``.

Each function handles every tensor of a bucket (one device/dtype group) in ONE call: no
per-tensor Python, dispatcher or dynamo-guard overhead. The DoG loops parallelise within each
large tensor; the ADOPT ones split all tensors into blocks of ``BLOCK`` elements and share the
blocks among the OpenMP threads in one parallel loop.

DoG (``dog_update``, ``grad_sq``). Why not ``torch.compile``: DoG's update must also measure
the new iterate's distance from ``x_0``. Inductor (torch 2.13) emits the reduction and the
in-place store as two loops over memory, and ``torch._fused_sgd_`` plus a separate reduction
reads ``x`` and ``g`` twice; either way the step reads five streams against fused AdamW's four.
The loop below reads ``x``, ``g`` and ``x_0`` once, writes ``x`` and sums ``(x_new - x_0)^2`` in
the same pass.

ADOPT (``adopt_update``, ``sum_sq``). The update reads ``x, g, m, v`` and writes ``x, m, v``,
like fused AdamW; the ``torch.compile``d per-tensor kernel did that too, but as one call per
tensor (147 for the benchmark's model), each paying dynamo's guards and a kernel launch: the
step measured 1.9x fused AdamW on 2 cores. One C call per bucket runs the update in fused
AdamW's time (15.3 vs 14.9 ms for 24.4M fp32 parameters, the kernels alone). The
step counters (``state["step"]``, 0-dim fp32) and a tensor learning rate are read from their
memory by the C code, which also advances the counters, and a parameter's first step (``v = g^2``
only) is decided per tensor there: nothing is read on the Python side. ``sum_sq`` is the
non-finite guard's one pass over the gradients (one parallel loop over all of them, about twice
as fast here as ``torch._foreach_norm``, which runs one reduction per tensor). The arithmetic
follows ``adopt_tensor_update``'s order with torch's vectorised lerp (one fma per lerp) and
torch's scalar roundings (``1 - beta2`` as ``1 - (T)beta2``); ``sqrt`` here is correctly
rounded where torch's CPU ``sqrt`` is not always, so fp32 results differ from the per-tensor
path by an ulp on some elements (~1e-7 relative over many steps), fp64 ones by ~1e-16.

D-Adaptation and Prodigy (``dadapt_kernel``, at the end of this file; ``DADAPT_KERNELS`` lists
them). Per optimizer a read-only statistics kernel (every model-wide sum of the step: the
numerator's term, ``||s_{k+1}||``, ``||g||^2``), an update kernel, and a fused kernel that
computes the statistics from the state before the step while it updates it, used with the
guard's ``||g||^2`` kernel where no collective separates the two (one process, DDP; see
:mod:`hf_tuningfree.optim.dadapt`). Each is one call per bucket, all its tensors split into blocks
in one parallel loop; each block's sums are accumulated in double (as the torch path's
``sum(dtype=float64)``) and the blocks' sums added in block order afterwards, so the sums do not
depend on the thread count. The coefficients (``d``, ``d lr bc``, the betas' complements, ...)
are the 0-dim tensors the torch path computes, stacked into one fp64 tensor whose memory the C
code reads, rounded to the tensors' dtype as torch rounds them; the expressions follow the
per-element functions operation by operation (ISO C: no contraction into fma). Measured on the
benchmark's 24.4M parameters, the statistics kernels run at the speed of reading their inputs,
and a fused kernel takes the time of the update plus reading what only the statistics read
(Prodigy's ``x0``). Each loop is specialised for its flags
(maximize, coupled decay) so that it has no branch and vectorises (with the branch, GCC 12 left
the statistics loops scalar: 20x slower).

Hypergradient optimizers (``hyper_direction_dots``, ``hyper_adam_dots``, ``hyper_*_update``; their
C source is ``csrc/hypergradient.c``, their wrappers the last block of this file). A step is two
passes, each one call per bucket with the blocks of all its tensors in one parallel loop: first the
read-only pass that forms every tensor's hypergradient dot products ``<g, du/dh>`` (SGD: with the
momentum buffer; AdaGrad, RMSProp: with the stored direction; Adam: with ``m / (sqrt(v) c + eps)``
recomputed from the moments and the step counters), which is also the non-finite check; then, after
the tower has moved the step size (0-dim tensors, torch ops), the base update, which reads the
learned step size (and a learned momentum or decay), the step counters and ``ok`` from memory. The
dots are formed in double (products and sums), per block, the blocks of a tensor added in a fixed
order: like the updates (elementwise), they do not depend on the thread count. The updates follow
the per-element functions' order of operations, with the scalars that torch forms from 0-dim
tensors rounded in those tensors' dtype and no fma contraction: SGD's update is bit-identical to
the per-tensor path; Adam, AdaGrad and RMSProp differ by the rounding of ``sqrt`` (and Adam's bias
corrections by that of ``pow``): ~1e-7 relative in fp32. HyperAdam with learned betas keeps its
torch paths. ``hyper_addresses`` checks a bucket and takes its tensors' addresses in one pass, once
per step for both passes.

Which buckets come here is decided by :func:`accepts` (the one check every fused or C path of
the package uses, :func:`hf_tuningfree.optim.kernels.fast_path_accepts`): CPU tensors that are
contiguous, of one dtype (fp32 or fp64) and of their parameter's shape; a state tensor of another
shape raises :class:`~hf_tuningfree.optim.kernels.StateShapeError` before anything is written,
so a mismatched checkpoint cannot make the C code read or write out of bounds. The wrappers
below check again what they hand to C (every list as long as the parameters', every tensor
contiguous with its parameter's number of elements, the output tensors' sizes) with real checks
that ``python -O`` keeps. The C code writes behind autograd's back: the optimizers' base class
bumps the version counter of every parameter and state tensor after the step
(``torch.autograd.graph.increment_version``), so a step between a forward and its backward
raises, as on the torch paths.

The C code lives in real files, package data in ``csrc/``: ``blocks.h`` (the block bookkeeping
every kernel shares), ``dog_adopt.c`` (DoG, ADOPT, the guard's sum of squares), ``dadapt.c``
(D-Adaptation, Prodigy) and ``hypergradient.c``; this module is their loader and the ctypes
wrappers. The shared library (``hf_tuningfree_cpu_kernels_<hash>.so``, the three units linked
into one) is built with the system C compiler (``cc``; the same requirement as inductor's CPU
backend) into the package's cache directory
(``$HF_TUNINGFREE_CACHE``, else ``$XDG_CACHE_HOME/hf_tuningfree``, else
``~/.cache/hf_tuningfree``; the convention of :mod:`hf_tuningfree.data.assets`), under a
cross-process file lock (``filelock``, a dependency of torch), named by a hash of the sources, the
compiler flags and the CPU's feature flags (``-march=native``), so a cache shared between
machines never serves a binary built for another CPU. If anything fails, ``load()`` returns None
after one warning and callers use their torch paths. ``HF_TUNINGFREE_NATIVE=0`` switches the
library off (``load()`` returns None: ``"compiled"`` then runs ``torch.compile``, as on GPUs);
the tests use it to exercise the torch paths on a machine that has a compiler.

Only CPU tensors that are contiguous and fp32 or fp64 are handled here; the flag ``ok`` (False:
a gradient somewhere was not finite; nothing is written), step sizes, step counters and learning
rates are read from the tensors' (host) memory by the C code, never on the Python side. The
ADOPT, D-Adaptation and hypergradient functions' results do not depend on the number of threads
(elementwise work; sums of per-block sums added in a fixed order).
"""

from __future__ import annotations

import array as _pyarray
import ctypes
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .kernels import fast_path_accepts

__all__ = [
    "NATIVE_ENV_VAR",
    "accepts",
    "adopt_update",
    "available",
    "dog_update",
    "grad_sq",
    "load",
    "sum_sq",
]


#: The C sources of the library (package data in ``csrc/``): one translation unit per family and
#: the header they share (the block bookkeeping of a bucket).
C_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
C_UNITS = ("dog_adopt.c", "dadapt.c", "hypergradient.c")
C_HEADERS = ("blocks.h",)


def c_sources() -> dict[str, str]:
    """``{file name: text}`` of the library's C sources, read from :data:`C_DIR`."""
    out = {}
    for name in (*C_HEADERS, *C_UNITS):
        with open(os.path.join(C_DIR, name), encoding="utf-8") as f:
            out[name] = f.read()
    return out


# -fno-math-errno: sqrt may then be vectorised (errno is never read; torch builds with it too).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c99"]
_LIBS = ["-lm"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed = False


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Environment variable that switches the C library off when set to 0/false/no/off.
NATIVE_ENV_VAR = "HF_TUNINGFREE_NATIVE"
#: Base name of the built library (the hash of what it is built from follows).
LIBRARY_NAME = "hf_tuningfree_cpu_kernels"
_C_DTYPES = (torch.float32, torch.float64)


def _cache_dir() -> str:
    """``$HF_TUNINGFREE_CACHE``, else ``$XDG_CACHE_HOME/hf_tuningfree``, else
    ``~/.cache/hf_tuningfree`` (as :func:`hf_tuningfree.data.assets.cache_root`; not imported
    from there, which would pull the data layer into the optimizers), created if missing."""
    root = os.environ.get("HF_TUNINGFREE_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(base, "hf_tuningfree")
    root = os.path.expanduser(root)
    os.makedirs(root, exist_ok=True)
    return root


def enabled() -> bool:
    """False when ``HF_TUNINGFREE_NATIVE`` is 0/false/no/off: the torch paths then run."""
    return os.environ.get(NATIVE_ENV_VAR, "").strip().lower() not in ("0", "false", "no", "off")


_I64, _PTR, _DBL, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int

#: The argument types of the library's base kernels (each exists as ``NAME_f32`` and ``NAME_f64``;
#: the D-Adaptation and hypergradient kernels declare theirs on first use).
_SIGNATURES: dict[str, list[Any]] = {
    # ntensors, xs, gs, ns, wd, out, nthreads
    "dog_grad_sq": [_I64, _PTR, _PTR, _PTR, _DBL, _PTR, _INT],
    # ntensors, xs, gs, x0s, x0_strides, x0_offsets, ns, steps, step_stride, wd, ok, out, nthreads
    "dog_update": [_I64, *[_PTR] * 7, _I64, _DBL, _PTR, _PTR, _INT],
    # ntensors, xs, gs, ms, vs, ns, steps, lr_ptr, lr_value, beta1, beta2, eps, weight_decay,
    # coupled_wd, clip exponent, flags, ok, nthreads
    "adopt_update": [_I64, *[_PTR] * 7, *[_DBL] * 7, _INT, _PTR, _INT],
    # ntensors, gs, ns, out, nthreads
    "sum_sq": [_I64, _PTR, _PTR, _PTR, _INT],
}


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    sources = c_sources()
    parts = [*sources.values(), compiler, *_FLAGS, *_LIBS, _cpu_signature(), platform.machine()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    cache = _cache_dir()
    target = os.path.join(cache, f"{LIBRARY_NAME}_{key}.so")
    if not os.path.exists(target):
        from filelock import FileLock  # a dependency of torch

        # One builder per machine at a time; the others wait and then load its result.
        with FileLock(target + ".lock", timeout=300):
            if not os.path.exists(target):
                with tempfile.TemporaryDirectory(dir=cache) as tmp:
                    # the very sources hashed above, copied (the package may be read-only)
                    for name, text in sources.items():
                        with open(os.path.join(tmp, name), "w") as f:
                            f.write(text)
                    units = [os.path.join(tmp, name) for name in C_UNITS]
                    built = os.path.join(tmp, f"{LIBRARY_NAME}.so")
                    subprocess.run(
                        [compiler, *_FLAGS, f"-I{tmp}", *units, "-o", built, *_LIBS],
                        check=True,
                        capture_output=True,
                        timeout=120,
                    )
                    os.replace(built, target)  # atomic: a reader never sees half a file
    lib = ctypes.CDLL(target)
    for base, argtypes in _SIGNATURES.items():
        for suffix in ("_f32", "_f64"):
            fn = getattr(lib, base + suffix)
            fn.restype = None
            fn.argtypes = argtypes
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, built on first use; None (after one warning) if that fails, and
    None while ``HF_TUNINGFREE_NATIVE=0`` (see :func:`enabled`)."""
    global _lib, _failed
    if not enabled():
        return None
    if _lib is not None or _failed:
        return _lib
    with _lock:
        if _lib is None and not _failed:
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError) as exc:
                _failed = True
                detail = getattr(exc, "stderr", b"") or b""
                warnings.warn(
                    "hf_tuningfree: building the fused CPU kernels failed "
                    f"({type(exc).__name__}: {exc} {detail.decode(errors='replace')[:300]}); "
                    "using the torch paths instead.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _lib


def accepts(streams: Sequence[Sequence[torch.Tensor]], names: Sequence[str]) -> bool:
    """Whether the C loops take this bucket: ``streams`` (parameters first, then gradients and
    state, named by ``names``) pass :func:`~hf_tuningfree.optim.kernels.fast_path_accepts` for
    fp32/fp64 CPU tensors and the library is available. A tensor whose shape differs from its
    parameter's raises :class:`~hf_tuningfree.optim.kernels.StateShapeError`."""
    return fast_path_accepts(streams, names, dtypes=_C_DTYPES, cpu_only=True) and load() is not None


def available(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the C loops take these tensors as one stream (CPU, fp32/fp64, contiguous, one
    dtype): the guard's ``sum_sq`` over gradients. Buckets of parameters and their state go
    through :func:`accepts`, which also compares every tensor with its parameter."""
    return accepts([list(tensors)], ["tensor"])


def _require(condition: bool, message: str) -> None:
    """A real check (kept under ``python -O``, unlike ``assert``) of what is handed to C."""
    if not condition:
        raise ValueError(f"hf_tuningfree C kernels: {message}")


def _library() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(
            "hf_tuningfree C kernels are not available (no C compiler, a failed build or "
            f"{NATIVE_ENV_VAR}=0); check accepts(...) before calling them"
        )
    return lib


_numel = torch.Tensor.numel
_contiguous = torch.Tensor.is_contiguous
_data_ptr = torch.Tensor.data_ptr
_is_cpu = operator.attrgetter("is_cpu")
_dtype_of = operator.attrgetter("dtype")


def _checked_pointers(streams: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """The addresses of every tensor of ``streams`` (stream-major) after the checks that keep the
    C code inside them: every stream as long as the first, every tensor contiguous, on the CPU,
    of the first tensor's dtype and with its parameter's (first stream's) number of elements."""
    sizes = list(map(_numel, streams[0]))
    dtype = streams[0][0].dtype if sizes else None
    for j, stream in enumerate(streams):
        _require(
            list(map(_numel, stream)) == sizes,
            f"stream {j} does not have its parameters' number of elements (or tensors)",
        )
        _require(
            all(map(_contiguous, stream))
            and all(map(_is_cpu, stream))
            and {*map(_dtype_of, stream)} <= {dtype},
            f"stream {j} holds a tensor that is not a contiguous {dtype} CPU tensor",
        )
    return [ptr for stream in streams for ptr in map(_data_ptr, stream)]


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _stream_arrays(streams: Sequence[Sequence[torch.Tensor]]) -> list[ctypes.Array]:
    """One ctypes pointer array per stream, after :func:`_checked_pointers`' checks."""
    flat = _checked_pointers(streams)
    n = len(streams[0])
    return [(ctypes.c_void_p * n)(*flat[j * n : (j + 1) * n]) for j in range(len(streams))]


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
    lib = _library()
    if not params:
        return
    dtype = params[0].dtype
    fn = lib.dog_update_f32 if dtype == torch.float32 else lib.dog_update_f64
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
    lib = _library()
    _require(
        out.dtype == torch.float64 and out.is_cpu and out.is_contiguous()
        and out.shape == (len(params), 2),
        "out must be a contiguous fp64 CPU tensor of shape (tensors, 2)",
    )  # fmt: skip
    if not params:
        return
    fn = lib.dog_grad_sq_f32 if params[0].dtype == torch.float32 else lib.dog_grad_sq_f64
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
    lib = _library()
    _require(
        out.dtype == torch.float64 and out.is_cpu and out.numel() == 1 and out.is_contiguous(),
        "out must be a one-element fp64 CPU tensor",
    )
    n = len(tensors)
    if n == 0:
        out.zero_()
        return
    fn = lib.sum_sq_f32 if tensors[0].dtype == torch.float32 else lib.sum_sq_f64
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
    lib = _library()
    n = len(params)
    if n == 0:
        return
    fn = lib.adopt_update_f32 if params[0].dtype == torch.float32 else lib.adopt_update_f64
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


# --- D-Adaptation and Prodigy ---------------------------------------------------------------
# The kernels of ``hf_tuningfree.optim.dadapt`` (DAdaptSGD, DAdaptAdam, DAdaptAdaGrad) and
# ``hf_tuningfree.optim.prodigy``: per optimizer a read-only statistics pass and an update pass,
# each ONE call per bucket. Their C source is ``csrc/dadapt.c`` (compiled into the same library;
# the hash that names the library covers it).


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

_dadapt_fns: dict[str, ctypes._CFuncPtr] = {}


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


def _dadapt_fn(lib: ctypes.CDLL, name: str, fused: bool) -> ctypes._CFuncPtr:
    """The C function ``name`` (``..._f32``/``..._f64``) with its signature set (once)."""
    fn = _dadapt_fns.get(name)
    if fn is None:
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [
            ctypes.c_int64,  # tensors per stream
            ctypes.c_void_p,  # pointers, stream-major
            ctypes.c_void_p,  # numels
            ctypes.c_void_p,  # coefficients (fp64)
            ctypes.c_int,  # flags
            *([ctypes.c_void_p] * (2 if fused else 1)),  # ok and/or sums out
            ctypes.c_int,  # threads
        ]
        _dadapt_fns[name] = fn
    return fn


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
    lib = _library()
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
    suffix = "_f32" if streams[0][0].dtype == torch.float32 else "_f64"
    fn = _dadapt_fn(lib, name + suffix, takes_ok and nsums > 0)
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


__all__ += ["DADAPT_KERNELS", "DADAPT_OPTIONAL", "DADAPT_SLICED", "dadapt_kernel"]


# --- hypergradient optimizers
# HyperSGD, HyperAdam, HyperAdaGrad, HyperRMSProp (optim/hypergradient/): the read-only pass that
# forms the hypergradient's dot products (and is the non-finite check), then the base update.
# The C source is ``csrc/hypergradient.c`` (in the same .so); the functions are declared on
# first use.


def _hyper_argtypes() -> dict[str, list]:
    """Argument types of the hypergradient kernels (each has an _f32 and an _f64 variant)."""
    p, i64, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    return {
        "hg_direction_dots": [i64, p, p, i64, p, p, i],
        "hg_adam_dots": [i64, p, p, p, p, p, p, d, d, d, p, i],
        "hg_sgd_update": [i64, p, p, p, p, p, p, p, i, d, i, p, i],
        "hg_adam_update": [i64, p, p, p, p, p, p, p, i, d, d, d, d, i, p, i],
        "hg_adagrad_update": [i64, p, p, p, p, p, p, i, d, d, i, p, i],
        "hg_rmsprop_update": [i64, p, p, p, p, p, p, p, p, i, d, d, i, p, i],
    }


__all__ += [
    "Addresses",
    "hyper_adagrad_update",
    "hyper_adam_dots",
    "hyper_adam_update",
    "hyper_addresses",
    "hyper_direction_dots",
    "hyper_rmsprop_update",
    "hyper_sgd_update",
]


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


def _hyper_fn(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    """The ``_f32``/``_f64`` variant of a hypergradient kernel, its types declared once."""
    lib = _library()
    fn = getattr(lib, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")
    if fn.argtypes is None:
        fn.restype = None
        fn.argtypes = _hyper_argtypes()[name]
    return fn


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


def _ok_flag(ok: torch.Tensor) -> torch.Tensor:
    flag = ok if ok.dtype in (torch.bool, torch.uint8) else ok.to(torch.uint8)
    _require(flag.is_cpu and flag.numel() == 1, "ok must be one flag on the CPU")
    return flag


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
    _hyper_fn("hg_direction_dots", _dtype(grads))(
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
    _hyper_fn("hg_adam_dots", _dtype(grads))(
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
    tensors of one dtype, read from memory by the C code. Check ``accepts(...)`` first."""
    n = len(params)
    if n == 0:
        return
    _require(lr.dtype == momentum.dtype, "lr and momentum must have one dtype")
    arrays, numels = _bucket_arrays(params, grads, bufs, prevs)
    _hyper_fn("hg_sgd_update", _dtype(params))(
        n, *arrays, numels, _hyper_scalar(lr), _hyper_scalar(momentum),
        int(lr.dtype == torch.float64), float(weight_decay), int(bool(maximize)),
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
    read from memory; ``1 - beta`` and ``lr * weight_decay`` are rounded in its dtype, as the
    torch path rounds them. Check ``accepts(...)`` first."""
    n = len(params)
    if n == 0:
        return
    flags = int(bool(maximize)) | (int(bool(decoupled)) << 1)
    arrays, numels = _bucket_arrays(params, grads, exp_avgs, exp_avg_sqs)
    _hyper_fn("hg_adam_update", _dtype(params))(
        n, *arrays, numels, _counters(steps, n), _hyper_scalar(lr),
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
    given. ``lr``: 0-dim CPU tensor read from memory. Check ``accepts(...)`` first."""
    n = len(params)
    if n == 0:
        return
    arrays, numels = _bucket_arrays(params, grads, sums, directions)
    _hyper_fn("hg_adagrad_update", _dtype(params))(
        n, *arrays, numels, _hyper_scalar(lr), int(lr.dtype == torch.float64), float(eps),
        float(weight_decay), int(bool(maximize)), _ok_flag(ok).data_ptr(),
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
    read from memory. Check ``accepts(...)`` first."""
    n = len(params)
    if n == 0:
        return
    _require(lr.dtype == decay.dtype, "lr and decay must have one dtype")
    arrays, numels = _bucket_arrays(params, grads, square_avgs, directions, d_decays)
    _hyper_fn("hg_rmsprop_update", _dtype(params))(
        n, *arrays, numels, _hyper_scalar(lr), _hyper_scalar(decay),
        int(lr.dtype == torch.float64), float(eps), float(weight_decay), int(bool(maximize)),
        _ok_flag(ok).data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
