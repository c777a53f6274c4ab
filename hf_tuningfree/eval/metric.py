"""The ``mmlu_accuracy`` metric module shipped in this package, loaded offline by path."""

from __future__ import annotations

from pathlib import Path

import evaluate

MMLU_ACCURACY_PATH: Path = Path(__file__).parent / "metrics" / "mmlu_accuracy"


def load_mmlu_accuracy() -> evaluate.EvaluationModule:
    """``evaluate.load`` of the shipped ``mmlu_accuracy`` module (no hub access).

    The metric keeps its inputs in memory, so several processes (``accelerate launch``) can each
    compute it without sharing cache files. See the module for the returned fields (micro accuracy,
    macro accuracy over subjects, per-subject accuracy and counts).
    """
    return evaluate.load(str(MMLU_ACCURACY_PATH), keep_in_memory=True)
