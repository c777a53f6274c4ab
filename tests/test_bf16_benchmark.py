"""benchmarks/bf16_training.py end to end on a few steps: one row per optimizer with the fp32,
stochastically rounded and round-to-nearest bf16 runs, a bad name refused before any training."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location(
        "bf16_training", ROOT / "benchmarks" / "bf16_training.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bf16_training"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_three_ways_of_one_optimizer(capsys):
    rows = bench.main(["--optimizers", "adopt", "--steps", "3"])
    assert [r["optimizer"] for r in rows] == ["adopt"]
    losses = {way: rows[0][way]["eval_loss"] for way in bench.WAYS}
    assert all(math.isfinite(v) and 7.0 < v < 9.0 for v in losses.values())  # ~log(4096) = 8.3
    # three steps from the same start: every way within 1% of fp32, and not all identical
    assert all(abs(v / losses["fp32"] - 1) < 0.01 for v in losses.values())
    assert len(set(losses.values())) == 3
    table = capsys.readouterr().out
    assert "| adopt |" in table and "bf16-sr / fp32" in table


def test_a_bad_name_fails_first():
    with pytest.raises(ValueError, match="Unknown optimizer 'nope'"):
        bench.main(["--optimizers", "nope"])
