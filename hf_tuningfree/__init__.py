"""hf_tuningfree: tuning-free optimizers for Hugging Face training.

``hf_tuningfree.optim`` needs only torch. The Hugging Face integration is imported on first use
(``from hf_tuningfree import TuningFreeTrainer``), so ``import hf_tuningfree`` stays cheap and works
without transformers installed.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "TuningFreeTrainer": "hf_tuningfree.hf",
    "TuningFreeTrainingArguments": "hf_tuningfree.hf",
    "OptimizerFactory": "hf_tuningfree.hf",
    "install": "hf_tuningfree.hf",
    "create_optimizer": "hf_tuningfree.optim",
    "available_optimizers": "hf_tuningfree.optim",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_tuningfree' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
