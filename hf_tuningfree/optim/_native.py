"""Fused CPU loops for DoG, compiled from C once per machine and called through ``ctypes``.

Why not ``torch.compile``: DoG's update must also measure the new iterate's distance from
``x_0``. Inductor (torch 2.13) emits the reduction and the in-place store as two loops over
memory, and ``torch._fused_sgd_`` plus a separate reduction reads ``x`` and ``g`` twice; either
way the step reads five streams against fused AdamW's four. The loop below reads ``x``, ``g`` and
``x_0`` once, writes ``x`` and sums ``(x_new - x_0)^2`` in the same pass, for every tensor of a
bucket in ONE call (no per-tensor Python or guard overhead).

The shared library is built with the system C compiler (``cc``; the same requirement as
inductor's CPU backend) into ``$HF_TUNINGFREE_CACHE`` or ``~/.cache/hf_tuningfree``, named by a
hash of the source, the compiler flags and the CPU's feature flags (``-march=native``), so a
cache shared between machines never serves a binary built for another CPU. If anything fails,
``load()`` returns None after one warning and callers use their torch paths.

Only CPU tensors that are contiguous and fp32 or fp64 are handled here; the flag ``ok`` and the
step sizes are read from the tensors' (host) memory by the C code, never on the Python side.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence

import torch

__all__ = ["available", "dog_update", "grad_sq", "load"]

_SOURCE = r"""
#include <stdint.h>
#define BLOCK 8192

/* For every tensor k of a bucket, if *ok:
     x <- x - s_k * (g + wd * x)        (s_k = steps[k * step_stride])
     out[k] <- sum_i (x_new_i - x0_i)^2 (accumulated per block in T, then in double)
   If !*ok nothing is written. */
#define DOG_UPDATE(NAME, T)                                                                    \
void NAME(int64_t ntensors, T** xs, T** gs, T** x0s, const int64_t* ns, const T* steps,       \
          int64_t step_stride, double wd, const uint8_t* ok, double* out, int nthreads) {      \
    if (!*ok) return;                                                                          \
    const T w = (T)wd;                                                                         \
    for (int64_t k = 0; k < ntensors; ++k) {                                                   \
        T* x = xs[k]; const T* g = gs[k]; const T* x0 = x0s[k];                                \
        const int64_t n = ns[k];                                                               \
        const T s = steps[k * step_stride];                                                    \
        double total = 0.0;                                                                    \
        _Pragma("omp parallel for reduction(+:total) num_threads(nthreads) if(n > 4 * BLOCK)") \
        for (int64_t b = 0; b < n; b += BLOCK) {                                               \
            const int64_t e = b + BLOCK < n ? b + BLOCK : n;                                   \
            T acc = 0;                                                                         \
            _Pragma("omp simd reduction(+:acc)")                                               \
            for (int64_t i = b; i < e; ++i) {                                                  \
                const T xi = x[i];                                                             \
                const T xn = xi - s * (g[i] + w * xi);                                         \
                x[i] = xn;                                                                     \
                const T d = xn - x0[i];                                                        \
                acc += d * d;                                                                  \
            }                                                                                  \
            total += (double)acc;                                                              \
        }                                                                                      \
        out[k] = total;                                                                        \
    }                                                                                          \
}

DOG_UPDATE(dog_update_f32, float)
DOG_UPDATE(dog_update_f64, double)

/* For every tensor k: out[2k] <- sum g^2, out[2k+1] <- sum (g + wd * x)^2 (x is not read when
   wd == 0). */
#define DOG_GRAD_SQ(NAME, T)                                                                   \
void NAME(int64_t ntensors, T** xs, T** gs, const int64_t* ns, double wd, double* out,        \
          int nthreads) {                                                                      \
    const T w = (T)wd;                                                                         \
    for (int64_t k = 0; k < ntensors; ++k) {                                                   \
        const T* x = xs[k]; const T* g = gs[k];                                                \
        const int64_t n = ns[k];                                                               \
        double s1 = 0.0, s2 = 0.0;                                                             \
        if (wd == 0.0) {                                                                       \
            _Pragma("omp parallel for reduction(+:s1) num_threads(nthreads) if(n > 4 * BLOCK)") \
            for (int64_t b = 0; b < n; b += BLOCK) {                                           \
                const int64_t e = b + BLOCK < n ? b + BLOCK : n;                               \
                T acc = 0;                                                                     \
                _Pragma("omp simd reduction(+:acc)")                                           \
                for (int64_t i = b; i < e; ++i) acc += g[i] * g[i];                            \
                s1 += (double)acc;                                                             \
            }                                                                                  \
            s2 = s1;                                                                           \
        } else {                                                                               \
            _Pragma("omp parallel for reduction(+:s1,s2) num_threads(nthreads) if(n > 4 * BLOCK)") \
            for (int64_t b = 0; b < n; b += BLOCK) {                                           \
                const int64_t e = b + BLOCK < n ? b + BLOCK : n;                               \
                T a1 = 0, a2 = 0;                                                              \
                _Pragma("omp simd reduction(+:a1,a2)")                                         \
                for (int64_t i = b; i < e; ++i) {                                              \
                    const T gi = g[i];                                                         \
                    const T ei = gi + w * x[i];                                                \
                    a1 += gi * gi;                                                             \
                    a2 += ei * ei;                                                             \
                }                                                                              \
                s1 += (double)a1;                                                              \
                s2 += (double)a2;                                                              \
            }                                                                                  \
        }                                                                                      \
        out[2 * k] = s1;                                                                       \
        out[2 * k + 1] = s2;                                                                   \
    }                                                                                          \
}

