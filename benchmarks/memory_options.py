"""Optimizer state per parameter, for every optimizer and memory option, and what the options cost.

Two measurements, each printed as a markdown table:

1. **State bytes** (default): for each optimizer variant (registry name or ``name:key=value,...``,
   as ``hf-tuningfree compare --optimizers`` takes them) on two fp32 parameter sets, the bytes of
   state per parameter element after the first step, counted two ways: by the project's counter
   (:func:`hf_tuningfree.optim.state_bytes`, each storage once) and by what the allocator retains
   across the first ``step()`` (``torch.profiler`` memory events: allocations minus frees), next to
   ``torch.optim.AdamW`` measured the same way in the same run. Sets: ``gpt2`` (a GPT-2-shaped
   model, 4 layers of width 256, every tensor random) and ``lora`` (LoRA r=16 on four projections of
   16 layers of width 1024: the A matrices random, the B matrices zero, as PEFT initialises them).
2. **Quality** (``--quality DIR [DIR ...]``): from the ``results.json`` of ``hf-tuningfree compare``
   runs, the mean final eval loss over seeds of each variant against its registry name's run with
   the defaults, as a relative change (the same seeds in every run; runs of the same label in
   several directories are pooled).

    python benchmarks/memory_options.py
    python benchmarks/memory_options.py --variants prodigy prodigy:slice_p=11 adopt:betas=0,0.999
    python benchmarks/memory_options.py --quality outputs/mem-demo outputs/mem-lora
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_tuningfree.compare.spec import parse_optimizer
from hf_tuningfree.optim import create_optimizer, state_bytes

BASELINE = "adamw (torch)"
DEFAULT_VARIANTS = (
    "adopt",
    "dadapt_sgd",
    "dadapt_adam",
    "dadapt_adagrad",
    "prodigy",
    "prodigy_sf",
    "dog",
    "ldog",
    "tdog",
    "hyper_sgd",
    "hyper_adam",
    "hyper_adagrad",
    "hyper_rmsprop",
)


def gpt2_shapes(layers: int = 4, hidden: int = 256, vocab: int = 4096) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (256, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (hidden, 3 * hidden), (3 * hidden,), (hidden, hidden)]
        shapes += [(hidden,), (hidden,), (hidden,), (hidden, 4 * hidden), (4 * hidden,)]
        shapes += [(4 * hidden, hidden), (hidden,)]
    return [*shapes, (hidden,), (hidden,)]


def parameter_set(name: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters (with fixed random gradients) of the set ``name``."""
    g = torch.Generator().manual_seed(seed)
    if name == "gpt2":
        tensors = [torch.randn(s, generator=g) * 0.02 for s in gpt2_shapes()]
    elif name == "lora":
        tensors = []
        for _ in range(16 * 4):  # A (r x in) random, B (out x r) zero
            tensors += [torch.randn(16, 1024, generator=g) * 0.01, torch.zeros(1024, 16)]
    else:
        raise ValueError(f"unknown parameter set {name!r}; allowed: gpt2, lora")
    params = [torch.nn.Parameter(t) for t in tensors]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return params


def build(variant: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if variant == BASELINE:
        return torch.optim.AdamW(params, lr=1e-3)
    spec = parse_optimizer(variant)
    return create_optimizer(spec.name, params, **spec.kwargs())


def measure(variant: str, set_name: str) -> dict[str, Any]:
    build(variant, parameter_set(set_name)).step()  # loads the C library outside the profile
    params = parameter_set(set_name)
    opt = build(variant, params)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    retained = sum(e.self_cpu_memory_usage for e in prof.events())
    counted = state_bytes(opt)
    return {
        "variant": variant,
        "set": set_name,
        "elements": counted.elements,
        "bytes_per_element": counted.per_element,
        "total_bytes": counted.total,
        "retained_bytes": retained,
        "by_key": counted.by_key,
    }


def state_table(variants: list[str], sets: list[str]) -> tuple[str, list[dict[str, Any]]]:
    rows = [measure(v, s) for s in sets for v in [BASELINE, *variants]]
    base = {r["set"]: r["bytes_per_element"] for r in rows if r["variant"] == BASELINE}
    lines = [
        "| optimizer | set | state B/param (counter) | retained by step 1 (B/param) "
        "| x AdamW | state tensors (B/param) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["elements"]
        keys = ", ".join(f"{k} {b / n:.2f}" for k, b in r["by_key"].items() if b)
        lines.append(
            f"| {r['variant']} | {r['set']} | {r['bytes_per_element']:.2f} | "
            f"{r['retained_bytes'] / n:.2f} | {r['bytes_per_element'] / base[r['set']]:.2f} "
            f"| {keys} |"
        )
    return "\n".join(lines), rows


def quality_table(dirs: list[Path]) -> str:
    losses: dict[str, dict[int, float]] = {}
    for d in dirs:
        payload = json.loads((d / "results.json").read_text(encoding="utf-8"))
        for r in payload["runs"]:
            if r.get("status") == "ok":
                losses.setdefault(r["label"], {})[r["run"]["seed"]] = r["final_eval_loss"]
    lines = [
        "| variant | seeds | mean final eval loss | defaults' mean (same seeds) | change |",
        "|---|---|---|---|---|",
    ]
    for label in sorted(losses):
        name = label.partition(":")[0]
        if ":" not in label or name not in losses:
            continue
        seeds = sorted(set(losses[label]) & set(losses[name]))
        if not seeds:
            continue
        mine = statistics.fmean(losses[label][s] for s in seeds)
        base = statistics.fmean(losses[name][s] for s in seeds)
        change = 100 * (mine / base - 1)
        lines.append(f"| {label} | {len(seeds)} | {mine:.4f} | {base:.4f} | {change:+.2f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--sets", nargs="+", default=["gpt2", "lora"], choices=["gpt2", "lora"])
    parser.add_argument("--quality", nargs="+", type=Path, default=None, metavar="DIR")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quality:
        print(quality_table(args.quality))
        return 0
    for v in args.variants:
        parse_optimizer(v)  # a bad name or key fails before anything is measured
    table, rows = state_table(args.variants, args.sets)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
