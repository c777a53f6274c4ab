"""GPU optimizer step-time and memory benchmark: every registry optimizer against
``torch.optim.AdamW(fused=True)``, measured in the same run.

Written for a GPU machine and runnable anywhere (``--device cpu --tiny`` finishes in seconds and is
what the test suite runs, so the script is known to work before a GPU is lent). For each parameter
set and parameter dtype it builds the parameters once, gives them fixed random gradients and, for
each contender in turn:

1. creates the optimizer and times its first step (lazy state, compilation: reported apart);
2. runs ``--warmup`` more steps, then ``--rounds`` x ``--steps`` timed steps, each bracketed by
   CUDA events (``torch.cuda.Event(enable_timing=True)``; the wall clock on CPU), the parameters
   reset to the same values before every round;
3. records the peak memory above the parameters and gradients (``torch.cuda.max_memory_allocated``
   on CUDA; on CPU the bytes of the optimizer's state tensors) and the optimizer state's size;
4. on CUDA, runs one more step under ``torch.cuda.set_sync_debug_mode("error")``: a step that
   synchronises with the host raises there, and the table says so.

Parameter sets (``--sets``): ``gpt2-124m`` (GPT-2 small's 148 tensors: 12 layers, width 768,
vocabulary 50257, 1024 positions), ``1.3b`` (a GPT-3 XL-shaped model: 24 layers, width 2048, 1.3B
parameters), ``lora`` (LoRA r=16 on q/k/v/o of a 32-layer, width-4096 model: 256 small tensors, the
A matrices random, the B matrices zero as PEFT initialises them). ``--dtypes fp32 bf16`` runs
each with fp32 and with bf16 parameters (and gradients). ``--tiny`` shrinks every set to a few
thousand elements with the same tensor structure.

Outputs: a markdown table on stdout and, with ``--out DIR``, ``gpu_step_time.json`` (every
measurement) and ``gpu_step_time.md``. Ratios are against fused AdamW on the same set and dtype in
the same process, the only comparison this script claims.

    python benchmarks/gpu_step_time.py --out outputs/gpu-bench             # on a GPU
    python benchmarks/gpu_step_time.py --sets lora --dtypes bf16 --only prodigy,adopt
    python benchmarks/gpu_step_time.py --device cpu --tiny                 # smoke run anywhere
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_tuningfree.optim import (
    available_optimizers,
    create_optimizer,
    get_optimizer_spec,
    state_bytes,
)

BASELINE = "AdamW fused"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

Shapes = list[tuple[int, ...]]


# --------------------------------------------------------------------------- parameter sets
def gpt_shapes(layers: int, hidden: int, vocab: int, positions: int) -> Shapes:
    """GPT-2-style tensors: token and position embeddings, per layer two LayerNorms, the fused
    qkv projection, the output projection and the MLP (weights and biases), a final LayerNorm."""
    shapes: Shapes = [(vocab, hidden), (positions, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (hidden, 3 * hidden), (3 * hidden,)]
        shapes += [(hidden, hidden), (hidden,), (hidden,), (hidden,)]
        shapes += [(hidden, 4 * hidden), (4 * hidden,), (4 * hidden, hidden), (hidden,)]
    return [*shapes, (hidden,), (hidden,)]


def lora_shapes(layers: int, hidden: int, rank: int, targets: int = 4) -> tuple[Shapes, list[bool]]:
    """LoRA adapters on ``targets`` square projections per layer: A (rank x hidden), B (hidden x
    rank). Returns the shapes and, per tensor, whether PEFT initialises it to zero (the B's)."""
    shapes: Shapes = []
    zero: list[bool] = []
    for _ in range(layers * targets):
        shapes += [(rank, hidden), (hidden, rank)]
        zero += [False, True]
    return shapes, zero


def parameter_set(name: str, tiny: bool) -> tuple[Shapes, list[bool]]:
    """Shapes (and which tensors start at zero) of the set ``name``."""
    if name == "gpt2-124m":
        shapes = gpt_shapes(2, 32, 256, 64) if tiny else gpt_shapes(12, 768, 50257, 1024)
    elif name == "1.3b":
        shapes = gpt_shapes(2, 48, 256, 64) if tiny else gpt_shapes(24, 2048, 50257, 2048)
    elif name == "lora":
        return lora_shapes(2, 64, 4) if tiny else lora_shapes(32, 4096, 16)
    else:
        raise ValueError(f"unknown parameter set {name!r}; allowed: {', '.join(SETS)}")
    return shapes, [False] * len(shapes)


SETS = ("gpt2-124m", "1.3b", "lora")


# --------------------------------------------------------------------------- contenders
Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def contenders(names: list[str], implementation: str) -> dict[str, Factory]:
    """The baseline first, then each registry optimizer at its defaults."""
    out: dict[str, Factory] = {BASELINE: lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)}
    for name in names:
        if implementation not in ("auto", *get_optimizer_spec(name).implementations):
            print(f"{name}: no {implementation!r} form, left out", file=sys.stderr)
            continue
        out[name] = lambda p, n=name: create_optimizer(n, p, implementation=implementation)
    return out


@dataclass
class Result:
    set: str
    dtype: str
    optimizer: str
    median_ms: float | None = None
    p10_ms: float | None = None
    first_step_ms: float | None = None
    peak_extra_mb: float | None = None
    state_mb: float | None = None
    host_syncs: str = "n/a"
    error: str | None = None
    times_ms: list[float] = field(default_factory=list)


