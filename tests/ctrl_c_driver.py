"""``hf-tuningfree compare`` whose runs only sleep, for tests/test_compare_ctrl_c.py.

Everything else is the real command: the parser, the runner's worker pool, its SIGINT handling,
the cache and the report. A run sleeps ``$CTRL_C_SLEEP`` seconds in the worker (the run labelled
``$CTRL_C_SLOW_LABEL``: a minute), then writes its result to the cache as a real run does.

    python tests/ctrl_c_driver.py COMPARE-OPTIONS...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from hf_tuningfree.compare import cli, runner
from hf_tuningfree.compare.spec import RunSpec, TaskSpec


def sleepy_run(task_dict: dict[str, Any], run_dict: dict[str, Any], output_dir: str) -> dict:
    task, run = TaskSpec.from_dict(task_dict), RunSpec.from_dict(run_dict)
    started = time.perf_counter()
    slow = run.label == os.environ.get("CTRL_C_SLOW_LABEL")
    time.sleep(60.0 if slow else float(os.environ.get("CTRL_C_SLEEP", "1")))
    result = {
        "run": run.to_dict(),
        "label": run.label,
        "key": run.key(task),
        "status": "ok",
        "final_eval_loss": 3.0 + (run.lr or 0.0),
        "learning_rate": run.lr or 1.0,
        "wall_seconds": time.perf_counter() - started,
        "log_history": [],
    }
    runner._write_atomic(runner.cache_path(Path(output_dir), task, run), result)
    return result


if __name__ == "__main__":
    runner.execute_run = sleepy_run  # the workers unpickle __main__.sleepy_run from this file
    sys.exit(cli.main(sys.argv[1:], exiting=True))
