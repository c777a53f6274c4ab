"""What ``hf-tuningfree compare`` reports when things are not simple (issue 18.10): failed runs,
several seeds, nothing to compare, the best AdamW at the edge of the grid; and the command line
rejecting bad values at once, sizing the fixed task kinds, and naming a missing data file."""

from __future__ import annotations

import math
import time

import pytest

from hf_tuningfree.compare import cli
from hf_tuningfree.compare.report import aggregate, markdown_table, summary_text, verdict
from hf_tuningfree.compare.results import grid_edge
from hf_tuningfree.compare.spec import STOCK_LR, RunSpec
from hf_tuningfree.compare.tasks import default_task


def _results(spec: dict, seeds=(0,)) -> list[dict]:
    """Results in the runner's format: ``{(optimizer, lr, role): loss | "error" | inf}``."""
    out = []
    for seed in seeds:
        for (opt, lr, role), loss in spec.items():
            run = RunSpec(opt, lr, seed, role)
            result = {"run": run.to_dict(), "label": run.label, "learning_rate": lr or 1.0}
            if loss == "error":
                result.update(status="error", error="ValueError: Invalid learning rate: -0.001")
            elif math.isfinite(loss):
                result.update(status="ok", final_eval_loss=loss + 0.01 * seed)
            else:
                result.update(status="diverged", final_eval_loss=loss)
            out.append(result)
    return out


TASK = default_task("offline-gpt2", 10)
GRID = {("adamw_torch", 1e-3, "adamw-grid"): 3.2, ("adamw_torch", 1e-2, "adamw-grid"): 3.0,
        ("adamw_torch", 1e-1, "adamw-grid"): 3.1}  # fmt: skip


def _report(spec: dict, seeds=(0,)) -> tuple[str, str, object]:
    rows = aggregate(_results(spec, seeds))
    v = verdict(rows)
    return markdown_table(rows, v), summary_text(rows, v, TASK), v


def test_a_failed_run_reads_error_not_diverged_and_nothing_reads_n_a():
    spec = {("adopt", None, "tuning-free"): 3.3, ("dog", None, "tuning-free"): "error",
            ("prodigy", None, "tuning-free"): math.inf, **GRID,
            ("adamw_torch", 3e-1, "adamw-grid"): "error",
            ("adamw_torch", STOCK_LR, "adamw-default"): 4.0}  # fmt: skip
    table, summary, v = _report(spec)
    line = {row.split(" | ")[0][2:]: row for row in table.splitlines()[2:]}
    assert "| error |" in line["dog"] and "| diverged |" in line["prodigy"]
    assert "| error |" in line["adamw lr=3e-01"]
    assert "n/a" not in table + summary and "n/ax" not in summary
    assert "Without a result: dog (error), prodigy (diverged)" in summary
    assert "AdamW runs that failed: adamw lr=3e-01." in summary
    assert "Tuning-free optimizers above 1.05x the best AdamW: adopt (1.100x)." in summary
    assert v.goals["every tuning-free <= 1.05x best AdamW"] is False  # adopt and prodigy fail it
    assert "AdamW at the stock Trainer default lr=5e-05: final eval loss 4.0000 (1.333x" in summary


def test_seeds_are_counted_as_seeds():
    spec = {("adopt", None, "tuning-free"): 3.05, **GRID}
    _, summary, v = _report(spec, seeds=(0, 1))
    assert "with no tuning (one run per seed, 2 seeds)." in summary
    assert "found with 6 runs over the grid." in summary
    assert v.seeds == 2


def test_goals_without_anything_to_compare_are_not_measured():
    # --no-stock-adamw: no AdamW at the stock lr; an optimizer that errored: not every measured
    spec = {("adopt", None, "tuning-free"): 3.01, ("dog", None, "tuning-free"): "error", **GRID}
    _, summary, v = _report(spec)
    assert list(v.goals.values()) == [True, None, None]
    assert summary.endswith(
        "Goals: best tuning-free <= 1.01x best AdamW: met; every tuning-free <= 1.05x best AdamW: "
        "not measured; AdamW at the stock lr clearly worse (> 1.05x best AdamW): not measured"
    )
    # no AdamW at all: nothing is judged
    _, summary, v = _report({("adopt", None, "tuning-free"): 3.0})
    assert list(v.goals.values()) == [None, None, None]
    assert "NOT met" not in summary


