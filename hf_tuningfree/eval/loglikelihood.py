"""Log-likelihoods of continuations given a context, batched so that padding cannot change a score.

The quantity is the one lm-evaluation-harness's ``loglikelihood`` request computes (Gao et al.,
"The Language Model Evaluation Harness", 2023): ``sum_j log p(cont_j | context, cont_<j)``.

Tokenisation follows lm-evaluation-harness's ``_encode_pair``: the context is encoded on its own and
``context + continuation`` as a whole; the continuation's tokens are those of the whole after the
context's tokens. Where a tokenizer merges characters across the boundary (the whole does not start
with the context's tokens), the split of the whole would put context characters into the scored
part (or leave it empty); there we keep the context's own tokens and append the continuation's own
tokens, so every candidate is scored conditioned on the same context tokens.

When every continuation of a question is one token the question costs one forward pass: the
candidates are read from the next-token distribution at the context's last position. Otherwise each
candidate gets its own row, ``context + continuation[:-1]``.

Padding: rows are padded right (default) or left with an attention mask and position ids counted
from each row's first real token, so a row's logits do not depend on what else is in the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hf_tuningfree.eval.prompts import MultipleChoicePrompt

PADDING_SIDES = ("right", "left")
_DEFAULT_MAX_LENGTH = 2048
_HUGE_TOKENIZER_LENGTH = 1_000_000


class PromptTooLongError(ValueError):
    """A question (without any few-shot examples) does not fit into the model's context."""


@dataclass
class EncodedQuestion:
    """Token ids of one question's context and of each candidate continuation."""

    index: int
    context: list[int]
    continuations: list[list[int]]
    truncated_tokens: int = 0


@dataclass
class Row:
    """One sequence fed to the model and the (position, token) pairs to score in it.

    ``targets`` holds, per scored candidate, ``(choice_index, [(position, token_id), ...])``.
    """

    question: int
    input_ids: list[int]
    targets: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)


def _encode(tokenizer, text: str, **kwargs) -> list[int]:
    return list(tokenizer(text, **kwargs)["input_ids"])


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, as lm-evaluation-harness splits them (see module doc).

    Trailing whitespace of the context is moved to the continuation first, as lm-eval does.
    """
    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped) :] + continuation
        context = stripped
    context_ids = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids) :]
    own = _encode(tokenizer, continuation, add_special_tokens=False)
    if not own:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return context_ids, own


def _leading_special_count(tokenizer, context: str) -> int:
    mask = tokenizer(context, return_special_tokens_mask=True)["special_tokens_mask"]
    count = 0
    while count < len(mask) and mask[count] == 1:
        count += 1
    return count


def droppable_fewshot_tokens(tokenizer, prompt: MultipleChoicePrompt) -> tuple[int, int]:
    """``(start, count)``: the context tokens that lie wholly inside the few-shot part.

    ``start`` skips leading special tokens (BOS). Uses character offsets when the tokenizer is a
    fast one; otherwise a conservative count from encoding the few-shot part alone.
    """
    start = _leading_special_count(tokenizer, prompt.context)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(prompt.context, return_offsets_mapping=True)["offset_mapping"]
        limit = len(prompt.fewshot)
        count = sum(1 for s, e in offsets[start:] if e <= limit and e > s)
        return start, count
    alone = _encode(tokenizer, prompt.fewshot, add_special_tokens=False)
    return start, max(len(alone) - 1, 0)


def encode_question(
    tokenizer, prompt: MultipleChoicePrompt, index: int, max_length: int
) -> EncodedQuestion:
    """Tokenise one prompt and cut the few-shot part from the left until it fits ``max_length``.

    Raises:
        PromptTooLongError: the question and its longest candidate do not fit even with no shots.
    """
    pairs = [split_continuation(tokenizer, prompt.context, c) for c in prompt.continuations]
    context = pairs[0][0]
    continuations = [cont for _, cont in pairs]
    needed = len(context) + max(len(c) for c in continuations) - 1
    excess = needed - max_length
    if excess <= 0:
        return EncodedQuestion(index, context, continuations)
    start, droppable = droppable_fewshot_tokens(tokenizer, prompt)
    if excess > droppable:
        raise PromptTooLongError(
            f"question {index} ({prompt.subject}) needs {needed - droppable} tokens without any "
            f"few-shot text, more than max_length={max_length}; questions are never truncated"
        )
    return EncodedQuestion(
        index, context[:start] + context[start + excess :], continuations, excess
    )


def question_rows(encoded: EncodedQuestion) -> list[Row]:
    """One row if every continuation is a single token, else one row per candidate."""
    last = len(encoded.context) - 1
    if all(len(c) == 1 for c in encoded.continuations):
        targets = [(i, [(last, c[0])]) for i, c in enumerate(encoded.continuations)]
        return [Row(encoded.index, list(encoded.context), targets)]
    rows = []
    for i, cont in enumerate(encoded.continuations):
        positions = [(last + j, token) for j, token in enumerate(cont)]
        rows.append(Row(encoded.index, encoded.context + cont[:-1], [(i, positions)]))
    return rows


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


@dataclass
class PaddedBatch:
    """Tensors for one batch and where each row's tokens start."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: list[int]


