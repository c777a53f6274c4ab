"""The shipped ``mmlu_accuracy`` evaluate module, loaded offline by path."""

from __future__ import annotations

import evaluate
import pytest

from hf_tuningfree.eval import MMLU_ACCURACY_PATH, load_mmlu_accuracy


def test_loads_by_path_and_counts_per_subject():
    metric = evaluate.load(str(MMLU_ACCURACY_PATH))
    result = metric.compute(
        predictions=[0, 1, 2, 3, 0, 1],
        references=[0, 1, 0, 3, 1, 1],
        subjects=["a", "a", "a", "b", "b", "c"],
    )
    assert result["count"] == 6 and result["correct"] == 4
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["macro_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert result["per_subject"] == {
        "a": {"accuracy": pytest.approx(2 / 3), "correct": 2, "count": 3},
        "b": {"accuracy": 0.5, "correct": 1, "count": 2},
        "c": {"accuracy": 1.0, "correct": 1, "count": 1},
    }


def test_in_memory_loader_and_errors():
    metric = load_mmlu_accuracy()
    assert metric.compute(predictions=[2], references=[2], subjects=["x"])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="inputs are missing: \\['subjects'\\]"):
        metric.compute(predictions=[1], references=[1])
    with pytest.raises(ValueError, match="needs at least one prediction"):
        metric.compute(predictions=[], references=[], subjects=[])
