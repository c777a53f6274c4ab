"""The C library's build: its sources are real files shipped as package data, every one of them
decides the library's name (hash), and the cache directory follows the documented order."""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import pytest
import torch

from hf_tuningfree.optim import _native
from hf_tuningfree.optim._native import dadapt, dog_adopt, hypergradient, loader

ROOT = Path(__file__).resolve().parents[1]


def test_every_c_source_is_package_data_and_read_by_the_loader():
    on_disk = sorted(p.name for p in Path(_native.C_DIR).iterdir() if p.suffix in (".c", ".h"))
    assert on_disk == sorted((*_native.C_HEADERS, *_native.C_UNITS))
    # (no tomllib on Python 3.10) the package-data line of the optim package
    line = re.search(
        r'^"hf_tuningfree\.optim" = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.M
    )
    assert line is not None
    globs = re.findall(r'"([^"]+)"', line.group(1))
    for name in on_disk:
        assert any(fnmatch.fnmatch(f"csrc/{name}", g) for g in globs), name
    sources = _native.c_sources()
    assert set(sources) == set(on_disk)
    for unit in _native.C_UNITS:
        assert '#include "blocks.h"' in sources[unit], unit


def test_a_change_in_any_source_builds_a_library_of_another_name(monkeypatch, tmp_path):
    """Built into an empty cache; then the header and a unit, each changed by a comment, give new
    names (a stale binary is never loaded for new code; every file is in the hash alike)."""
    if _native.load() is None:
        pytest.skip("no C compiler on this machine: the torch paths run instead")
    monkeypatch.setenv("HF_TUNINGFREE_CACHE", str(tmp_path))
    original = _native.c_sources()
    names = set()
    for changed in [None, "blocks.h", "dadapt.c"]:
        sources = dict(original)
        if changed is not None:
            sources[changed] += "\n/* changed */\n"
        monkeypatch.setattr(loader, "c_sources", lambda s=sources: s)
        lib = loader._build()
        names.add(os.path.basename(lib._name))
    assert len(names) == 3
    assert all(n.startswith(f"{_native.LIBRARY_NAME}_") and n.endswith(".so") for n in names)


def test_the_cache_directory_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TUNINGFREE_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loader._cache_dir() == str(tmp_path / "own")
    monkeypatch.delenv("HF_TUNINGFREE_CACHE")
    assert loader._cache_dir() == str(tmp_path / "xdg" / "hf_tuningfree")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert loader._cache_dir() == str(tmp_path / "home" / ".cache" / "hf_tuningfree")


def test_every_signature_names_a_function_of_the_library(monkeypatch):
    """Each family's one table (``SIGNATURES``) names functions the library has in both dtypes;
    the names callers use on ``_native`` are the family modules' own objects; a dtype without a
    C variant is refused before any pointer is taken; ``HF_TUNINGFREE_NATIVE=0`` (the switch
    the tests use) makes ``accepts`` refuse every bucket."""
    lib = _native.load()
    if lib is None:
        pytest.skip("no C compiler on this machine: the torch paths run instead")
    families = (dog_adopt, dadapt, hypergradient)
    for family in families:
        for name, argtypes in family.SIGNATURES.items():
            for suffix in ("_f32", "_f64"):
                assert hasattr(lib, name + suffix), name + suffix
            assert all(t in (loader.I64, loader.PTR, loader.DBL, loader.INT) for t in argtypes)
        for name in family.__all__:
            if name != "SIGNATURES":
                assert getattr(_native, name) is getattr(family, name), name
    assert set(dadapt.SIGNATURES) == set(dadapt.DADAPT_KERNELS)
    fn = loader.function(lib, dog_adopt.SIGNATURES, "sum_sq", torch.float64)
    assert fn.argtypes == dog_adopt.SIGNATURES["sum_sq"] and fn.restype is None
    with pytest.raises(ValueError, match="sum_sq takes fp32 or fp64 tensors"):
        loader.function(lib, dog_adopt.SIGNATURES, "sum_sq", torch.float16)
    x = torch.ones(3)
    assert _native.accepts([[x], [x]], ["param", "grad"])
    monkeypatch.setenv(_native.NATIVE_ENV_VAR, "0")
    assert _native.load() is None and not _native.accepts([[x], [x]], ["param", "grad"])