class Timer:
    """Per-step timing: CUDA events on CUDA (read after the round), the wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[Any, Any]] = []
        self.done: list[float] = []

    def time(self, fn: Callable[[], Any]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self.done.append((time.perf_counter() - t0) * 1e3)

    def collect(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            self.done += [s.elapsed_time(e) for s, e in self.pending]
            self.pending = []
        return self.done


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def measure(
    factory: Factory,
    params: list[torch.nn.Parameter],
    master: list[torch.Tensor],
    device: torch.device,
    args: argparse.Namespace,
    result: Result,
) -> None:
    """Fill ``result`` with the timings and memory of ``factory``'s optimizer on ``params``."""
    with torch.no_grad():
        torch._foreach_copy_(params, master)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = _allocated(device)
    opt = factory(params)
    _sync(device)
    t0 = time.perf_counter()
    opt.step()
    _sync(device)
    result.first_step_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(args.warmup):
        opt.step()
    timer = Timer(device)
    for _ in range(args.rounds):
        with torch.no_grad():
            torch._foreach_copy_(params, master)
        for _ in range(args.steps):
            timer.time(opt.step)
        timer.collect()
    times = timer.collect()
    result.times_ms = times
    result.median_ms = statistics.median(times)
    result.p10_ms = sorted(times)[len(times) // 10]
    result.state_mb = state_bytes(opt).total / 2**20
    if device.type == "cuda":
        result.peak_extra_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            torch.cuda.set_sync_debug_mode(0)
            _sync(device)
            result.host_syncs = "0"
        except RuntimeError as exc:
            result.host_syncs = f"syncs: {str(exc).splitlines()[0][:80]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        result.peak_extra_mb = result.state_mb
    del opt
    gc.collect()


def run(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu --tiny)")
    torch.manual_seed(0)
    names = args.only.split(",") if args.only else available_optimizers()
    unknown = [n for n in names if n not in available_optimizers()]
    if unknown:
        raise SystemExit(
            f"--only: unknown optimizer(s) {', '.join(unknown)}; allowed: "
            + ", ".join(available_optimizers())
        )
    results: list[Result] = []
    for set_name in args.sets:
        shapes, zero = parameter_set(set_name, args.tiny)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            gen = torch.Generator(device="cpu").manual_seed(0)
            master = [
                torch.zeros(s, dtype=dtype, device=device)
                if z
                else (torch.randn(s, generator=gen) * 0.02).to(device, dtype)
                for s, z in zip(shapes, zero, strict=True)
            ]
            params = [torch.nn.Parameter(m.clone()) for m in master]
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device, dtype)
            numel = sum(p.numel() for p in params)
            print(
                f"== {set_name}: {numel / 1e6:.2f}M parameters in {len(params)} tensors, "
                f"{dtype_name}, {device}",
                flush=True,
            )
            for label, factory in contenders(names, args.implementation).items():
                result = Result(set_name, dtype_name, label)
                try:
                    measure(factory, params, master, device, args, result)
                except Exception as exc:  # one contender's failure must not end the run
                    result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    if args.verbose:
                        traceback.print_exc()
                results.append(result)
                status = result.error or f"{result.median_ms:.3f} ms"
                print(f"  {label}: {status}", flush=True)
            del params, master
            gc.collect()
    return results


def ratios(results: list[Result]) -> dict[tuple[str, str, str], float | None]:
    """Median step time / fused AdamW's on the same set and dtype (None where either failed)."""
    base = {
        (r.set, r.dtype): r.median_ms
        for r in results
        if r.optimizer == BASELINE and r.median_ms is not None
    }
    out: dict[tuple[str, str, str], float | None] = {}
    for r in results:
        b = base.get((r.set, r.dtype))
        out[(r.set, r.dtype, r.optimizer)] = (
            None if b is None or r.median_ms is None else r.median_ms / b
        )
    return out


def markdown(results: list[Result]) -> str:
    ratio = ratios(results)
    lines = [
        "| set | dtype | optimizer | median step (ms) | x fused AdamW | p10 (ms) | first step (ms) "
        "| peak above params+grads (MiB) | state (MiB) | host syncs in a step |",
        "|---" * 10 + "|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.set} | {r.dtype} | {r.optimizer} | failed: {r.error} |||||||")
            continue
        x = ratio[(r.set, r.dtype, r.optimizer)]
        lines.append(
            f"| {r.set} | {r.dtype} | {r.optimizer} | {r.median_ms:.3f} | "
            f"{'' if x is None else f'{x:.2f}'} | {r.p10_ms:.3f} | {r.first_step_ms:.0f} | "
            f"{r.peak_extra_mb:.1f} | {r.state_mb:.1f} | {r.host_syncs} |"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--only", default="", help="comma-separated registry names (default all)")
    parser.add_argument(
        "--implementation", default="auto", help="the optimizers' implementation= (default auto)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON and .md")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    results = run(args)
    table = markdown(results)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": environment(torch.device(args.device)),
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": [asdict(r) for r in results],
        }
        (args.out / "gpu_step_time.json").write_text(json.dumps(payload, indent=1))
        (args.out / "gpu_step_time.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
