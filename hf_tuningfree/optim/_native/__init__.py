"""Fused CPU loops for DoG, ADOPT, the D-Adaptation family, Prodigy and the hypergradient
optimizers, built from C once per machine, called through ``ctypes``.

Each kernel handles every tensor of a bucket (one device/dtype group) in ONE call: no per-tensor
Python, dispatcher or dynamo-guard overhead. The C code lives in real files, package data in
``optim/csrc/`` (one translation unit per family and the header they share), linked into one
library, ``hf_tuningfree_cpu_kernels_<hash>.so``. This package is:

- :mod:`.loader`: builds the library (system C compiler, cache directory, a hash of everything it
  is built from), ``load()``, ``enabled()`` (``HF_TUNINGFREE_NATIVE=0`` switches it off),
  ``accepts()`` / ``available()`` (which buckets go to C), and the checks and pointer helpers the
  bindings share;
- one module of ctypes bindings per family, each with its C functions' argument types in one
  table, ``SIGNATURES``: :mod:`.dog_adopt` (DoG, ADOPT, the guard's ``sum_sq``), :mod:`.dadapt`
  (D-Adaptation, Prodigy), :mod:`.hypergradient`.

Callers use the names re-exported here (``_native.load()``, ``_native.dadapt_kernel(...)``); a
test that replaces a binding on this module (``monkeypatch.setattr(_native, "adopt_update", ...)``)
reaches every caller, which looks the name up here at call time. The loader's own functions call
each other inside :mod:`.loader`: to make the library unavailable in a test, set
``HF_TUNINGFREE_NATIVE=0`` (``monkeypatch.setenv(_native.NATIVE_ENV_VAR, "0")``), which every
``load()`` reads, rather than replacing ``_native.load``; the build's internals (``_lib``,
``_build``, ``c_sources``, ``_library``) are patched on :mod:`.loader`.

Only CPU tensors that are contiguous and fp32 or fp64 are handled; ``ok`` (False: a gradient
somewhere was not finite; nothing is written), step sizes, step counters and learning rates are
read from the tensors' (host) memory by the C code, never on the Python side. The ADOPT,
D-Adaptation and hypergradient kernels' results do not depend on the number of threads
(elementwise work; sums of per-block sums added in a fixed order).
"""

from __future__ import annotations

from .dadapt import DADAPT_KERNELS, DADAPT_OPTIONAL, DADAPT_SLICED, dadapt_kernel
from .dog_adopt import adopt_update, dog_update, grad_sq, sum_sq
from .hypergradient import (
    Addresses,
    Tensors,
    hyper_adagrad_update,
    hyper_adam_dots,
    hyper_adam_update,
    hyper_addresses,
    hyper_direction_dots,
    hyper_rmsprop_update,
    hyper_sgd_update,
)
from .loader import (
    C_DIR,
    C_HEADERS,
    C_UNITS,
    LIBRARY_NAME,
    NATIVE_ENV_VAR,
    accepts,
    available,
    c_sources,
    enabled,
    load,
)

__all__ = [
    "C_DIR",
    "C_HEADERS",
    "C_UNITS",
    "DADAPT_KERNELS",
    "DADAPT_OPTIONAL",
    "DADAPT_SLICED",
    "LIBRARY_NAME",
    "NATIVE_ENV_VAR",
    "Addresses",
    "Tensors",
    "accepts",
    "adopt_update",
    "available",
    "c_sources",
    "dadapt_kernel",
    "dog_update",
    "enabled",
    "grad_sq",
    "hyper_adagrad_update",
    "hyper_adam_dots",
    "hyper_adam_update",
    "hyper_addresses",
    "hyper_direction_dots",
    "hyper_rmsprop_update",
    "hyper_sgd_update",
    "load",
    "sum_sq",
]