def test_the_best_adamw_at_the_edge_of_the_grid_is_flagged():
    inside = aggregate(_results(GRID))
    assert grid_edge(inside) is None
    high = aggregate(_results({**GRID, ("adamw_torch", 1e-1, "adamw-grid"): 2.9}))
    low = aggregate(_results({**GRID, ("adamw_torch", 1e-3, "adamw-grid"): 2.9}))
    assert (grid_edge(high), grid_edge(low)) == ("high", "low")
    summary = summary_text(high, verdict(high), TASK)
    assert (
        "WARNING: the best AdamW lr (0.1) is the highest point of the grid: a learning rate "
        "beyond it may do better, so the tuned baseline may be stronger than this grid shows. "
        "Extend the grid (--grid-high, or --extend-grid to do it automatically)." in summary
    )
    assert "lowest point of the grid" in summary_text(low, verdict(low), TASK)


def test_extend_grid_adds_the_next_learning_rate_beyond_the_edge():
    runs = [RunSpec("adamw_torch", lr, 0, "adamw-grid") for lr in (1e-3, 1e-2, 1e-1)]
    edge, extra = cli._grid_extension(
        _results({**GRID, ("adamw_torch", 1e-1, "adamw-grid"): 2.9}), runs, [0, 1]
    )
    assert edge == "high"
    assert [(r.lr, r.seed, r.role) for r in extra] == [
        (1.0, 0, "adamw-grid"),
        (1.0, 1, "adamw-grid"),
    ]
    assert cli._grid_extension(_results(GRID), runs, [0]) == (None, [])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adamw-lrs=-1e-3"], "argument --adamw-lrs: must be a positive number, got -1e-3"),
        (["--grid-low", "0"], "argument --grid-low: must be a positive number, got 0"),
        (["--grid-points", "0"], "argument --grid-points: must be a positive integer, got 0"),
        (["--steps", "two"], "argument --steps: must be a positive integer, got 'two'"),
        (["--workers=-1"], "argument --workers: must be an integer >= 0, got -1"),
    ],
)
def test_bad_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_inconsistent_values_fail_before_any_run(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "x"), "--no-plots"]
    for argv, message in [
        (["--seeds", "0", "0"], "--seeds repeats a seed: [0, 0]"),
        (
            ["--grid-low", "1e-2", "--grid-high", "1e-3"],
            "--grid-low 0.01 is above --grid-high 0.001",
        ),
        (
            ["--optimizers", "adpot"],
            "--optimizers: unknown optimizer 'adpot' in 'adpot'; valid: adopt, ",
        ),
    ]:
        with pytest.raises(SystemExit) as info:
            cli.main([*argv, *out])
        assert str(info.value).startswith("hf-tuningfree compare: error: ")
        assert message in str(info.value)
    assert not (tmp_path / "x").exists()


def test_a_missing_data_file_is_named_not_looked_up_on_the_hub(tmp_path):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        cli.main(["--data", "nope.txt", "--output-dir", str(tmp_path / "x")])
    assert str(info.value).startswith(
        "hf-tuningfree compare: error: no such file or directory: 'nope.txt' (a data file ends in"
    )
    assert "hub" not in str(info.value).split("(")[0]
    assert time.perf_counter() - start < 10


def _task(argv: list[str]):
    return cli.task_from_args(cli.build_parser().parse_args(argv))


def test_the_fixed_task_kinds_can_be_shrunk_for_a_quick_check():
    default = default_task("smollm2-lora")
    small = _task(["--task", "smollm2-lora", "--steps", "4", "--batch-size", "2", "--mc-shots",
                   "1", "--max-eval-samples", "12", "--mc-max-questions", "10"])  # fmt: skip
    assert (small.max_steps, small.batch_size, small.mc_shots) == (4, 2, 1)
    assert small.options["mc_validation"] == 2  # 12 examples over the 6 subjects
    assert small.mc_questions_per_subject == 2  # 10 questions, rounded up to 12
    assert (default.max_steps, default.mc_questions_per_subject) == (30, 16)
    gpt2 = _task(["--task", "offline-gpt2", "--max-eval-samples", "5"])
    assert gpt2.options["max_eval_blocks"] == 5
    # nothing given: the task (and so every cache key) is exactly the default one
    assert _task(["--task", "smollm2-lora"]) == default
    assert _task([]) == default_task("offline-gpt2")
    # the model and data options still describe a custom task only
    with pytest.raises(SystemExit, match="--model describe a custom task"):
        _task(["--task", "smollm2-lora", "--model", "offline:llama-tiny"])
