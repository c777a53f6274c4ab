"""Causal-LM text data: tokenise a text ``DatasetDict`` and cut it into ``block_size`` blocks.

The recipe of Hugging Face's ``examples/pytorch/language-modeling/run_clm.py``: every row of a
split is tokenised, the token lists are concatenated in order, and the concatenation is cut into
blocks of ``block_size`` tokens; the last, shorter piece of each ``datasets.map`` batch is dropped,
so no block needs padding and ``labels`` are a copy of ``input_ids`` (the model shifts them).

Used by ``scripts/finetune_gpt2.py``, by the LoRA script for plain-text data, and reusable by any
tool that needs language-model blocks from text::

    from hf_tuningfree.hf.clm import tokenize_and_group
    blocks = tokenize_and_group(raw, tokenizer, block_size=128)   # raw: DatasetDict with "text"
    blocks["train"][0]   # {"input_ids": [...128], "attention_mask": [1]*128, "labels": [...128]}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import datasets

from hf_tuningfree.hf.errors import UserInputError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: ``block_size`` when none is given and the model's context is longer (as ``run_clm.py``).
DEFAULT_MAX_BLOCK_SIZE = 1024

#: Rows per ``datasets.map`` batch while grouping; each batch drops its last partial block.
GROUP_BATCH_SIZE = 1000

#: Part of every cache fingerprint: bump it when the tokenising or grouping code changes.
_FORMAT_VERSION = 1


def text_column(dataset: datasets.Dataset, name: str | None = None) -> str:
    """The column holding the text: ``name`` if given, else ``"text"``, else the first column.

    Raises:
        ValueError: ``name`` is not a column, or the chosen column does not hold strings.
    """
    columns = list(dataset.column_names)
    if name is not None and name not in columns:
        raise UserInputError(f"text_column_name={name!r} is not a column; the data has {columns}")
    chosen = name or ("text" if "text" in columns else columns[0])
    feature = dataset.features.get(chosen)
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string"):
        raise UserInputError(
            f"column {chosen!r} holds {feature}, not text; pass text_column_name= (one of "
            f"{columns})"
        )
    return chosen


def model_context_length(config: PretrainedConfig) -> int | None:
    """The model's context length (``n_positions``, ``max_position_embeddings``), if it has one."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_block_size(
    tokenizer: PreTrainedTokenizerBase,
    config: PretrainedConfig | None = None,
    requested: int | None = None,
) -> int:
    """Tokens per block: ``requested``, else the context length capped at 1024 (``run_clm.py``).

    The context length is the smaller of the tokenizer's ``model_max_length`` (when it is a real
    value, not the "very large" placeholder) and the model config's position count.

    Raises:
        ValueError: ``requested`` is not positive or exceeds the model's context length.
    """
    limits = []
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 1_000_000:
        limits.append(tokenizer_max)
    model_max = model_context_length(config) if config is not None else None
    if model_max is not None:
        limits.append(model_max)
    context = min(limits) if limits else None
    if requested is None:
        return min(context or DEFAULT_MAX_BLOCK_SIZE, DEFAULT_MAX_BLOCK_SIZE)
    if requested <= 0:
        raise UserInputError(f"block_size must be positive, got {requested}")
    if model_max is not None and requested > model_max:
        raise UserInputError(
            f"block_size={requested} exceeds the model's context of {model_max} tokens; "
            f"use block_size <= {model_max}"
        )
    return requested


