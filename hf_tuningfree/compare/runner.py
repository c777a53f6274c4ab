"""Runs a comparison: runs in worker processes, cached on disk, resumable, interruptible.

Runs execute in ``workers`` long-lived worker processes (``spawn``): a crash or an out-of-memory
kill costs the runs of one worker, not the sweep, and each worker imports torch and builds the task
(tokenised data) once. Each run's peak memory is its own: on Linux the worker resets its peak
resident-set counter before a run (``/proc/self/clear_refs``) and reads ``VmHWM`` after it;
elsewhere the process peak so far is reported. A finished run is written to
``<output>/runs/<key>.json`` at once (atomically: a file is complete or absent); a later
invocation with the same task and runs reuses it and trains nothing. A run whose loss becomes
NaN/Inf, or that the skipped-step guard stops, is recorded as ``diverged``.

What a run prints (the Trainer's log lines, warnings) goes to its own file,
``<output>/logs/<label>-seed<seed>-<key>.log``; the console shows one progress line per run.

Ctrl-C (SIGINT, to the whole process group as a terminal sends it): the workers ignore it and the
main process decides. The first one stops dispatching and says so; the runs in progress finish
and are cached, then :class:`ComparisonInterrupted` is raised (the CLI exits 130). A second one
abandons the runs in progress at once (their workers are terminated; nothing half-written is left
in the cache). A re-run of the same command trains only what is not cached.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hf_tuningfree.compare import spec as spec_module
from hf_tuningfree.compare.spec import RunSpec, TaskSpec

CACHE_DIR = "runs"
LOG_DIR = "logs"
FINAL_STATUSES = ("ok", "diverged")
#: Seconds between checks for a Ctrl-C while waiting on the workers.
POLL_SECONDS = 0.2


class ComparisonInterrupted(Exception):
    """Ctrl-C stopped the comparison; ``finished`` runs of ``total`` are cached.

    Attributes:
        finished: runs with a result (cached ones included).
        total: runs of the comparison.
        abandoned: runs that were in progress and were stopped (second Ctrl-C).
    """

    def __init__(self, finished: int, total: int, abandoned: int) -> None:
        self.finished, self.total, self.abandoned = finished, total, abandoned
        super().__init__(
            f"interrupted: {finished} of {total} runs done and cached"
            + (f", {abandoned} in progress abandoned" if abandoned else "")
        )


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


def _reset_peak_rss() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def log_path(output_dir: Path, task: TaskSpec, run: RunSpec) -> Path:
    """Where the output of ``run`` goes: ``logs/<label>-seed<seed>-<key>.log``."""
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", run.label)
    return output_dir / LOG_DIR / f"{label}-seed{run.seed}-{run.key(task)}.log"


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's output to ``path`` for the duration: file descriptors 1 and 2 (C
    libraries, ``logging`` handlers made earlier on the real streams) and ``sys.stdout`` /
    ``sys.stderr`` (also when they had been replaced, e.g. under pytest). The streams set for
    the duration are never closed (``closefd=False``): a handler made meanwhile keeps a usable
    stream, which writes to the console again afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        out = open(1, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        err = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield
        finally:
            for stream in (out, err):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


#: The digest of ``hf_tuningfree/optim/`` (:func:`~hf_tuningfree.compare.spec.optim_source_hash`)
#: this process runs: taken just before its first run imports the package (in a worker, before
#: anything else loads it; in-process, where the CLI has loaded it already, at the first run).
_loaded_optim_source: str | None = None

OPTIM_SOURCE_CHANGED = (
    "hf_tuningfree/optim/ was edited during this comparison: this process still runs the source "
    "it loaded first, so the run is not cached under the edited source's key; run the command "
    "again"
)


def _optim_source_is_loaded_one() -> bool:
    """True when the optimizer source on disk is the one this process loaded (tuning-free runs
    are cached under its digest: a long-lived worker that loaded one version and is handed a run
    after an edit would otherwise store the old code's result under the new code's key)."""
    global _loaded_optim_source
    now = spec_module.optim_source_hash()
    if _loaded_optim_source is None:
        _loaded_optim_source = now
        import hf_tuningfree.optim  # noqa: F401  (loaded now, as just hashed)
    return now == _loaded_optim_source


def execute_run(task_dict: dict[str, Any], run_dict: dict[str, Any], output_dir: str) -> dict:
    """Worker entry point: train and evaluate one run, write its result, return it. What the run
    prints goes to its log file (:func:`log_path`). A tuning-free run whose optimizer source was
    edited after this process loaded it, or while it trained, is an error and is not cached
    (:data:`OPTIM_SOURCE_CHANGED`)."""
    task, run = TaskSpec.from_dict(task_dict), RunSpec.from_dict(run_dict)
    _reset_peak_rss()
    started = time.perf_counter()
    log = log_path(Path(output_dir), task, run)
    base = {"run": run.to_dict(), "label": run.label, "key": run.key(task), "log": str(log)}
    keyed_by_source = run.role == "tuning-free"
    with output_to(log):
        try:
            loaded_is_on_disk = _optim_source_is_loaded_one()  # every run: the first one loads
            if keyed_by_source and not loaded_is_on_disk:
                raise RuntimeError(OPTIM_SOURCE_CHANGED)
            from hf_tuningfree.compare.train import train_and_score
            from hf_tuningfree.hf.callback import NonFiniteGradientsError

            try:
                result = {**base, **train_and_score(task, run, Path(output_dir))}
            except NonFiniteGradientsError as exc:  # the skipped-step guard stopped the run
                result = {**base, "status": "diverged", "error": str(exc)}
        except Exception as exc:  # recorded, never fatal for the sweep
            result = {
                **base,
                "status": "error",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8),
            }
            print(result["traceback"], file=sys.stderr)
    result["wall_seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = _peak_rss_mb()
    if keyed_by_source and run.key(task) != base["key"]:  # edited while it trained
        result.update(status="error", error=OPTIM_SOURCE_CHANGED)
    if result.get("status") in FINAL_STATUSES:
        _write_atomic(cache_path(Path(output_dir), task, run), result)
    return result


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C reaches the whole process group; the main process decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _CtrlC:
    """SIGINT handling for the duration of a comparison (main thread only).

    The handler only counts and, where ``progress`` is safe to call from a signal handler
    (``progress.signal_safe``, as :func:`hf_tuningfree.compare.cli.console_printer`'s unbuffered
    writer is), says so at once; otherwise the message waits for :meth:`flush`, which the loops
    call (a buffered stream written from inside a handler that interrupted a write to it raises
    "reentrant call").
    """

    def __init__(self, progress: Callable[[str], None], in_process: bool) -> None:
        self.count = 0
        self.progress = progress
        self.in_process = in_process
        self.running = 0
        self._previous: Any = None
        self._notices: list[str] = []

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        self.flush()

    def _say(self, text: str) -> None:
        if getattr(self.progress, "signal_safe", False):
            self.progress(text)
        else:
            self._notices.append(text)

    def flush(self) -> None:
        """Print the messages the handler could not print itself."""
        while self._notices:
            self.progress(self._notices.pop(0))

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            self._say(
                f"stopping (Ctrl-C): no new runs start; {self.running} run(s) in progress "
                "finish and are cached. Ctrl-C again to abandon them."
            )
            return
        self._say("stopping now (second Ctrl-C): abandoning the runs in progress")
        if self.in_process:
            raise KeyboardInterrupt


def _terminate_workers(pool: cf.ProcessPoolExecutor) -> None:
    """Stop the pool's worker processes now (the second Ctrl-C)."""
    processes = list(getattr(pool, "_processes", {}).values())
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=5)
    pool.shutdown(wait=False, cancel_futures=True)


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

    ``workers`` processes run at a time; ``workers=0`` runs them in this process, one after
    another (no crash isolation).

    Raises:
        ComparisonInterrupted: Ctrl-C (see the module docstring); every finished run is cached.
    """
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
    with _CtrlC(progress, in_process=workers <= 0) as ctrl_c:
        progress(f"each run's output: {output_dir / LOG_DIR}/<run>.log")
        if workers <= 0:
            _run_here(task, runs, todo, output_dir, ctrl_c, results, progress)
        else:
            _run_in_workers(task, runs, todo, output_dir, workers, ctrl_c, results, progress)
    return [results[i] for i in range(len(runs))]


def _reporter(
    runs: list[RunSpec],
    todo: list[int],
    results: dict[int, dict[str, Any]],
    progress: Callable[[str], None],
) -> Callable[[int, dict[str, Any]], None]:
    """``report(i, result)``: store the result and print the progress line with the ETA."""
    start = time.perf_counter()
    done = 0
    total = len(runs)

    def report(i: int, result: dict[str, Any]) -> None:
        nonlocal done
        results[i] = {**result, "cached": False}
        done += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (len(todo) - done)
        loss = result.get("final_eval_loss")
        status = result.get("status")
        if status == "ok" and isinstance(loss, float):
            detail = f"eval loss {loss:.4f}"
        elif status == "error":
            detail = f"error: {result.get('error', '?')} (log: {result.get('log', '?')})"
        else:
            detail = str(status)
        progress(
            f"[{total - len(todo) + done}/{total}] {runs[i].label} (seed {runs[i].seed}): "
            f"{detail} in {result.get('wall_seconds', float('nan')):.0f}s, "
            f"ETA {_format_eta(eta)}"
        )

    return report


def _run_here(
    task: TaskSpec,
    runs: list[RunSpec],
    todo: list[int],
    output_dir: Path,
    ctrl_c: _CtrlC,
    results: dict[int, dict[str, Any]],
    progress: Callable[[str], None],
) -> None:
    """The runs in this process, one after another (``workers=0``: debugging, tests)."""
    report = _reporter(runs, todo, results, progress)
    pending = list(todo)
    try:
        while pending and not ctrl_c.count:
            i = pending.pop(0)
            ctrl_c.running = 1
            report(i, execute_run(task.to_dict(), runs[i].to_dict(), str(output_dir)))
            ctrl_c.running = 0
            ctrl_c.flush()
    except KeyboardInterrupt:  # the second Ctrl-C, raised by the handler
        raise ComparisonInterrupted(len(results), len(runs), abandoned=1) from None
    if ctrl_c.count:
        raise ComparisonInterrupted(len(results), len(runs), abandoned=0)


def _run_in_workers(
    task: TaskSpec,
    runs: list[RunSpec],
    todo: list[int],
    output_dir: Path,
    workers: int,
    ctrl_c: _CtrlC,
    results: dict[int, dict[str, Any]],
    progress: Callable[[str], None],
) -> None:
    """The runs in ``workers`` worker processes, at most ``workers`` in the pool at a time (so
    nothing is queued that a Ctrl-C would have to cancel); a dead worker costs its own runs and
    the pool is made again for the rest."""
    report = _reporter(runs, todo, results, progress)
    ctx = multiprocessing.get_context("spawn")

    def new_pool() -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_ignore_sigint
        )

    pending = list(todo)
    pool = new_pool()
    running: dict[cf.Future, int] = {}

    def refill() -> None:
        while pending and len(running) < workers and not ctrl_c.count:
            i = pending.pop(0)
            job = (execute_run, task.to_dict(), runs[i].to_dict(), str(output_dir))
            running[pool.submit(*job)] = i
        ctrl_c.running = len(running)

    try:
        refill()
        while running:
            finished, _ = cf.wait(running, timeout=POLL_SECONDS, return_when=cf.FIRST_COMPLETED)
            ctrl_c.flush()
            done: list[tuple[int, dict[str, Any]]] = []
            broken = False
            for fut in finished:
                i = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:  # the worker process itself died
                    broken = broken or isinstance(exc, cf.process.BrokenProcessPool)
                    result = {
                        "run": runs[i].to_dict(),
                        "label": runs[i].label,
                        "status": "error",
                        "error": f"worker died: {type(exc).__name__}: {exc}",
                    }
                done.append((i, result))
            if broken and not running:  # a crash costs the runs it killed, not the sweep
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
            if not broken:
                refill()  # keep the workers busy before printing
            for i, result in done:
                report(i, result)
            if broken and not running:
                refill()
            if ctrl_c.count >= 2:
                abandoned = len(running)
                _terminate_workers(pool)
                raise ComparisonInterrupted(len(results), len(runs), abandoned)
    finally:
        pool.shutdown(wait=not running, cancel_futures=True)
    if ctrl_c.count:
        raise ComparisonInterrupted(len(results), len(runs), abandoned=0)
