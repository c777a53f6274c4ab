"""One entry point for the multiple-choice data a script names: the synthetic benchmark or files."""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets

from hf_tuningfree.data.mmlu_format import load_mmlu_format
from hf_tuningfree.data.synthetic_mc import SYNTHETIC_BENCHMARK_NAME, make_synthetic_mc

SYNTHETIC = "synthetic"


def describe_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """A human-readable name for reports: never calls the synthetic benchmark MMLU."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if [str(i) for i in items] == [SYNTHETIC]:
        return SYNTHETIC_BENCHMARK_NAME
    return ", ".join(str(i) for i in items)


def load_multiple_choice(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    seed: int = 0,
    n_test: int = 50,
    n_validation: int = 10,
) -> datasets.DatasetDict:
    """``"synthetic"`` -> the project's synthetic benchmark (``seed``, ``n_test`` and
    ``n_validation`` per subject; ``auxiliary_train`` left empty); anything else ->
    :func:`~hf_tuningfree.data.mmlu_format.load_mmlu_format` (local files or a hub name)."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if [str(i) for i in items] == [SYNTHETIC]:
        return make_synthetic_mc(seed, n_test=n_test, n_validation=n_validation, n_train=0)
    return load_mmlu_format(items[0] if len(items) == 1 else items)