def group_texts(examples: Mapping[str, list[list[Any]]], block_size: int) -> dict[str, list[Any]]:
    """Concatenate every column's token lists and cut them into ``block_size`` pieces.

    The remainder shorter than ``block_size`` is dropped. ``labels`` is a copy of ``input_ids``.
    A ``datasets.map(batched=True)`` function: ``examples`` maps column -> list of lists.
    """
    if block_size <= 0:
        raise UserInputError(f"block_size must be positive, got {block_size}")
    joined = {key: [item for row in rows for item in row] for key, rows in examples.items()}
    total = (len(joined["input_ids"]) // block_size) * block_size
    out = {
        key: [values[i : i + block_size] for i in range(0, total, block_size)]
        for key, values in joined.items()
    }
    out["labels"] = [list(block) for block in out["input_ids"]]
    return out


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of everything that decides how ``tokenizer`` encodes text (its full serialised
    form for fast tokenizers, the vocabulary otherwise, and the special tokens).

    ``datasets`` fingerprints a ``map`` by pickling its function, which for a closure over a
    50k-token tokenizer takes seconds per call; this digest takes milliseconds and is passed as
    ``new_fingerprint`` instead, so cache files stay keyed by what matters.
    """
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return digest.hexdigest()


def map_fingerprint(dataset: datasets.Dataset, *parts: Any) -> str:
    """A ``new_fingerprint`` for ``dataset.map``: the input's fingerprint and ``parts`` (the
    tokenizer's :func:`tokenizer_fingerprint`, the options, a step name)."""
    digest = hashlib.sha256(str(dataset._fingerprint).encode())
    digest.update(json.dumps([str(p) for p in parts]).encode())
    return digest.hexdigest()[:32]


def _tokenize_function(
    tokenizer: PreTrainedTokenizerBase, column: str, append_eos: bool
) -> Callable[[Mapping[str, list[str]]], dict[str, list[list[int]]]]:
    eos = tokenizer.eos_token_id

    def tokenize(batch: Mapping[str, list[str]]) -> dict[str, list[list[int]]]:
        # verbose=False: rows longer than the model's context are fine here, grouping cuts them.
        encoded = tokenizer(list(batch[column]), verbose=False)
        ids = [list(row) for row in encoded["input_ids"]]
        mask = [list(row) for row in encoded["attention_mask"]]
        if append_eos and eos is not None:
            ids = [[*row, eos] for row in ids]
            mask = [[*row, 1] for row in mask]
        return {"input_ids": ids, "attention_mask": mask}

    return tokenize


def tokenize_and_group(
    raw: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    text_column_name: str | None = None,
    splits: Iterable[str] | None = None,
    append_eos: bool = False,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
    keep_in_memory: bool | None = None,
    main_process_first: Callable[..., contextlib.AbstractContextManager[Any]] | None = None,
) -> datasets.DatasetDict:
    """Tokenise each split's text column and group it into ``block_size``-token blocks.

    Args:
        raw: the text data; every split needs the text column (see :func:`text_column`).
        tokenizer: any ``transformers`` tokenizer; special tokens are added as it adds them.
        block_size: tokens per block (see :func:`resolve_block_size`).
        text_column_name: default ``"text"``, else the first column.
        splits: which splits to process (default: all); others are left out of the result.
        append_eos: end every row with the EOS token before concatenating (for data whose rows
            are whole documents); ``run_clm.py`` does not, and rows of the offline corpora are
            paragraphs that end in a blank line.
        num_proc: worker processes for ``datasets.map``.
        load_from_cache_file: reuse ``datasets``' cache files for file-backed data (set False to
            recompute). In-memory data (the offline corpora) is never cached to disk.
        keep_in_memory: passed to ``datasets.map``; ``None`` lets ``datasets`` decide (in memory
            for in-memory data, cache files for file-backed data).
        main_process_first: e.g. ``training_args.main_process_first``: under a multi-process
            launch the main process tokenises first and the others then read its cache files.

    Returns:
        A ``DatasetDict`` with ``input_ids``, ``attention_mask`` and ``labels`` (equal to
        ``input_ids``), every row exactly ``block_size`` long.

    Raises:
        ValueError: a split has no text column, or yields no full block (too little text for
        ``block_size``: lower it or use more data).
    """
    names = list(splits) if splits is not None else list(raw)
    missing = [name for name in names if name not in raw]
    if missing:
        raise UserInputError(f"splits {missing} are not in the data, which has {sorted(raw)}")
    guard = main_process_first or (lambda **_: contextlib.nullcontext())
    tokenizer_digest = tokenizer_fingerprint(tokenizer)
    out = datasets.DatasetDict()
    for name in names:
        split = raw[name]
        column = text_column(split, text_column_name)
        map_kwargs: dict[str, Any] = {
            "batched": True,
            "num_proc": num_proc,
            "load_from_cache_file": load_from_cache_file,
        }
        if keep_in_memory is not None:
            map_kwargs["keep_in_memory"] = keep_in_memory
        with guard(desc=f"tokenising {name}"):
            tokenized = split.map(
                _tokenize_function(tokenizer, column, append_eos),
                remove_columns=split.column_names,
                desc=f"Tokenising {name}",
                new_fingerprint=map_fingerprint(
                    split, "tokenize", _FORMAT_VERSION, tokenizer_digest, column, append_eos
                ),
                **map_kwargs,
            )
        with guard(desc=f"grouping {name}"):
            blocks = tokenized.map(
                group_texts,
                fn_kwargs={"block_size": block_size},
                batch_size=GROUP_BATCH_SIZE,
                desc=f"Grouping {name} into blocks of {block_size}",
                new_fingerprint=map_fingerprint(tokenized, "group", _FORMAT_VERSION, block_size),
                **map_kwargs,
            )
        if len(blocks) == 0:
            tokens = sum(len(ids) for ids in tokenized["input_ids"])
            raise UserInputError(
                f"split {name!r} has {tokens} tokens, not enough for one block of {block_size}; "
                "use a smaller block_size or more data"
            )
        out[name] = blocks
    return out


def limit_samples(dataset: datasets.Dataset, count: int | None) -> datasets.Dataset:
    """The first ``count`` rows (all rows when ``count`` is ``None`` or at least the length).

    Raises:
        ValueError: ``count`` is not positive.
    """
    if count is None:
        return dataset
    if count <= 0:
        raise UserInputError(f"the sample limit must be positive, got {count}")
    return dataset.select(range(min(count, len(dataset))))
