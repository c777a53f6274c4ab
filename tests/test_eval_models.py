"""Scoring a model directory and a base model plus a PEFT (LoRA) adapter directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_llama, trained_bpe_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model

from hf_tuningfree.data import synthetic_mc_rows
from hf_tuningfree.eval import load_model_and_tokenizer, score_mmlu


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaMA with its tokenizer in one directory and a LoRA adapter in another."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = trained_bpe_tokenizer()
    base = tiny_llama(len(tokenizer), seed=1)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    torch.manual_seed(2)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(tiny_llama(len(tokenizer), seed=1), config)
    peft_model.save_pretrained(root / "adapter")
    return root, base, peft_model.eval(), tokenizer


@pytest.fixture(scope="module")
def data():
    rows = synthetic_mc_rows(5, n_validation=0, n_test=1, n_train=0)
    return rows["test"], rows["dev"]


def _lls(result) -> np.ndarray:
    return np.array(result.loglikelihoods)


def test_model_directory_scores_like_the_model_object(saved, data):
    root, base, _, tokenizer = saved
    test, dev = data
    from_dir = score_mmlu(str(root / "base"), test, fewshot=dev, shots=1, progress=False)
    in_memory = score_mmlu(base, test, tokenizer=tokenizer, fewshot=dev, shots=1, progress=False)
    assert np.abs(_lls(from_dir) - _lls(in_memory)).max() <= 1e-6


def test_adapter_directory_scores_like_the_peft_model(saved, data):
    root, base, peft_model, tokenizer = saved
    test, dev = data
    kwargs = {"fewshot": dev, "shots": 1, "progress": False}
    with_adapter = score_mmlu(str(root / "base"), test, adapter=str(root / "adapter"), **kwargs)
    in_memory = score_mmlu(peft_model, test, tokenizer=tokenizer, **kwargs)
    base_only = score_mmlu(base, test, tokenizer=tokenizer, **kwargs)
    assert np.abs(_lls(with_adapter) - _lls(in_memory)).max() <= 1e-6
    assert np.abs(_lls(with_adapter) - _lls(base_only)).max() > 1e-3  # the adapter matters


def test_loader_returns_eval_mode_peft_model(saved):
    root, *_ = saved
    model, tokenizer = load_model_and_tokenizer(root / "base", root / "adapter")
    assert isinstance(model, PeftModel) and not model.training
    assert tokenizer("Answer: A")["input_ids"] == trained_bpe_tokenizer()("Answer: A")["input_ids"]


def test_missing_directories_are_named(saved, tmp_path, monkeypatch):
    root, *_ = saved
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config\.json"):
        load_model_and_tokenizer(root / "base", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'nowhere/model' is not a local directory"):
        load_model_and_tokenizer("nowhere/model")
