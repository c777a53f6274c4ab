"""Small model configurations for tests and CPU demos (randomly initialised, no download).

=====================  =========================================  ==================================
config                 shape                                      parameters
=====================  =========================================  ==================================
tiny_gpt2_config       GPT-2, 2 layers, width 32, 2 heads,        1.64 M with GPT-2's 50,257 tokens
                       256 positions                              (1.6 M of them the embedding)
tiny_llama_config      LLaMA, 2 layers, width 32, 4 heads / 2     1.63 M with 50,257 tokens
                       KV heads (GQA), MLP 64, RoPE, 256 pos.
small_gpt2_config      GPT-2, 4 layers, width 128, 4 heads,       1.33 M with a 4,096-token BPE
                       context 128                                (7.2 M with GPT-2's tokens)
=====================  =========================================  ==================================

``small_gpt2_config`` is the main CPU demo's model: with the 4,096-token Shakespeare BPE
(``hf_tuningfree.data.assets.load_corpus_tokenizer``) one AdamW step on a batch of 8 x 128
tokens took ~0.4 s on one busy core (GPT-2's 50k vocabulary: ~2.4 s, the output layer dominates).

Dropout is 0: the runs these serve are short (hundreds of steps on millions of tokens), where
dropout only slows learning, and tests get ``train()``/``eval()`` outputs that agree.
Token ids default to GPT-2's convention (``<|endoftext|>`` is the last id); pass the tokenizer's.
Any other config field can be overridden by keyword.
"""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, LlamaConfig


def _special_ids(vocab_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    eos = overrides.pop("eos_token_id", vocab_size - 1)
    bos = overrides.pop("bos_token_id", eos)
    return {"bos_token_id": bos, "eos_token_id": eos}


def tiny_gpt2_config(vocab_size: int, **overrides: Any) -> GPT2Config:
    """GPT-2 with 2 layers of width 32 (2 heads) and 256 positions, for tests."""
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "n_positions": 256,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **_special_ids(vocab_size, overrides),
    }
    return GPT2Config(**{**fields, **overrides})


def tiny_llama_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """LLaMA with 2 layers of width 32 (4 query / 2 key-value heads, grouped-query attention),
    MLP width 64, RoPE, 256 positions, tied embeddings (as SmolLM2), for tests."""
    ids = _special_ids(vocab_size, overrides)
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "pad_token_id": ids["eos_token_id"],
        **ids,
    }
    return LlamaConfig(**{**fields, **overrides})


def small_gpt2_config(vocab_size: int = 4096, **overrides: Any) -> GPT2Config:
    """GPT-2 with 4 layers of width 128 (4 heads) and a 128-token context: the CPU demo model
    (1.33 M parameters with a 4,096-token vocabulary)."""
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "n_positions": 128,
        "n_embd": 128,
        "n_layer": 4,
        "n_head": 4,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **_special_ids(vocab_size, overrides),
    }
    return GPT2Config(**{**fields, **overrides})


def count_parameters(config: GPT2Config | LlamaConfig) -> int:
    """Parameters of the causal LM built from ``config`` (tied weights counted once), built on the
    ``meta`` device so nothing is allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