DOG_GRAD_SQ(dog_grad_sq_f32, float)
DOG_GRAD_SQ(dog_grad_sq_f64, double)
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
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


def _cache_dir() -> str:
    root = os.environ.get("HF_TUNINGFREE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hf_tuningfree"
    )
    os.makedirs(root, exist_ok=True)
    return root


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    key = hashlib.sha256(
        "\0".join([_SOURCE, compiler, *_FLAGS, _cpu_signature(), platform.machine()]).encode()
    ).hexdigest()[:16]
    target = os.path.join(_cache_dir(), f"dog_kernels_{key}.so")
    if not os.path.exists(target):
        with tempfile.TemporaryDirectory(dir=_cache_dir()) as tmp:
            src = os.path.join(tmp, "dog_kernels.c")
            with open(src, "w") as f:
                f.write(_SOURCE)
            built = os.path.join(tmp, "dog_kernels.so")
            subprocess.run(
                [compiler, *_FLAGS, src, "-o", built],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(built, target)  # atomic: concurrent builders never see half a file
    lib = ctypes.CDLL(target)
    for name in ("dog_grad_sq_f32", "dog_grad_sq_f64"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_double,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
    for name in ("dog_update_f32", "dog_update_f64"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_double,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, built on first use; None (after one warning) if that fails."""
    global _lib, _failed
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
                    "hf_tuningfree: building the fused CPU kernel for DoG failed "
                    f"({type(exc).__name__}: {exc} {detail.decode(errors='replace')[:300]}); "
                    "using the torch paths instead.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _lib


def available(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``dog_update`` handles these tensors (CPU, fp32/fp64, contiguous, one dtype)."""
    if not tensors:
        return False
    dtype = tensors[0].dtype
    return (
        dtype in (torch.float32, torch.float64)
        and all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)
        and load() is not None
    )


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def dog_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    x0s: Sequence[torch.Tensor],
    steps: torch.Tensor,
    weight_decay: float,
    ok: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """``x <- x - s (g + wd x)`` and ``out[k] <- ||x_k - x0_k||^2`` for every tensor, where the
    0-dim bool ``ok`` is True; nothing is written otherwise. ``steps``: the step size of every
    tensor (1-D, the parameters' dtype) or one for all (0-dim or 1 element); ``out``: fp64, one
    entry per tensor. Check ``available(...)`` first."""
    lib = load()
    assert lib is not None
    dtype = params[0].dtype
    fn = lib.dog_update_f32 if dtype == torch.float32 else lib.dog_update_f64
    steps = steps.to(dtype).contiguous()
    ok_u8 = ok.to(torch.uint8).contiguous()
    assert out.dtype == torch.float64 and out.is_contiguous() and out.numel() == len(params)
    fn(
        len(params),
        _pointers(params),
        _pointers(grads),
        _pointers(x0s),
        (ctypes.c_int64 * len(params))(*[p.numel() for p in params]),
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
    reduction pass (over ``g`` only when ``weight_decay`` is 0). Check ``available(...)`` first."""
    lib = load()
    assert lib is not None
    fn = lib.dog_grad_sq_f32 if params[0].dtype == torch.float32 else lib.dog_grad_sq_f64
    assert out.dtype == torch.float64 and out.is_contiguous() and out.shape == (len(params), 2)
    fn(
        len(params),
        _pointers(params),
        _pointers(grads),
        (ctypes.c_int64 * len(params))(*[p.numel() for p in params]),
        float(weight_decay),
        out.data_ptr(),
        torch.get_num_threads(),
    )
