"""benchmarks/memory_options.py: the state table (counter beside the allocator's retained bytes)
and the quality table computed from compare's results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "memory_options", ROOT / "benchmarks" / "memory_options.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_options"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_state_rows_agree_with_the_allocator_and_adamw_is_eight(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    assert bench.main(["--variants", "prodigy", "dog", "--sets", "lora", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {bench.BASELINE, "prodigy", "dog"}
    assert rows[bench.BASELINE]["bytes_per_element"] == pytest.approx(8.0, abs=1e-3)
    for r in rows.values():
        # the allocator keeps what the counter counts, plus at most a few flag bytes
        assert 0 <= r["retained_bytes"] - r["total_bytes"] <= 64, r
    assert rows["dog"]["by_key"].keys() >= {"dist_sq"}


def test_a_bad_variant_fails_before_measuring() -> None:
    with pytest.raises(ValueError, match="nonexistent"):
        bench.main(["--variants", "nonexistent"])


def test_quality_table_pairs_each_variant_with_its_defaults(tmp_path: Path) -> None:
    def run(label: str, seed: int, loss: float, status: str = "ok") -> dict:
        return {"label": label, "run": {"seed": seed}, "final_eval_loss": loss, "status": status}

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    runs_a = [run("prodigy", 0, 2.0), run("prodigy", 1, 4.0), run("prodigy:slice_p=11", 0, 2.2)]
    runs_b = [run("prodigy:slice_p=11", 1, 4.4), run("prodigy:slice_p=11", 2, 9.0)]
    runs_b.append(run("dog:slice_p=4", 0, 1.0))  # no defaults' run: left out
    runs_b.append(run("prodigy", 2, float("nan"), status="error"))  # failed runs are left out
    (a / "results.json").write_text(json.dumps({"runs": runs_a}))
    (b / "results.json").write_text(json.dumps({"runs": runs_b}))
    table = bench.quality_table([a, b])
    lines = table.splitlines()
    assert len(lines) == 3  # header, rule, one variant: seeds 0 and 1 pooled across directories
    assert lines[2] == "| prodigy:slice_p=11 | 2 | 3.3000 | 3.0000 | +10.00% |"
