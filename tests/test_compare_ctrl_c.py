"""Ctrl-C stops ``hf-tuningfree compare`` as a user expects (issue 18.1): a real SIGINT sent to
the whole process group, as a terminal sends it, to a real command with worker processes.

The runs only sleep (tests/ctrl_c_driver.py replaces the training): what is under test is the
dispatching, the signal handling, the workers and the cache, not the training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
COMMAND = ["--optimizers", "adopt", "dog", "--adamw-lrs", "1e-3", "1e-2", "--no-stock-adamw",
           "--no-plots", "--steps", "3"]  # fmt: skip


def _start(out: Path, workers: int, sleep: float, slow: str = "") -> subprocess.Popen:
    env = dict(os.environ, CTRL_C_SLEEP=str(sleep), CTRL_C_SLOW_LABEL=slow, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    argv = [sys.executable, str(TESTS / "ctrl_c_driver.py"), *COMMAND,
            "--workers", str(workers), "--output-dir", str(out)]  # fmt: skip
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,  # its own process group: signal it as a terminal would
    )  # fmt: skip


def _interrupt_after(
    proc: subprocess.Popen, marker: str, times: int, wait: float = 0.0
) -> tuple[str, float]:
    """Read the output until a line starts with ``marker``, wait ``wait`` seconds, send SIGINT
    ``times`` times to the process group, and return all output and the seconds from the last
    SIGINT to the exit."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker):
            break
    else:
        raise AssertionError(f"{marker!r} never printed:\n{''.join(lines)}")
    time.sleep(wait)
    for i in range(times):
        os.killpg(proc.pid, signal.SIGINT)
        if i + 1 < times:
            time.sleep(0.2)
    sent = time.perf_counter()
    rest = proc.stdout.read()
    proc.wait(timeout=60)
    return "".join(lines) + rest, time.perf_counter() - sent


def _cached(out: Path) -> int:
    return sum(json.loads(p.read_text())["status"] == "ok" for p in (out / "runs").glob("*.json"))


def test_ctrl_c_stops_dispatching_keeps_the_cache_and_a_second_one_stops_at_once(tmp_path):
    out = tmp_path / "cmp"
    # 1. One Ctrl-C after the first of 4 runs (one worker): the run in progress finishes and is
    #    cached, nothing else starts, exit status 130, a message and no traceback.
    proc = _start(out, workers=1, sleep=1.0)
    text, _ = _interrupt_after(proc, "[1/4]", times=1)
    assert proc.returncode == 130, text
    assert (
        "stopping (Ctrl-C): no new runs start; 1 run(s) in progress finish and are cached" in text
    )
    assert "[2/4] dog (seed 0)" in text and "[3/4]" not in text
    assert "interrupted: 2 of 4 runs done and cached; run the same command again" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert _cached(out) == 2

    # 2. The same command again trains only the two unfinished runs; two Ctrl-C while the last
    #    one sleeps for a minute: it is abandoned at once, its worker terminated.
    proc = _start(out, workers=1, sleep=0.5, slow="adamw lr=1e-02")
    text, seconds = _interrupt_after(proc, "[3/4]", times=2)
    assert proc.returncode == 130, text
    assert "reusing 2 cached run(s)" in text and "[3/4] adamw lr=1e-03 (seed 0)" in text
    assert "stopping now (second Ctrl-C): abandoning the runs in progress" in text
    assert "interrupted: 3 of 4 runs done and cached, 1 in progress abandoned" in text
    assert "Traceback" not in text
    assert seconds < 15, f"the second Ctrl-C took {seconds:.1f}s to stop the command"
    assert _cached(out) == 3 and not list((out / "runs").glob("*.tmp"))

    # 3. In this process (--workers 0): the same two Ctrl-C stop a run in progress.
    proc = _start(out, workers=0, sleep=0.5, slow="adamw lr=1e-02")
    # (nothing is printed when the run starts: give it a second to be in progress)
    text, seconds = _interrupt_after(proc, "each run's output", times=2, wait=1.0)
    assert proc.returncode == 130, text
    assert "interrupted: 3 of 4 runs done and cached, 1 in progress abandoned" in text
    assert "Traceback" not in text and seconds < 15

    # 4. And the cache is valid: the last run is the only one trained, the report is written.
    proc = _start(out, workers=0, sleep=0.0)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, text
    assert "reusing 3 cached run(s)" in text and "[4/4] adamw lr=1e-02 (seed 0)" in text
    assert (out / "results.md").exists() and _cached(out) == 4
