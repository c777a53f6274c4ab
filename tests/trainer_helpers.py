"""Tiny, learnable causal-LM training setups for Trainer tests (offline, seconds each)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 64
SEQ = 16


class PatternDataset(torch.utils.data.Dataset):
    """Sequences following ``x[i+1] = (3 x[i] + 1) mod V`` from random starts: a tiny GPT-2 learns
    it within a few dozen steps, so a falling loss means the optimizer works."""

    def __init__(self, n: int = 64, seed: int = 0, vocab: int = VOCAB, seq: int = SEQ) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n,), generator=gen)
        rows = [starts]
        for _ in range(seq - 1):
            rows.append((rows[-1] * 3 + 1) % vocab)
        self.data = torch.stack(rows, dim=1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[i]
        return {"input_ids": ids, "labels": ids.clone()}


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def train_losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
