"""Tuning-free optimizers in pure PyTorch (importable with only torch installed).

- :class:`ADOPT` (Taniguchi et al., NeurIPS 2024)
- :class:`HyperSGD`, :class:`HyperAdam`, :class:`HyperAdaGrad`, :class:`HyperRMSProp`:
  hypergradient descent with hyperoptimizer towers (Chandra et al., NeurIPS 2022)

Every optimizer is registered in :mod:`hf_tuningfree.optim.registry`;
``create_optimizer(name, params, **overrides)`` builds one by name.
"""

from .adopt import ADOPT
from .base import TuningFreeOptimizer
from .hypergradient import HyperAdaGrad, HyperAdam, HypergradientOptimizer, HyperRMSProp, HyperSGD
from .registry import (
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_optimizer_spec,
    parse_hyperparameter,
    register_optimizer,
    registry_table,
)

__all__ = [
    "ADOPT",
    "HyperAdaGrad",
    "HyperAdam",
    "HyperRMSProp",
    "HyperSGD",
    "HypergradientOptimizer",
    "OptimizerSpec",
    "TuningFreeOptimizer",
    "available_optimizers",
    "create_optimizer",
    "get_optimizer_spec",
    "parse_hyperparameter",
    "register_optimizer",
    "registry_table",
]
