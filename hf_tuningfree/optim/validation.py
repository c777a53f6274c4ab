"""Hyperparameter checks shared by every optimizer in this package.

Each check raises ``ValueError`` naming the hyperparameter, the value it got and the allowed range,
so that a typo in a config file points at the key to fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _as_float(name: str, value: object) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Invalid {name}: a tensor of shape {list(value.shape)}; allowed: a number or a "
                "one-element tensor"
            )
        # Constructor-time only: never called inside step().
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def scalar_value(name: str, value: object) -> object:
    """A one-element tensor (shape ``[]``, ``[1]``, ``[1, 1]``, ...) as the Python number it
    holds; anything else unchanged (the caller validates it). Used for a param group's ``lr``
    when the group is set up (construction, ``add_param_group``, ``load_state_dict``), as
    torch.optim accepts a tensor ``lr``: reading it there keeps ``step()`` free of host reads
    and makes every shape behave like the number."""
    if isinstance(value, torch.Tensor):
        return _as_float(name, value)
    return value


def check_nonnegative(name: str, value: object) -> float:
    """``value`` must be a finite number >= 0."""
    v = _as_float(name, value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {name}: {value!r}; allowed: a finite number >= 0")
    return v


def check_positive(name: str, value: object, *, allow_inf: bool = False) -> float:
    """``value`` must be > 0 (and finite unless ``allow_inf``)."""
    v = _as_float(name, value)
    if math.isnan(v) or v <= 0.0 or (math.isinf(v) and not allow_inf):
        allowed = "a number > 0 (inf allowed)" if allow_inf else "a finite number > 0"
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {allowed}")
    return v


def check_in_range(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
) -> float:
    """``value`` must lie in the interval between ``low`` and ``high``."""
    v = _as_float(name, value)
    ok_low = v >= low if low_inclusive else v > low
    ok_high = v <= high if high_inclusive else v < high
    if math.isnan(v) or not (ok_low and ok_high):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"Invalid {name}: {value!r}; allowed: a number in {interval}")
    return v


def check_betas(
    name: str, betas: object, length: int = 2, *, low_inclusive: bool = True
) -> tuple[float, ...]:
    """A tuple of ``length`` momentum coefficients, each in [0, 1) (or (0, 1))."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != length:
        raise ValueError(f"Invalid {name}: {betas!r}; allowed: a sequence of {length} numbers")
    return tuple(
        check_in_range(f"{name}[{i}]", b, 0.0, 1.0, low_inclusive=low_inclusive)
        for i, b in enumerate(betas)
    )


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: one of {list(choices)}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` must be a real bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_nonnegative_int(name: str, value: object) -> int:
    """``value`` must be an integer >= 0 (not a bool, not a float such as 100.0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: an integer >= 0")
    return value
