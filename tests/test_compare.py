"""hf-tuningfree compare on a tiny task: outputs, their agreement, the verdict, caching, plots."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest

from hf_tuningfree.compare import build_runs, log_grid
from hf_tuningfree.compare import runner as runner_module
from hf_tuningfree.compare.report import aggregate, verdict, write_outputs
from hf_tuningfree.compare.runner import run_comparison
from hf_tuningfree.compare.spec import STOCK_LR, RunSpec, TaskSpec

ADAMW_1E3 = ("adamw_torch", 1e-3, 0, "adamw-grid")


def tiny_task(steps: int = 6) -> TaskSpec:
    return TaskSpec(
        kind="offline-gpt2", model="tiny", data="offline:pydoc", max_steps=steps, batch_size=4,
        block_size=64, eval_every=3, logging_every=1, mc_questions_per_subject=2,
        options={"n_embd": 16, "n_layer": 1, "n_head": 2, "vocab_size": 300, "mc_train": 10,
                 "max_eval_blocks": 4},
    )  # fmt: skip


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_log_grid_is_log_spaced_and_rounded():
    assert log_grid(1e-4, 1e-1, 7) == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1]
    with pytest.raises(ValueError, match="Invalid grid"):
        log_grid(1e-1, 1e-4, 3)


def test_build_runs_adds_the_stock_default_once():
    runs = build_runs(["adopt"], [1e-3, 1e-2], [0, 1])
    assert [(r.optimizer, r.lr, r.role) for r in runs if r.seed == 0] == [
        ("adopt", None, "tuning-free"),
        ("adamw_torch", 1e-3, "adamw-grid"),
        ("adamw_torch", 1e-2, "adamw-grid"),
        ("adamw_torch", STOCK_LR, "adamw-default"),
    ]
    assert len(build_runs(["adopt"], [STOCK_LR], [0])) == 2


def _fake(label_loss: dict[str, float], seeds=(0,)):
    """Results in the runner's format with chosen final losses (for verdict tests)."""
    out = []
    for seed in seeds:
        for (opt, lr, role), loss in label_loss.items():
            run = RunSpec(opt, lr, seed, role)
            out.append(
                {"run": run.to_dict(), "label": run.label, "status": "ok" if math.isfinite(loss)
                 else "diverged", "final_eval_loss": loss, "learning_rate": lr or 1.0}
            )  # fmt: skip
    return out


def test_verdict_names_the_winners_and_checks_the_goals():
    rows = aggregate(
        _fake(
            {
                ("dog", None, "tuning-free"): 3.02,
                ("adopt", None, "tuning-free"): 3.30,
                ("adamw_torch", 1e-3, "adamw-grid"): 3.00,
                ("adamw_torch", 1e-2, "adamw-grid"): float("inf"),
                ("adamw_torch", STOCK_LR, "adamw-default"): 4.0,
            }
        )
    )
    v = verdict(rows)
    assert v.best_tuning_free.optimizer == "dog"
    assert v.best_adamw.lr == 1e-3
    assert v.best_ratio == pytest.approx(3.02 / 3.0)
    assert v.every_ratio["adopt"] == pytest.approx(1.1)
    goals = list(v.goals.values())
    assert goals == [True, False, True]  # best <= 1.01x, not every <= 1.05x, stock clearly worse
    diverged = next(r for r in rows if r.lr == 1e-2)
    assert diverged.diverged == 1 and math.isinf(diverged.eval_loss)


def test_tiny_comparison_end_to_end_and_cached(tmp_path, monkeypatch):
    task = tiny_task()
    runs = build_runs(["adopt", "dog"], [1e-3, 3e-2], [0])
    out = tmp_path / "cmp"
    messages: list[str] = []
    results = run_comparison(task, runs, out, workers=0, progress=messages.append)
    assert [r["status"] for r in results] == ["ok"] * 5, [r.get("error") for r in results]
    assert any("[5/5]" in m and "ETA" in m for m in messages)
    # the untuned runs get the registry's recommendations, the AdamW runs their grid lr
    by_label = {r["label"]: r for r in results}
    assert (by_label["adopt"]["learning_rate"], by_label["adopt"]["lr_scheduler_type"]) == (
        1e-3, "linear")  # fmt: skip
    assert (by_label["dog"]["learning_rate"], by_label["dog"]["lr_scheduler_type"]) == (
        1.0, "constant")  # fmt: skip
    assert by_label["adamw lr=3e-02"]["learning_rate"] == 3e-2
    # every run's Trainer output went to its own log file, not the console
    for r in results:
        log = (out / "logs").glob(f"*-seed0-{r['key']}.log")
        assert "'loss':" in next(log).read_text()
    paths = write_outputs(results, task, out)

    # every file exists; the PNGs are real images of the expected size
    for key in ("json", "csv", "markdown", "summary"):
        assert paths[key].stat().st_size > 100
    for key in ("plot_lr_sweep", "plot_loss_curves", "plot_eval_curves", "plot_step_sizes"):
        assert png_size(paths[key]) == (800, 500)

    # the table, the CSV and the JSON say the same numbers
    data = json.loads(paths["json"].read_text())
    by_label = {r["label"]: r for r in data["rows"]}
    with paths["csv"].open() as fh:
        for row in csv.DictReader(fh):
            assert float(row["eval_loss"]) == pytest.approx(by_label[row["label"]]["eval_loss"])
    table = paths["markdown"].read_text()
    for label, row in by_label.items():
        line = next(x for x in table.splitlines() if x.startswith(f"| {label}"))
        assert f"{row['eval_loss']:.4f}" in line
    losses = {r["label"]: r["final_eval_loss"] for r in results}
    assert {r["label"]: r["eval_loss"] for r in data["rows"]} == losses

    # the summary names the right winners
    tf = {k: v for k, v in losses.items() if k in ("adopt", "dog")}
    grid = {k: v for k, v in losses.items() if k in ("adamw lr=1e-03", "adamw lr=3e-02")}
    best_tf, best_grid = min(tf, key=tf.get), min(grid, key=grid.get)
    summary = paths["summary"].read_text()
    assert f"Best tuning-free optimizer: {best_tf}, final eval loss {tf[best_tf]:.4f}" in summary
    assert f"lr={float(best_grid.split('=')[1]):.3g}" in summary
    assert "AdamW at the stock Trainer default lr=5e-05" in summary
    assert data["verdict"]["best_tuning_free"] == best_tf

    # a second invocation trains nothing
    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(runner_module, "execute_run", no_training)
    again = run_comparison(task, runs, out, workers=0, progress=messages.append)
    assert all(r["cached"] for r in again)
    assert [r["final_eval_loss"] for r in again] == [r["final_eval_loss"] for r in results]


