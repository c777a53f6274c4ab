"""Loading what the scorer evaluates: a model directory, or a base model plus a PEFT adapter."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from hf_tuningfree.data.mmlu_format import hub_is_offline

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _check_source(path: str | os.PathLike, what: str) -> str:
    text = str(path)
    if not Path(text).exists() and hub_is_offline():
        raise FileNotFoundError(
            f"{what} '{text}' is not a local directory and the Hugging Face hub is offline "
            "(HF_HUB_OFFLINE is set); pass a directory written by save_pretrained"
        )
    return text


def _has_tokenizer(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and any((Path(path) / name).exists() for name in _TOKENIZER_FILES)


def load_tokenizer(
    model_path: str | os.PathLike, adapter_path: str | os.PathLike | None = None
) -> PreTrainedTokenizerBase:
    """The adapter directory's tokenizer when it has one (fine-tuning may add tokens), else the
    model's."""
    source = (
        adapter_path if adapter_path is not None and _has_tokenizer(adapter_path) else model_path
    )
    return AutoTokenizer.from_pretrained(_check_source(source, "tokenizer"))


def attach_adapter(model: torch.nn.Module, adapter_path: str | os.PathLike) -> torch.nn.Module:
    """Wrap ``model`` with the PEFT adapter saved in ``adapter_path`` (e.g. LoRA), for inference."""
    from peft import PeftModel

    if not (Path(adapter_path) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter directory '{adapter_path}' has no adapter_config.json; "
            "expected a directory written by PeftModel.save_pretrained"
        )
    return PeftModel.from_pretrained(model, str(adapter_path), is_trainable=False)


def load_model_and_tokenizer(
    model_path: str | os.PathLike,
    adapter_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a causal LM (and optionally a PEFT adapter on top) in eval mode, with its tokenizer.

    Args:
        model_path: a directory written by ``save_pretrained`` (or a hub id when online).
        adapter_path: a PEFT adapter directory trained on ``model_path``.
        dtype: weights' dtype (default: as ``from_pretrained`` decides).
        device: where to put the model (default: CPU, or the caller moves it).
    """
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(_check_source(model_path, "model"), **kwargs)
    if adapter_path is not None:
        model = attach_adapter(model, adapter_path)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, load_tokenizer(model_path, adapter_path)
