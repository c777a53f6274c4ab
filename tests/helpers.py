"""Offline builders for tests: tiny tokenizers and tiny causal LMs (no hub access).

Other test files can reuse these:

- :func:`trained_bpe_tokenizer`: a byte-level BPE trained here on a few hundred MMLU-format strings
  (the letters `` A``..`` D`` come out as single tokens).
- :func:`char_tokenizer`: byte-level, no merges: each character is a token, `` A`` is two tokens.
- :func:`boundary_merge_tokenizer`: byte-level without the pre-tokenizer split and with the single
  merge ``":" + " "``, so ``"Answer:"`` + ``" A"`` tokenises differently from ``"Answer:"`` alone.
- :func:`tiny_gpt2` / :func:`tiny_llama`: randomly initialised 2-layer models built from configs.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def sample_texts(count: int = 300, seed: int = 0) -> list[str]:
    """MMLU-format prompt texts from the synthetic benchmark, for training tokenizers."""
    from hf_tuningfree.data.synthetic_mc import synthetic_mc_rows

    rows = synthetic_mc_rows(seed, n_validation=0, n_test=0, n_train=count // 6 + 1)
    texts = []
    for row in rows["auxiliary_train"][:count]:
        options = "".join(
            f"\n{letter}. {c}" for letter, c in zip("ABCD", row["choices"], strict=True)
        )
        answer = "ABCD"[row["answer"]]
        texts.append(f"The following are multiple choice questions (with answers) about "
                     f"{row['subject'].replace('_', ' ')}.\n\n{row['question']}{options}\n"
                     f"Answer: {answer}\nQuestion: {row['question']}\nAnswer: "
                     f"{row['choices'][row['answer']]}")  # fmt: skip
    return texts


@functools.cache
def trained_bpe_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on :func:`sample_texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sample_texts(), trainer)
    return _wrap(tokenizer)


def _handmade_bytelevel(merges: list[tuple[str, str]], use_regex: bool) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {EOS: 0, **{symbol: i + 1 for i, symbol in enumerate(alphabet)}}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tokenizer.decoder = decoders.ByteLevel()
    return _wrap(tokenizer)


@functools.cache
def char_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level with no merges: `` A`` is the two tokens ``Ġ`` and ``A``."""
    return _handmade_bytelevel([], use_regex=True)


@functools.cache
def boundary_merge_tokenizer() -> PreTrainedTokenizerFast:
    """No pre-tokenizer split and the merge ``:`` + ``Ġ``: ``"Answer: A"`` ends in ``[":Ġ", "A"]``
    while ``"Answer:"`` ends in ``[":"]``, so the context's tokens are not a prefix of the whole."""
    return _handmade_bytelevel([(":", "Ġ")], use_regex=False)


def tiny_gpt2(vocab_size: int, n_positions: int = 1024, seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer, 32-wide GPT-2 with a wide init so that candidates get clearly different scores."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(vocab_size: int, max_positions: int = 1024, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, 32-wide LLaMA (grouped-query attention, RoPE) with a wide init."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log p(continuation | context) from one direct, unpadded forward pass.

    The continuation's tokens are those of ``context + continuation`` after the context's own
    tokens when those form a prefix, else the continuation encoded on its own.
    """
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    if whole[: len(context_ids)] == context_ids:
        continuation_ids = whole[len(context_ids) :]
    else:
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].double().log_softmax(-1)
    start = len(context_ids) - 1
    return sum(float(logprobs[start + j, t]) for j, t in enumerate(continuation_ids))