def test_a_failing_run_is_recorded_not_fatal(tmp_path):
    """In a worker process (the default path): the error comes back as a result."""
    task = TaskSpec(**{**tiny_task().to_dict(), "kind": "no-such-task"})
    results = run_comparison(task, [RunSpec("adopt", None, 0, "tuning-free")], tmp_path, workers=1)
    assert results[0]["status"] == "error"
    assert "Unknown task kind 'no-such-task'" in results[0]["error"]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_run_whose_optimizer_source_changed_is_an_error_and_not_cached(tmp_path, monkeypatch):
    """A worker keeps the optimizer code it loaded first: a tuning-free run handed to it after
    hf_tuningfree/optim/ was edited, or edited while it trained, would store the old code's
    result under the edited code's key. Such a run is an error naming the cause (in its log too),
    nothing is cached, and AdamW runs (not keyed by the source) are unaffected."""
    from hf_tuningfree.compare import spec as spec_module
    from hf_tuningfree.compare import train as train_module
    from hf_tuningfree.compare.runner import OPTIM_SOURCE_CHANGED, cache_path

    task = tiny_task(steps=2)
    tuning_free, adamw = RunSpec("adopt", None, 0, "tuning-free"), RunSpec(*ADAMW_1E3)

    # edited after this process loaded the package
    monkeypatch.setattr(runner_module, "_loaded_optim_source", "the-source-loaded-first")
    out = tmp_path / "after"
    results = run_comparison(task, [tuning_free, adamw], out, workers=0)
    assert [r["status"] for r in results] == ["error", "ok"]
    assert results[0]["error"] == f"RuntimeError: {OPTIM_SOURCE_CHANGED}"
    assert OPTIM_SOURCE_CHANGED in Path(results[0]["log"]).read_text()
    assert not cache_path(out, task, tuning_free).exists()
    assert cache_path(out, task, adamw).exists()

    # edited while the run trained
    monkeypatch.setattr(runner_module, "_loaded_optim_source", spec_module.optim_source_hash())
    real = train_module.train_and_score

    def train_then_edit(*args, **kwargs):
        result = real(*args, **kwargs)
        monkeypatch.setattr(spec_module, "optim_source_hash", lambda: "edited-during-the-run")
        return result

    monkeypatch.setattr(train_module, "train_and_score", train_then_edit)
    out = tmp_path / "during"
    (result,) = run_comparison(task, [tuning_free], out, workers=0)
    assert (result["status"], result["error"]) == ("error", OPTIM_SOURCE_CHANGED)
    assert result["final_eval_loss"] > 0  # it did train
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())


def test_effective_step_size_is_the_key_the_registry_declares():
    from hf_tuningfree.compare.report import curves

    def result(optimizer, **stats):
        history = [{"step": 5.0, "loss": 2.0, "learning_rate": 0.5, **stats}]
        return {"run": {"optimizer": optimizer}, "log_history": history}

    stats = {"optim/d_lr": 3e-4, "optim/eta": 0.2, "optim/eta_median": 0.3}
    stats["optim/hyper/level0/lr"] = 0.01
    assert curves(result("dadapt_adam", **stats))["step_size"] == [(5.0, 3e-4)]
    assert curves(result("prodigy:d_coef=2.0", **stats))["step_size"] == [(5.0, 3e-4)]
    assert curves(result("dog", **stats))["step_size"] == [(5.0, 0.2)]
    assert curves(result("ldog", **stats))["step_size"] == [(5.0, 0.3)]
    assert curves(result("hyper_adam", **stats))["step_size"] == [(5.0, 0.01)]
    # AdamW / ADOPT (no key declared): the scheduled lr, whatever else the log holds
    assert curves(result("adopt", **stats))["step_size"] == [(5.0, 0.5)]
    assert curves(result("adamw_torch", **stats))["step_size"] == [(5.0, 0.5)]
    assert curves(result("dog"))["step_size"] == []  # declared but not logged: no curve
    assert curves(result("dog"))["train"] == [(5.0, 2.0)]
