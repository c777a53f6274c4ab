"""Score a causal LM on MMLU-format multiple choice, as the MMLU paper and lm-evaluation-harness do.

Protocol (Hendrycks et al., "Measuring Massive Multitask Language Understanding", ICLR 2021, and
lm-evaluation-harness's ``mmlu`` task): a k-shot prompt from the first k ``dev`` questions of the
same subject (see :mod:`hf_tuningfree.eval.prompts`), the log-likelihood of each candidate
continuation, and ``acc`` = share of questions whose highest-scoring candidate is the right one.
The ``continuation`` variant (lm-eval's ``mmlu_continuation``) scores the answer texts and also
reports ``acc_norm``, the argmax of log-likelihood divided by the answer's length in characters.

Under ``accelerate launch`` the questions are split across processes
(``PartialState.split_between_processes``) and the scores gathered (``gather_object``), so every
process returns the same result as one process would.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from transformers import PreTrainedTokenizerBase

from hf_tuningfree.data.mmlu_format import validate_row
from hf_tuningfree.eval.loglikelihood import (
    LoglikelihoodScorer,
    encode_question,
    model_max_length,
    score_encoded,
)
from hf_tuningfree.eval.metric import load_mmlu_accuracy
from hf_tuningfree.eval.models import attach_adapter, load_model_and_tokenizer
from hf_tuningfree.eval.prompts import (
    MultipleChoicePrompt,
    build_prompt,
    first_shots,
    get_format,
)

logger = logging.getLogger(__name__)

Rows = datasets.Dataset | Sequence[Mapping[str, Any]]


@dataclass
class SubjectScore:
    """One subject's accuracy, number right and number of questions (and ``acc_norm``)."""

    accuracy: float
    correct: int
    count: int
    acc_norm: float | None = None


@dataclass
class MMLUResult:
    """One run's scores: micro/macro accuracy, per subject, every question's log-likelihoods."""

    variant: str
    shots: int
    accuracy: float
    macro_accuracy: float
    correct: int
    count: int
    per_subject: dict[str, SubjectScore]
    acc_norm: float | None = None
    macro_acc_norm: float | None = None
    truncated_questions: int = 0
    processes: int = 1
    predictions: list[int] = field(default_factory=list)
    references: list[int] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    loglikelihoods: list[list[float]] = field(default_factory=list)

    def to_dict(self, include_questions: bool = False) -> dict[str, Any]:
        """JSON-ready summary; per-question predictions and log-likelihoods on request."""
        data = asdict(self)
        if not include_questions:
            for key in ("predictions", "references", "subjects", "loglikelihoods"):
                data.pop(key)
        return data

    def format_table(self) -> str:
        """A plain-text table: one line per subject, then the micro and macro averages."""
        norm = self.acc_norm is not None
        width = max([len(s) for s in self.per_subject] + [len("micro average")])
        head = f"{'subject':<{width}}  {'n':>6}  {'acc':>6}" + (
            f"  {'acc_norm':>8}" if norm else ""
        )
        lines = [head, "-" * len(head)]
        for subject, score in self.per_subject.items():
            line = f"{subject:<{width}}  {score.count:>6}  {score.accuracy:>6.3f}"
            lines.append(line + (f"  {score.acc_norm:>8.3f}" if norm else ""))
        lines.append("-" * len(head))
        micro = f"{'micro average':<{width}}  {self.count:>6}  {self.accuracy:>6.3f}"
        macro = (
            f"{'macro average':<{width}}  {len(self.per_subject):>6}  {self.macro_accuracy:>6.3f}"
        )
        lines.append(micro + (f"  {self.acc_norm:>8.3f}" if norm else ""))
        lines.append(macro + (f"  {self.macro_acc_norm:>8.3f}" if norm else ""))
        return "\n".join(lines)


def as_rows(data: Rows, source: str) -> list[dict[str, Any]]:
    """Rows of a ``datasets.Dataset`` or of a list of mappings, checked against cais/mmlu."""
    return [validate_row(row, source, i) for i, row in enumerate(data)]


