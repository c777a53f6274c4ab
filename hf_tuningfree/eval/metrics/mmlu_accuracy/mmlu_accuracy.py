"""MMLU accuracy: overall (micro), per subject, and the macro average over subjects.

An ``evaluate`` metric module shipped inside ``hf_tuningfree`` so it loads offline by path::

    import evaluate
    from hf_tuningfree.eval.metric import MMLU_ACCURACY_PATH
    metric = evaluate.load(str(MMLU_ACCURACY_PATH))
    metric.compute(predictions=[0, 2], references=[0, 1], subjects=["anatomy", "virology"])

This file is copied by ``evaluate`` into its module cache and imported on its own, so it imports
only ``datasets`` and ``evaluate``.
"""

from __future__ import annotations

from collections import defaultdict

import datasets
import evaluate

_DESCRIPTION = """
Accuracy on multiple-choice questions in the format of MMLU (Hendrycks et al., "Measuring Massive
Multitask Language Understanding", ICLR 2021): the fraction of questions whose predicted option
index equals the reference index. It also reports every subject's accuracy and count, and the
macro average (the unweighted mean of the subjects' accuracies); ``accuracy`` is the micro average
over all questions, which is what lm-evaluation-harness reports for the MMLU group (weighted by
subject size).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted option index per question (0-3 for A-D).
    references (list of int): right option index per question.
    subjects (list of str): subject of each question (one shared name if there are no subjects).
Returns:
    accuracy (float): micro average, correct / count.
    correct (int), count (int).
    macro_accuracy (float): unweighted mean of the per-subject accuracies.
    per_subject (dict): subject -> {"accuracy", "correct", "count"}.
Examples:
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 2], subjects=["a", "a", "b"])
    {'accuracy': 0.666..., 'correct': 2, 'count': 3, 'macro_accuracy': 0.5, 'per_subject': {...}}
"""

_CITATION = """
@inproceedings{hendrycks2021measuring,
  title={Measuring Massive Multitask Language Understanding},
  author={Dan Hendrycks and Collin Burns and Steven Basart and Andy Zou and Mantas Mazeika and
          Dawn Song and Jacob Steinhardt},
  booktitle={International Conference on Learning Representations},
  year={2021}
}
"""


def _subject_scores(
    predictions: list[int], references: list[int], subjects: list[str]
) -> dict[str, dict]:
    correct: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    for prediction, reference, subject in zip(predictions, references, subjects, strict=True):
        count[subject] += 1
        correct[subject] += int(prediction == reference)
    return {
        subject: {
            "accuracy": correct[subject] / count[subject],
            "correct": correct[subject],
            "count": count[subject],
        }
        for subject in sorted(count)
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MMLUAccuracy(evaluate.Metric):
    """Per-subject, micro and macro accuracy for MMLU-format multiple choice."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "subjects": datasets.Value("string"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2009.03300"],
        )

    def _compute(self, predictions, references, subjects) -> dict:
        if len(predictions) == 0:
            raise ValueError("mmlu_accuracy needs at least one prediction")
        correct = sum(int(p == r) for p, r in zip(predictions, references, strict=True))
        result = {
            "accuracy": correct / len(predictions),
            "correct": correct,
            "count": len(predictions),
        }
        per_subject = _subject_scores(list(predictions), list(references), list(subjects))
        accuracies = [scores["accuracy"] for scores in per_subject.values()]
        result["macro_accuracy"] = sum(accuracies) / len(accuracies)
        result["per_subject"] = per_subject
        return result
