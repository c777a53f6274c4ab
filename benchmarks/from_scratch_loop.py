"""Issue 13's from-scratch setting in a plain PyTorch loop (no Trainer, no scheduler): a GPT-2 of
1.33M parameters (4 layers, width 128) on Shakespeare with the project's 4096-token BPE, 400 steps
of 16 x 128 tokens drawn with seed 0 (``--seed``: initialisation and batch order), a constant
step size (multiplier 1 for the tuning-free optimizers); the eval loss on 64 validation blocks
every 50 steps, then one JSON line.

    python benchmarks/from_scratch_loop.py dog
    python benchmarks/from_scratch_loop.py adamw --lr 1e-3
    python benchmarks/from_scratch_loop.py prodigy --kw d0_rel=0
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_tuningfree.data.assets import load_corpus_tokenizer
from hf_tuningfree.data.corpora import corpus_text
from hf_tuningfree.optim import create_optimizer
from hf_tuningfree.optim.registry import parse_hyperparameter

BLOCK, BATCH, STEPS, EVAL_BLOCKS = 128, 16, 400, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("optimizer", help="a registry name, or adamw")
    parser.add_argument("--lr", type=float, default=None, help="default: the registry's")
    parser.add_argument("--kw", nargs="*", default=[], help="KEY=VALUE hyperparameters")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = load_corpus_tokenizer("shakespeare", 4096)

    def blocks(split: str) -> torch.Tensor:
        ids = tok(corpus_text("shakespeare", split), verbose=False)["input_ids"]
        return torch.tensor([ids[i : i + BLOCK] for i in range(0, len(ids) - BLOCK + 1, BLOCK)])

    train, val = blocks("train"), blocks("validation")[:EVAL_BLOCKS]
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=4096, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4)
    model = GPT2LMHeadModel(config)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr or 1e-3)
    else:
        kw = dict(item.split("=", 1) for item in args.kw)
        kw = {k: parse_hyperparameter(args.optimizer, k, v) for k, v in kw.items()}
        if args.lr is not None:
            kw["lr"] = args.lr
        opt = create_optimizer(args.optimizer, model.parameters(), **kw)
    gen = torch.Generator().manual_seed(args.seed)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [
                model(input_ids=val[i : i + BATCH], labels=val[i : i + BATCH]).loss.item()
                for i in range(0, EVAL_BLOCKS, BATCH)
            ]
        model.train()
        return sum(losses) / len(losses)

    curve: dict[int, float] = {}
    start = time.perf_counter()
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, len(train), (BATCH,), generator=gen)
        model(input_ids=train[idx], labels=train[idx]).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            curve[step] = round(evaluate(), 3)
            print(step, curve[step], flush=True)
    best = min(curve.values())
    print(
        json.dumps(
            {
                "optimizer": args.optimizer,
                "kw": args.kw,
                "seed": args.seed,
                "lr": opt.param_groups[0]["lr"],
                "eval_loss": curve,
                "final_over_best": round(curve[STEPS] / best, 4),
                "wall_seconds": round(time.perf_counter() - start),
            }
        )
    )


if __name__ == "__main__":
    main()