def pad_rows(rows: Sequence[Row], pad_id: int, padding_side: str) -> PaddedBatch:
    """Pad ``rows`` to one length; position ids count from each row's first real token."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for i, row in enumerate(rows):
        offset = width - len(row.input_ids) if padding_side == "left" else 0
        input_ids[i, offset : offset + len(row.input_ids)] = torch.tensor(row.input_ids)
        attention_mask[i, offset : offset + len(row.input_ids)] = 1
        offsets.append(offset)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(input_ids, attention_mask, position_ids, offsets)


def _scored_positions(rows: Sequence[Row], offsets: Sequence[int]) -> list[int]:
    wanted = {
        offset + position
        for row, offset in zip(rows, offsets, strict=True)
        for _, pairs in row.targets
        for position, _ in pairs
    }
    return sorted(wanted)


class LoglikelihoodScorer:
    """Scores :class:`Row` batches with a causal LM (a ``transformers`` or PEFT model).

    Args:
        model: a causal LM returning ``.logits``; it is put in eval mode by the caller.
        pad_token_id: any id; padded positions are masked and never scored.
        padding_side: ``"right"`` or ``"left"``.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side={padding_side!r}; allowed are 'right' and 'left'")
        self.model = model
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        parameters = _forward_parameters(model)
        self.keeps_logits = "logits_to_keep" in parameters
        self.takes_positions = "position_ids" in parameters
        if padding_side == "left" and not self.takes_positions:
            raise ValueError("left padding needs a model whose forward takes position_ids")

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _logprobs(self, batch: PaddedBatch, positions: list[int]) -> torch.Tensor:
        """Log-softmax (fp32) at ``positions`` of every row: ``(rows, len(positions), vocab)``."""
        device = self._device()
        kwargs = {
            "input_ids": batch.input_ids.to(device),
            "attention_mask": batch.attention_mask.to(device),
            "use_cache": False,
        }
        if self.takes_positions:
            kwargs["position_ids"] = batch.position_ids.to(device)
        keep = torch.tensor(positions, dtype=torch.long, device=device)
        if self.keeps_logits:
            logits = self.model(**kwargs, logits_to_keep=keep).logits
        else:
            logits = self.model(**kwargs).logits[:, keep]
        return logits.float().log_softmax(dim=-1)

    @torch.no_grad()
    def score(self, rows: Sequence[Row]) -> list[list[tuple[int, float]]]:
        """Per row, ``[(choice_index, summed log-likelihood), ...]``."""
        batch = pad_rows(rows, self.pad_token_id, self.padding_side)
        positions = _scored_positions(rows, batch.offsets)
        column = {position: i for i, position in enumerate(positions)}
        logprobs = self._logprobs(batch, positions).cpu()
        results = []
        for r, (row, offset) in enumerate(zip(rows, batch.offsets, strict=True)):
            scores = []
            for choice, pairs in row.targets:
                total = sum(float(logprobs[r, column[offset + p], t]) for p, t in pairs)
                scores.append((choice, total))
            results.append(scores)
        return results


def batches(rows: Sequence[Row], batch_size: int) -> Iterator[list[Row]]:
    """Rows sorted longest first (less padding), cut into batches of ``batch_size``."""
    ordered = sorted(rows, key=lambda r: -len(r.input_ids))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


def score_encoded(
    scorer: LoglikelihoodScorer,
    encoded: Sequence[EncodedQuestion],
    batch_size: int,
    progress: bool = False,
) -> dict[int, list[float]]:
    """Summed log-likelihood of every candidate of every question, keyed by question index."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [row for question in encoded for row in question_rows(question)]
    scores = {q.index: [float("nan")] * len(q.continuations) for q in encoded}
    total = (len(rows) + batch_size - 1) // batch_size
    for batch in tqdm(batches(rows, batch_size), total=total, disable=not progress, desc="Scoring"):
        for row, row_scores in zip(batch, scorer.score(batch), strict=True):
            for choice, value in row_scores:
                scores[row.question][choice] = value
    return scores


def model_max_length(model: torch.nn.Module, tokenizer=None) -> int:
    """The context size, read as lm-evaluation-harness does: the model config's ``n_positions``,
    ``max_position_embeddings`` or ``n_ctx``, else a sane ``tokenizer.model_max_length``, else 2048.
    """
    config = getattr(model, "config", None)
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _HUGE_TOKENIZER_LENGTH:
        return length
    return _DEFAULT_MAX_LENGTH
