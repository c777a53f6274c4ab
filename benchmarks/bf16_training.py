"""A short training run with bf16 parameters against the same run in fp32 (issue 15.2's goal).

The model, data and loop of ``benchmarks/from_scratch_loop.py`` (a GPT-2 of 1.33M parameters, 4
layers of width 128, on Shakespeare with the project's 4096-token BPE, batches of 16 x 128 tokens
drawn with seed 0, a constant step size), trained three ways per optimizer, everything else equal:

* ``fp32``: fp32 parameters (the reference);
* ``bf16-sr``: the parameters (and so the activations and gradients) in bf16, the optimizer's
  default ``stochastic_rounding=True``: the update computed in fp32 and written back stochastically;
* ``bf16-rtn``: bf16 parameters with ``stochastic_rounding=False`` (round to nearest), for
  comparison.

It prints, per optimizer, the final eval loss (64 validation blocks, computed in fp32 from the
weights as they are) of each way and its ratio to fp32, then one JSON line of everything.
``--lr-scale`` multiplies the registry's lr (e.g. 0.01 makes the updates small against the
weights, where round-to-nearest loses them).

    python benchmarks/bf16_training.py
    python benchmarks/bf16_training.py --optimizers adopt --steps 100 --lr-scale 0.01
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_tuningfree.data.assets import load_corpus_tokenizer
from hf_tuningfree.data.corpora import corpus_text
from hf_tuningfree.optim import create_optimizer, get_optimizer_spec

BLOCK, BATCH, EVAL_BLOCKS = 128, 16, 64
WAYS = ("fp32", "bf16-sr", "bf16-rtn")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    tok = load_corpus_tokenizer("shakespeare", 4096)

    def blocks(split: str) -> torch.Tensor:
        ids = tok(corpus_text("shakespeare", split), verbose=False)["input_ids"]
        return torch.tensor([ids[i : i + BLOCK] for i in range(0, len(ids) - BLOCK + 1, BLOCK)])

    return blocks("train"), blocks("validation")[:EVAL_BLOCKS]


def _eval(model: torch.nn.Module, val: torch.Tensor) -> float:
    fp32 = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        losses = [
            fp32(input_ids=val[i : i + BATCH], labels=val[i : i + BATCH]).loss.item()
            for i in range(0, len(val), BATCH)
        ]
    return sum(losses) / len(losses)


def train(name: str, way: str, steps: int, lr_scale: float, data) -> dict[str, float]:
    train_blocks, val = data
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=4096, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4)
    model = GPT2LMHeadModel(config)
    if way != "fp32":
        model = model.to(torch.bfloat16)
    kw = {"lr": get_optimizer_spec(name).lr * lr_scale, "stochastic_rounding": way != "bf16-rtn"}
    opt = create_optimizer(name, model.parameters(), **kw)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(train_blocks), (BATCH,), generator=gen)
        model(input_ids=train_blocks[idx], labels=train_blocks[idx]).loss.backward()
        opt.step()
        opt.zero_grad()
    return {"eval_loss": _eval(model, val), "wall_seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["adopt", "prodigy", "hyper_adam"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr-scale", type=float, default=1.0)
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    args = parser.parse_args(argv)
    for name in args.optimizers:
        get_optimizer_spec(name)  # a bad name fails before any training
    torch.set_num_threads(1)
    data = _data()
    rows = []
    print("| optimizer | " + " | ".join(args.ways) + " | " + " | ".join(
        f"{w} / fp32" for w in args.ways if w != "fp32") + " |")  # fmt: skip
    print("|---" * (1 + 2 * len(args.ways) - ("fp32" in args.ways)) + "|")
    for name in args.optimizers:
        got = {w: train(name, w, args.steps, args.lr_scale, data) for w in args.ways}
        ref = got.get("fp32", {}).get("eval_loss")
        cells = [f"{got[w]['eval_loss']:.4f}" for w in args.ways]
        ratios = [f"{got[w]['eval_loss'] / ref:.4f}" for w in args.ways if w != "fp32" and ref]
        print(f"| {name} | " + " | ".join(cells + ratios) + " |", flush=True)
        rows.append({"optimizer": name, "steps": args.steps, "lr_scale": args.lr_scale, **got})
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