def _fewshot_pools(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    pools: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        pools[row["subject"]].append(row)
    return pools


def build_prompts(
    rows: Sequence[Mapping[str, Any]],
    fewshot_rows: Sequence[Mapping[str, Any]],
    shots: int,
    variant: str = "letters",
) -> list[MultipleChoicePrompt]:
    """k-shot prompts for every row; the shots are the first ``shots`` fewshot rows of its subject.

    Raises:
        ValueError: ``shots`` is negative, or positive with no few-shot rows at all.
    """
    if not isinstance(shots, int) or shots < 0:
        raise ValueError(f"shots must be an int >= 0, got {shots!r}")
    if shots > 0 and not fewshot_rows:
        raise ValueError(
            f"shots={shots} needs few-shot rows (the 'dev' split in the cais/mmlu layout); "
            "pass fewshot=... or shots=0"
        )
    fmt = get_format(variant)
    pools = _fewshot_pools(fewshot_rows)
    short = sorted({r["subject"] for r in rows if len(pools.get(r["subject"], [])) < shots})
    if short:
        logger.warning(
            "fewer than %d few-shot examples for subjects %s; using those there are", shots, short
        )
    return [build_prompt(r, first_shots(pools.get(r["subject"], []), r, shots), fmt) for r in rows]


def process_state() -> PartialState:
    """Accelerate's per-process state, as ``Accelerator`` would build it.

    ``PartialState()`` alone treats a CPU-only multi-process launch as one process; ``Accelerator``
    passes ``cpu=True`` when ``ACCELERATE_USE_CPU`` is set. We do the same, and also when several
    processes were launched (``WORLD_SIZE > 1``, e.g. by torchrun) on a machine without CUDA.
    """
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (several and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any id will do (padded positions are masked and never scored): pad, else EOS, else 0."""
    candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    return next((int(c) for c in candidates if c is not None), 0)


def multiple_choice_loglikelihoods(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[MultipleChoicePrompt],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    padding_side: str = "right",
    progress: bool = True,
) -> tuple[list[list[float]], int]:
    """Every candidate's summed log-likelihood, for all prompts, data-parallel across processes.

    Returns:
        ``(loglikelihoods, truncated)``: ``loglikelihoods[i][c]`` for prompt ``i``, candidate ``c``,
        identical on every process; ``truncated`` is how many prompts lost few-shot tokens.
    """
    state = process_state()
    length = max_length or model_max_length(model, tokenizer)
    scorer = LoglikelihoodScorer(model, _pad_token_id(tokenizer), padding_side)
    with state.split_between_processes(list(range(len(prompts)))) as mine:
        encoded = [encode_question(tokenizer, prompts[i], i, length) for i in mine]
        show = progress and state.is_local_main_process
        scores = score_encoded(scorer, encoded, batch_size, progress=show)
        local = [(q.index, scores[q.index], q.truncated_tokens > 0) for q in encoded]
    gathered = sorted(gather_object(local), key=lambda item: item[0])
    return [s for _, s, _ in gathered], sum(int(t) for _, _, t in gathered)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as ``numpy.argmax``)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def normalised_predictions(
    loglikelihoods: Sequence[Sequence[float]], prompts: Sequence[MultipleChoicePrompt]
) -> list[int]:
    """``acc_norm`` predictions: argmax of log-likelihood per character of the answer text."""
    return [
        argmax([ll / max(n, 1) for ll, n in zip(lls, p.choice_lengths, strict=True)])
        for lls, p in zip(loglikelihoods, prompts, strict=True)
    ]


def summarise(
    prompts: Sequence[MultipleChoicePrompt],
    loglikelihoods: Sequence[Sequence[float]],
    variant: str,
    shots: int,
    truncated: int = 0,
) -> MMLUResult:
    """Accuracy per subject, micro and macro averages, computed by the ``mmlu_accuracy`` metric."""
    metric = load_mmlu_accuracy()
    predictions = [argmax(lls) for lls in loglikelihoods]
    references = [p.answer for p in prompts]
    subjects = [p.subject for p in prompts]
    acc = metric.compute(predictions=predictions, references=references, subjects=subjects)
    per_subject = {s: SubjectScore(**v) for s, v in acc["per_subject"].items()}
    result = MMLUResult(
        processes=process_state().num_processes,
        variant=variant,
        shots=shots,
        accuracy=acc["accuracy"],
        macro_accuracy=acc["macro_accuracy"],
        correct=acc["correct"],
        count=acc["count"],
        per_subject=per_subject,
        truncated_questions=truncated,
        predictions=predictions,
        references=references,
        subjects=subjects,
        loglikelihoods=[list(lls) for lls in loglikelihoods],
    )
    if variant == "continuation":
        norm_predictions = normalised_predictions(loglikelihoods, prompts)
        norm = metric.compute(
            predictions=norm_predictions, references=references, subjects=subjects
        )
        result.acc_norm, result.macro_acc_norm = norm["accuracy"], norm["macro_accuracy"]
        for subject, scores in norm["per_subject"].items():
            per_subject[subject].acc_norm = scores["accuracy"]
    return result


def _resolve_model(
    model: torch.nn.Module | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None,
    adapter: str | os.PathLike | None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    if isinstance(model, (str, os.PathLike)):
        loaded, loaded_tokenizer = load_model_and_tokenizer(
            model, adapter, device=process_state().device
        )
        return loaded, tokenizer or loaded_tokenizer
    if adapter is not None:
        model = attach_adapter(model, adapter)
    if tokenizer is None:
        raise ValueError("a model object needs tokenizer=...; only a model path brings its own")
    return model, tokenizer


def _split_dataset_dict(data: Any, fewshot: Rows | None) -> tuple[Rows, Rows | None]:
    if not isinstance(data, datasets.DatasetDict):
        return data, fewshot
    if "test" not in data:
        raise ValueError(f"a DatasetDict needs a 'test' split to score; it has {sorted(data)}")
    return data["test"], fewshot if fewshot is not None else data.get("dev")


def score_mmlu(
    model: torch.nn.Module | str | os.PathLike,
    data: Rows | datasets.DatasetDict,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    fewshot: Rows | None = None,
    shots: int = 5,
    variant: str = "letters",
    adapter: str | os.PathLike | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    padding_side: str = "right",
    progress: bool = True,
) -> MMLUResult:
    """Score ``model`` on MMLU-format questions (the protocol of the MMLU paper / lm-eval).

    Args:
        model: a causal LM object, a model directory, or a base model directory with ``adapter``.
        data: the questions (``cais/mmlu`` schema), e.g. ``dataset["test"]``; a whole
            ``DatasetDict`` means its ``test`` split, with ``dev`` as the default ``fewshot``.
        tokenizer: required with a model object; a model directory brings its own.
        fewshot: the pool of solved examples, e.g. ``dataset["dev"]`` (first ``shots`` per subject).
        shots: k of the k-shot prompt (5 in the MMLU paper; 0 allowed).
        variant: ``"letters"`` (score `` A``..`` D``) or ``"continuation"`` (score answer texts,
            adds ``acc_norm``).
        adapter: a PEFT adapter directory to put on top of ``model``.
        batch_size: rows per forward pass; results do not depend on it.
        max_length: context size (default: read from the model config); longer prompts lose few-shot
            tokens from the left, never question tokens.
        padding_side: ``"right"`` or ``"left"``; results do not depend on it.
        progress: show a progress bar on the main process.
    """
    get_format(variant)
    data, fewshot = _split_dataset_dict(data, fewshot)
    model, tokenizer = _resolve_model(model, tokenizer, adapter)
    prompts = build_prompts(
        as_rows(data, "data"),
        as_rows(fewshot, "fewshot") if fewshot is not None else [],
        shots,
        variant,
    )
    if not prompts:
        raise ValueError("data has no questions")
    was_training = model.training
    model.eval()
    try:
        lls, truncated = multiple_choice_loglikelihoods(
            model,
            tokenizer,
            prompts,
            batch_size=batch_size,
            max_length=max_length,
            padding_side=padding_side,
            progress=progress,
        )
    finally:
        model.train(was_training)
    return summarise(prompts, lls, variant, shots, truncated)
