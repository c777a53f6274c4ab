"""MMLU-style evaluation (imports transformers).

Scoring follows Hendrycks et al., "Measuring Massive Multitask Language Understanding" (ICLR 2021)
and lm-evaluation-harness's ``mmlu`` / ``mmlu_continuation`` tasks:

- :func:`score_mmlu`: k-shot log-likelihood scoring, per-subject, micro and macro accuracy.
- :func:`load_model_and_tokenizer`: a model directory, optionally with a PEFT adapter.
- :func:`load_mmlu_accuracy`: the ``evaluate`` metric module shipped in this package.
- :func:`write_lm_eval_tasks`: lm-evaluation-harness task YAMLs for local MMLU-format files.
"""

from __future__ import annotations

from hf_tuningfree.eval.lm_eval_tasks import write_lm_eval_tasks
from hf_tuningfree.eval.metric import MMLU_ACCURACY_PATH, load_mmlu_accuracy
from hf_tuningfree.eval.models import load_model_and_tokenizer
from hf_tuningfree.eval.prompts import MultipleChoicePrompt, build_prompt
from hf_tuningfree.eval.scorer import (
    MMLUResult,
    SubjectScore,
    build_prompts,
    multiple_choice_loglikelihoods,
    process_state,
    score_mmlu,
)

__all__ = [
    "MMLU_ACCURACY_PATH",
    "MMLUResult",
    "MultipleChoicePrompt",
    "SubjectScore",
    "build_prompt",
    "build_prompts",
    "load_mmlu_accuracy",
    "load_model_and_tokenizer",
    "multiple_choice_loglikelihoods",
    "process_state",
    "score_mmlu",
    "write_lm_eval_tasks",
]
