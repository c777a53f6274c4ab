"""The loader of the fused CPU kernels: builds the C library once per machine, loads it, says which
buckets it takes, and holds the checks and pointer helpers every family's ctypes bindings use
(:mod:`.dog_adopt`, :mod:`.dadapt`, :mod:`.hypergradient`).

The C code lives in real files, package data in ``optim/csrc/``: ``blocks.h`` (the block
bookkeeping every kernel shares), ``dog_adopt.c`` (DoG, ADOPT, the guard's sum of squares),
``dadapt.c`` (D-Adaptation, Prodigy) and ``hypergradient.c``. The shared library
(``hf_tuningfree_cpu_kernels_<hash>.so``, the three units linked into one) is built with the system
C compiler (``cc``; the same requirement as inductor's CPU backend) into the package's cache
directory (``$HF_TUNINGFREE_CACHE``, else ``$XDG_CACHE_HOME/hf_tuningfree``, else
``~/.cache/hf_tuningfree``; the convention of :mod:`hf_tuningfree.data.assets`), under a
cross-process file lock (``filelock``, a dependency of torch), named by a hash of the sources, the
compiler flags and the CPU's feature flags (``-march=native``), so a cache shared between machines
never serves a binary built for another CPU. If anything fails, ``load()`` returns None after one
warning and callers use their torch paths. ``HF_TUNINGFREE_NATIVE=0`` switches the library off
(``load()`` returns None: ``"compiled"`` then runs ``torch.compile``, as on GPUs); the tests use it
to exercise the torch paths on a machine that has a compiler.

Which buckets go to C is decided by :func:`accepts` (the one check every fused or C path of the
package uses, :func:`hf_tuningfree.optim.kernels.fast_path_accepts`): CPU tensors that are
contiguous, of one dtype (fp32 or fp64) and of their parameter's shape; a state tensor of another
shape raises :class:`~hf_tuningfree.optim.kernels.StateShapeError` before anything is written, so a
mismatched checkpoint cannot make the C code read or write out of bounds. The bindings check again
what they hand to C (every list as long as the parameters', every tensor contiguous with its
parameter's number of elements, the output tensors' sizes) with real checks that ``python -O``
keeps (:func:`_require`). The C code writes behind autograd's back: the optimizers' base class
bumps the version counter of every parameter and state tensor after the step
(``torch.autograd.graph.increment_version``), so a step between a forward and its backward raises,
as on the torch paths.

Every C function exists as ``NAME_f32`` and ``NAME_f64``. Each family module declares its
functions' argument types in one table, ``SIGNATURES`` (``{NAME: [ctypes types]}``), and fetches a
function with :func:`function` (``restype`` None, ``argtypes`` from the table, set on first use).
Only CPU tensors that are contiguous and fp32 or fp64 are handled; the flag ``ok`` (False: a
gradient somewhere was not finite; nothing is written), step sizes, step counters and learning
rates are read from the tensors' (host) memory by the C code, never on the Python side.
"""

from __future__ import annotations

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
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..kernels import fast_path_accepts

#: The C sources of the library (package data in ``csrc/``): one translation unit per family and
#: the header they share (the block bookkeeping of a bucket).
C_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
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


#: The ctypes types the families' ``SIGNATURES`` tables are written in.
I64, PTR, DBL, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int


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
    return ctypes.CDLL(target)


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


def _ok_flag(ok: torch.Tensor) -> torch.Tensor:
    flag = ok if ok.dtype in (torch.bool, torch.uint8) else ok.to(torch.uint8)
    _require(flag.is_cpu and flag.numel() == 1, "ok must be one flag on the CPU")
    return flag


def function(
    lib: ctypes.CDLL, signatures: Mapping[str, Sequence[Any]], name: str, dtype: torch.dtype
) -> Any:
    """The C function ``name`` of ``lib`` for ``dtype`` (``NAME_f32`` or ``NAME_f64``; any other
    dtype raises ``ValueError``), its ``argtypes`` set from ``signatures[name]`` (and ``restype``
    None) on first use; ctypes keeps the function object on the library, so they are set once."""
    _require(dtype in _C_DTYPES, f"{name} takes fp32 or fp64 tensors, got {dtype}")
    fn = getattr(lib, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")
    if fn.argtypes is None:
        fn.restype = None
        fn.argtypes = list(signatures[name])
    return fn
