"""Runs a comparison: every run in its own process, cached on disk, resumable, divergence-safe.

Each run executes in a fresh worker process (``spawn``), so its peak memory is its own and a crash
or an out-of-memory kill costs one run, not the sweep. A finished run is written to
``<output>/runs/<key>.json`` at once; a later invocation with the same task and runs reuses it and
trains nothing. A run whose loss becomes NaN/Inf is recorded as ``diverged``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_tuningfree.compare.spec import RunSpec, TaskSpec

CACHE_DIR = "runs"
FINAL_STATUSES = ("ok", "diverged")


def cache_path(output_dir: Path, task: TaskSpec, run: RunSpec) -> Path:
    return output_dir / CACHE_DIR / f"{run.key(task)}.json"


def load_cached(output_dir: Path, task: TaskSpec, run: RunSpec) -> dict[str, Any] | None:
    path = cache_path(output_dir, task, run)
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a run killed while writing: run it again
    return result if result.get("status") in FINAL_STATUSES else None


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True), encoding="utf-8")
    os.replace(tmp, path)


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def execute_run(task_dict: dict[str, Any], run_dict: dict[str, Any], output_dir: str) -> dict:
    """Worker entry point: train and evaluate one run, write its result, return it."""
    task, run = TaskSpec.from_dict(task_dict), RunSpec.from_dict(run_dict)
    started = time.perf_counter()
    base = {"run": run.to_dict(), "label": run.label, "key": run.key(task)}
    try:
        from hf_tuningfree.compare.train import train_and_score

        result = {**base, **train_and_score(task, run, Path(output_dir))}
    except Exception as exc:  # recorded, never fatal for the sweep
        result = {
            **base,
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
        }
    result["wall_seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = _peak_rss_mb()
    if result.get("status") in FINAL_STATUSES:
        _write_atomic(cache_path(Path(output_dir), task, run), result)
    return result


def is_diverged(losses: list[float]) -> bool:
    return any(not math.isfinite(x) for x in losses)


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_comparison(
    task: TaskSpec,
    runs: list[RunSpec],
    output_dir: Path,
    *,
    workers: int = 1,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Execute (or reuse) every run; returns results in the order of ``runs``.

    ``workers`` processes run at a time, each run in a fresh process; ``workers=0`` runs them in
    this process, one after another (no per-run memory figure, no crash isolation)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for i, run in enumerate(runs):
        cached = load_cached(output_dir, task, run)
        if cached is not None:
            results[i] = {**cached, "cached": True}
        else:
            todo.append(i)
    total = len(runs)
    if results:
        progress(f"reusing {len(results)} cached run(s) from {output_dir / CACHE_DIR}")
    if not todo:
        return [results[i] for i in range(total)]

    start = time.perf_counter()
    done = 0

    def report(i: int, result: dict[str, Any]) -> None:
        nonlocal done
        results[i] = {**result, "cached": False}
        done += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (len(todo) - done)
        loss = result.get("final_eval_loss")
        detail = f"eval loss {loss:.4f}" if isinstance(loss, float) else result.get("status")
        progress(
            f"[{total - len(todo) + done}/{total}] {runs[i].label} (seed {runs[i].seed}): "
            f"{detail} in {result.get('wall_seconds', float('nan')):.0f}s, "
            f"ETA {_format_eta(eta)}"
        )

    if workers <= 0:  # in this process, one after another (debugging, tests)
        for i in todo:
            report(i, execute_run(task.to_dict(), runs[i].to_dict(), str(output_dir)))
        return [results[i] for i in range(total)]

    ctx = multiprocessing.get_context("spawn")
    kwargs: dict[str, Any] = {"max_workers": max(1, workers), "mp_context": ctx}
    if sys.version_info >= (3, 11):
        kwargs["max_tasks_per_child"] = 1  # a fresh process per run: its own peak memory
    with cf.ProcessPoolExecutor(**kwargs) as pool:
        futures = {
            pool.submit(execute_run, task.to_dict(), runs[i].to_dict(), str(output_dir)): i
            for i in todo
        }
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                result = fut.result()
            except Exception as exc:  # the worker process itself died
                result = {
                    "run": runs[i].to_dict(),
                    "label": runs[i].label,
                    "status": "error",
                    "error": f"worker died: {type(exc).__name__}: {exc}",
                }
            report(i, result)
    return [results[i] for i in range(total)]
