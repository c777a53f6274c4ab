"""argparse ``type=`` converters shared by the command lines (``hf-tuningfree compare``, ``toy``):
a bad value is an argparse error naming the option and what is allowed."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _bounded(convert: Callable[[str], float], low: float, strict: bool, what: str) -> Callable:
    def parse(text: str) -> Any:  # int or float, as ``convert``
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what.replace(" ", "_")  # argparse names the type in some messages
    return parse


#: An integer >= 1.
positive_int = _bounded(int, 1, False, "a positive integer")
#: An integer >= 0.
nonnegative_int = _bounded(int, 0, False, "an integer >= 0")
#: A finite number > 0 (learning rates).
positive_float = _bounded(float, 0.0, True, "a positive number")
