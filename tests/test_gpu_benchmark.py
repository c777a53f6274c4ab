"""benchmarks/gpu_step_time.py, end to end on CPU with tiny shapes (the GPU run is the same code
with CUDA events and memory counters; it cannot run here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_step_time.py"


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300
    )


def _load_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_step_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_step_time"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_writes_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = _run(
        "--device", "cpu", "--tiny", "--sets", "lora", "gpt2-124m", "--dtypes", "fp32", "bf16",
        "--only", "adopt,prodigy", "--steps", "3", "--rounds", "2", "--warmup", "1",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads((out / "gpu_step_time.json").read_text())
    rows = payload["results"]
    assert payload["environment"]["device"] == "cpu"
    assert [(r["set"], r["dtype"], r["optimizer"]) for r in rows] == [
        (s, d, o)
        for s in ("lora", "gpt2-124m")
        for d in ("fp32", "bf16")
        for o in ("AdamW fused", "adopt", "prodigy")
    ]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    for r in rows:
        assert len(r["times_ms"]) == 6  # rounds x steps
        assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"]
    bench = _load_module()
    for (set_name, dtype), elsize in {
        ("lora", "fp32"): 4, ("lora", "bf16"): 2, ("gpt2-124m", "fp32"): 4,
        ("gpt2-124m", "bf16"): 2,
    }.items():  # fmt: skip
        shapes, _ = bench.parameter_set(set_name, tiny=True)
        numel = sum(math.prod(s) for s in shapes)
        key = (set_name, dtype, "AdamW fused")
        adamw = next(r for r in rows if (r["set"], r["dtype"], r["optimizer"]) == key)
        # two moments in the parameters' dtype plus one fp32 step counter per tensor
        assert adamw["state_mb"] * 2**20 == 2 * numel * elsize + 4 * len(shapes)
    table = (out / "gpu_step_time.md").read_text().splitlines()
    assert len(table) == 2 + len(rows)
    baseline_rows = [line for line in table if "| AdamW fused |" in line]
    assert len(baseline_rows) == 4 and all("| 1.00 |" in line for line in baseline_rows)


def test_lora_set_has_zero_b_matrices() -> None:
    bench = _load_module()
    shapes, zero = bench.parameter_set("lora", tiny=False)
    assert len(shapes) == 256  # r=16 on q/k/v/o of 32 layers: one A and one B each
    assert shapes[:2] == [(16, 4096), (4096, 16)]
    assert zero.count(True) == 128 and zero[1] and not zero[0]
    gpt2, _ = bench.parameter_set("gpt2-124m", tiny=False)
    assert sum(math.prod(s) for s in gpt2) == 124_439_808  # GPT-2 small
    big, _ = bench.parameter_set("1.3b", tiny=False)
    assert 1.2e9 < sum(math.prod(s) for s in big) < 1.45e9


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cpu", "--tiny", "--only", "adpot"], "--only: unknown optimizer(s) adpot"),
        (["--device", "cpu", "--tiny", "--steps", "0"], "--steps must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv: list[str], message: str) -> None:
    result = _run(*argv)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
