"""Tuning-free optimizers in pure PyTorch (importable with only torch installed).

- :class:`ADOPT` (Taniguchi et al., NeurIPS 2024)
- :class:`DoG`, :class:`LDoG`, :class:`TDoG` (Ivgi, Hinder & Carmon, ICML 2023) and
  :class:`PolynomialDecayAverager`, the iterate averaging they are used with
- :class:`HyperSGD`, :class:`HyperAdam`, :class:`HyperAdaGrad`, :class:`HyperRMSProp`:
  hypergradient descent with hyperoptimizer towers (Chandra et al., NeurIPS 2022)
- :class:`DAdaptSGD`, :class:`DAdaptAdam`, :class:`DAdaptAdaGrad` (Defazio & Mishchenko, ICML 2023)
- :class:`Prodigy` (Mishchenko & Defazio, ICML 2024) and :class:`ProdigyScheduleFree`, its
  schedule-free form (Defazio et al., NeurIPS 2024)

Every optimizer is registered in :mod:`hf_tuningfree.optim.registry`;
``create_optimizer(name, params, **overrides)`` builds one by name.
"""

from .adopt import ADOPT
from .averaging import PolynomialDecayAverager
from .base import TuningFreeOptimizer
from .dadapt import DAdaptAdaGrad, DAdaptAdam, DAdaptSGD
from .dog import DoG, LDoG, TDoG
from .hypergradient import HyperAdaGrad, HyperAdam, HypergradientOptimizer, HyperRMSProp, HyperSGD
from .memory import StateBytes, state_bytes
from .prodigy import Prodigy
from .registry import (
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_optimizer_spec,
    parse_hyperparameter,
    register_optimizer,
    registry_table,
)
from .schedule_free import ProdigyScheduleFree

__all__ = [
    "ADOPT",
    "DAdaptAdaGrad",
    "DAdaptAdam",
    "DAdaptSGD",
    "DoG",
    "HyperAdaGrad",
    "HyperAdam",
    "HyperRMSProp",
    "HyperSGD",
    "HypergradientOptimizer",
    "LDoG",
    "OptimizerSpec",
    "PolynomialDecayAverager",
    "Prodigy",
    "ProdigyScheduleFree",
    "StateBytes",
    "TDoG",
    "TuningFreeOptimizer",
    "available_optimizers",
    "create_optimizer",
    "get_optimizer_spec",
    "parse_hyperparameter",
    "register_optimizer",
    "registry_table",
    "state_bytes",
]
