#!/usr/bin/env python
"""Questions per second of the MMLU scorer on a tiny model: one question per forward vs batched.

Not a test. Builds a GPT-2 with random weights (2 layers x 32 wide by default)
and a byte-level BPE trained on the synthetic benchmark, and scores the synthetic multiple-choice
benchmark (MMLU format), 5-shot, letters variant (one row per question) and continuation variant
(one row per answer text), with batch size 1 and ``--batch-size``. Rounds alternate between the two
settings so that background load hits both alike; the median round is reported.

    OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py [--questions 10] [--batch-size 16]

On one CPU thread batching helps only while per-call overhead dominates (tiny models); once the
matrix products dominate, a padded batch costs as much per row as single rows do. On a GPU the
batch is where the speed comes from.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from hf_tuningfree.data import make_synthetic_mc
from hf_tuningfree.eval.prompts import (
    get_format,
    solved_example,
)
from hf_tuningfree.eval.scorer import build_prompts, multiple_choice_loglikelihoods


def small_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A 1,000-token byte-level BPE trained on ``texts`` (id 0 is the end-of-text token)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def small_model(vocab_size: int, width: int, layers: int, device: str) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of the given width and depth."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        n_positions=1024,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).to(device).eval()


def seconds(model, tokenizer, prompts, batch_size: int) -> float:
    start = time.perf_counter()
    multiple_choice_loglikelihoods(model, tokenizer, prompts, batch_size=batch_size, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=10, help="test questions per subject")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=32, help="GPT-2 n_embd (32: tiny, 128: small)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = make_synthetic_mc(0, n_test=args.questions, n_train=50)
    texts = [solved_example(r, get_format("letters")) for r in data["auxiliary_train"]]
    tokenizer = small_tokenizer(texts)
    model = small_model(len(tokenizer), args.width, args.layers, args.device)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 {args.layers}x{args.width} ({parameters / 1e6:.2f}M parameters) on {args.device}")
    for variant in ("letters", "continuation"):
        prompts = build_prompts(list(data["test"]), list(data["dev"]), 5, variant)
        seconds(model, tokenizer, prompts[:4], args.batch_size)  # warm-up
        single, batched = [], []
        for _ in range(args.rounds):
            single.append(seconds(model, tokenizer, prompts, 1))
            batched.append(seconds(model, tokenizer, prompts, args.batch_size))
        qps_single = len(prompts) / statistics.median(single)
        qps_batched = len(prompts) / statistics.median(batched)
        ratio = qps_batched / qps_single
        print(
            f"{variant:>12}: {len(prompts)} questions, 5-shot | batch 1: {qps_single:7.1f} q/s | "
            f"batch {args.batch_size}: {qps_batched:7.1f} q/s | ratio {ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
