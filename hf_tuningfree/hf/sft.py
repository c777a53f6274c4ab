"""Supervised fine-tuning data: (prompt, completion) pairs, tokenised one per row, padded per batch.

Three row layouts are recognised by their columns (:func:`detect_format`):

- ``"mmlu"``: multiple-choice questions in the ``cais/mmlu`` schema (``question``, ``subject``,
  ``choices``, ``answer``), e.g. the ``auxiliary_train`` split. The prompt is exactly the zero-shot
  prompt the MMLU-style scorer builds (:func:`hf_tuningfree.eval.prompts.build_prompt`: the
  subject header, the question, ``A. ..`` to ``D. ..``, ``Answer:``) and the completion the
  scored continuation (`` B``); prompt and completion are split into tokens the way the scorer
  splits them (:func:`hf_tuningfree.eval.loglikelihood.split_continuation`), so training sees the
  same token ids that scoring reads.
- ``"prompt_completion"``: ``prompt`` and ``completion`` columns (TRL's layout).
- ``"instruction"``: ``instruction``, optional ``input``, and ``output`` (Stanford Alpaca's layout),
  rendered with Alpaca's section headers (:data:`INSTRUCTION_TEMPLATE`).

Anything else is ``"text"``: plain text for :func:`hf_tuningfree.hf.clm.tokenize_and_group`.

Labels: the completion's tokens (and, unless ``completion_only_loss``, the prompt's), then the EOS
token. Padding is added per batch by :class:`PaddingCollator`, which builds the label mask from the
attention mask: with ``pad_token == eos_token`` (GPT-2, SmolLM2) a padded position and a real end
token have the same id, and only the mask tells them apart. (``DataCollatorForLanguageModeling``
sets every ``pad_token_id`` label to -100, which would also drop the real EOS from the loss.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import torch

from hf_tuningfree.data.mmlu_format import validate_row
from hf_tuningfree.eval.loglikelihood import split_continuation
from hf_tuningfree.eval.prompts import build_prompt, get_format
from hf_tuningfree.hf.clm import map_fingerprint, tokenizer_fingerprint
from hf_tuningfree.hf.errors import UserInputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATA_FORMATS = ("mmlu", "prompt_completion", "instruction", "text")

#: Stanford Alpaca's prompt (without its one-line preamble); ``input`` section only when non-empty.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_MMLU_COLUMNS = {"question", "choices", "answer"}
_FORMAT_VERSION = 1  # part of the cache fingerprint: bump when the rendering/tokenising changes
_MMLU_HEADER_WITHOUT_SUBJECT = "The following are multiple choice questions (with answers).\n\n"


def detect_format(columns: Sequence[str]) -> str:
    """``"mmlu"``, ``"prompt_completion"``, ``"instruction"`` or ``"text"`` from column names."""
    names = set(columns)
    if names >= _MMLU_COLUMNS:
        return "mmlu"
    if {"prompt", "completion"} <= names:
        return "prompt_completion"
    if {"instruction", "output"} <= names:
        return "instruction"
    return "text"


def mmlu_prompt_completion(
    row: Mapping[str, Any], variant: str = "letters", *, source: str = "data", index: int = 0
) -> tuple[str, str]:
    """The scorer's zero-shot prompt for an MMLU-format row and the right continuation.

    ``variant="letters"`` gives ``(header + "Q\\nA. ..\\nD. ..\\nAnswer:", " C")``;
    ``"continuation"`` gives lm-eval's ``mmlu_continuation`` prompt and the answer text. Rows
    without a subject (the hub's ``auxiliary_train`` has an empty one) get the header without
    "about ...". A malformed row raises :class:`~hf_tuningfree.data.mmlu_format.MMLUFormatError`
    naming ``source`` (the file or dataset), ``index`` (its 0-based row) and the field.
    """
    clean = validate_row(row, source, index)
    prompt = build_prompt(clean, [], get_format(variant))
    fewshot = prompt.fewshot
    if not clean["subject"].strip() and variant == "letters":
        fewshot = _MMLU_HEADER_WITHOUT_SUBJECT
    return fewshot + prompt.question, prompt.continuations[prompt.answer]


def instruction_prompt_completion(row: Mapping[str, Any]) -> tuple[str, str]:
    """Alpaca layout: ``### Instruction:`` (``### Input:``) ``### Response:`` and the output."""
    extra = row.get("input") or ""
    template = INSTRUCTION_WITH_INPUT_TEMPLATE if str(extra).strip() else INSTRUCTION_TEMPLATE
    return template.format(instruction=row["instruction"], input=extra), str(row["output"])


def render_prompt_completion(
    row: Mapping[str, Any],
    data_format: str,
    variant: str = "letters",
    *,
    source: str = "data",
    index: int = 0,
) -> tuple[str, str]:
    """``(prompt, completion)`` for one row of ``data_format`` (not ``"text"``); ``source`` and
    ``index`` name the row in errors."""
    if data_format == "mmlu":
        return mmlu_prompt_completion(row, variant, source=source, index=index)
    if data_format == "prompt_completion":
        return str(row["prompt"]), str(row["completion"])
    if data_format == "instruction":
        return instruction_prompt_completion(row)
    raise ValueError(
        f"data_format={data_format!r} has no prompt/completion; use one of "
        f"{DATA_FORMATS[:-1]} (plain text goes through clm.tokenize_and_group)"
    )


def tokenize_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completion: str,
    *,
    max_length: int,
    completion_only_loss: bool = True,
    add_eos: bool = True,
) -> dict[str, list[int]] | None:
    """One training example: ``input_ids``, ``attention_mask`` and ``labels``.

    Prompt and completion are split into tokens as the MMLU-style scorer and lm-evaluation-harness
    split a context and its continuation. The EOS token follows the completion (``add_eos``) and is
    a label. Prompt labels are ``-100`` when ``completion_only_loss``. Examples longer than
    ``max_length`` are cut from the right; ``None`` when nothing is left to learn from.
    """
    prompt_ids, completion_ids = split_continuation(tokenizer, prompt, completion)
    if add_eos and tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    prompt_label = IGNORE_INDEX if completion_only_loss else None
    labels = [
        (token if prompt_label is None or i >= len(prompt_ids) else prompt_label)
        for i, token in enumerate(input_ids)
    ]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never predicted
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _tokenize_rows(
    tokenizer: PreTrainedTokenizerBase,
    data_format: str,
    variant: str,
    max_length: int,
    completion_only_loss: bool,
    add_eos: bool,
    source: str,
    first_row: int,
) -> Callable[[Mapping[str, list[Any]], list[int]], dict[str, list[list[int]]]]:
    def tokenize(batch: Mapping[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for i, index in enumerate(indices):
            row = {key: values[i] for key, values in batch.items()}
            prompt, completion = render_prompt_completion(
                row, data_format, variant, source=source, index=first_row + index
            )
            example = tokenize_prompt_completion(
                tokenizer,
                prompt,
                completion,
                max_length=max_length,
                completion_only_loss=completion_only_loss,
                add_eos=add_eos,
            )
            if example is not None:
                for key, value in example.items():
                    out[key].append(value)
        return out

    return tokenize


def tokenize_supervised(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    data_format: str | None = None,
    variant: str = "letters",
    completion_only_loss: bool = True,
    add_eos: bool = True,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
    main_process_first: Callable[..., contextlib.AbstractContextManager[Any]] | None = None,
    desc: str = "Tokenising",
    source: str | None = None,
    first_row: int = 0,
) -> datasets.Dataset:
    """Tokenise every row of a prompt/completion dataset (see the module doc for the layouts).

    Args:
        dataset: one split.
        tokenizer: the model's tokenizer.
        max_length: longest example in tokens; longer ones are cut from the right, and dropped
            when no label is left (a warning says how many).
        data_format: one of :data:`DATA_FORMATS` except ``"text"``; default: detected.
        variant: MMLU prompt variant, ``"letters"`` (MMLU) or ``"continuation"``.
        completion_only_loss: labels only on the completion (and EOS).
        add_eos: end each example with the EOS token.
        source: what errors call the data (a file name; default ``"data"``); a malformed
            MMLU-format row is named by ``source`` and its 0-based row there: ``first_row`` plus
            its position in ``dataset`` (``first_row``: where ``dataset`` starts in ``source``,
            e.g. after the rows carved off into a validation split).

    Returns:
        A dataset with ``input_ids``, ``attention_mask``, ``labels`` of varying lengths, for
        :class:`PaddingCollator`.

    Raises:
        ValueError: the layout is plain text, or no example is left.
        MMLUFormatError: a malformed MMLU-format row (names ``source``, the row and the field).
    """
    data_format = data_format or detect_format(dataset.column_names)
    if data_format not in DATA_FORMATS[:-1]:
        raise UserInputError(
            f"columns {dataset.column_names} are not a prompt/completion layout (MMLU-format "
            "question/subject/choices/answer, prompt/completion, or instruction/input/output)"
        )
    guard = main_process_first or (lambda **_: contextlib.nullcontext())
    with guard(desc=desc):
        tokenized = dataset.map(
            _tokenize_rows(
                tokenizer,
                data_format,
                variant,
                max_length,
                completion_only_loss,
                add_eos,
                source or "data",
                first_row,
            ),
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            num_proc=num_proc,
            load_from_cache_file=load_from_cache_file,
            desc=desc,
            new_fingerprint=map_fingerprint(
                dataset,
                "supervised",
                _FORMAT_VERSION,
                tokenizer_fingerprint(tokenizer),
                data_format,
                variant,
                max_length,
                completion_only_loss,
                add_eos,
            ),
        )
    dropped = len(dataset) - len(tokenized)
    if dropped:
        logger.warning(
            "%s: %d of %d examples had no completion token within max_length=%d and were dropped",
            desc,
            dropped,
            len(dataset),
            max_length,
        )
    if len(tokenized) == 0:
        raise UserInputError(f"{desc}: no example left; raise block_size above {max_length}")
    return tokenized


@dataclass
class PaddingCollator:
    """Pads ``input_ids`` / ``attention_mask`` / ``labels`` on the right to the batch's longest row.

    Labels are the example's ``labels`` (or its ``input_ids`` when it has none) wherever the
    attention mask is 1, and ``-100`` on padding: the mask, not the token id, says what is padding,
    so a real EOS equal to the pad token keeps its label.

    Args:
        pad_token_id: the id written into padded positions (never attended to nor learned).
        pad_to_multiple_of: round the padded length up (8 or 64 help GPU kernels).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(features), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for i, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            n = len(ids)
            mask = torch.as_tensor(feature.get("attention_mask", [1] * n), dtype=torch.long)
            targets = torch.as_tensor(feature.get("labels", ids), dtype=torch.long)
            input_ids[i, :n] = ids
            attention_mask[i, :n] = mask
            labels[i, :n] = torch.where(mask == 1, targets, torch.full_like(targets, IGNORE_INDEX))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
