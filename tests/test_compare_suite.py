"""The compare suite: optimizer variants, cache keys that follow the optimizer source, the
pretrained GPT-2 asset, the corpus LM tasks, and a tiny ``--task a b`` run whose cross-task table
equals the per-task files."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from hf_tuningfree import compare
from hf_tuningfree.compare import spec as spec_module
from hf_tuningfree.compare import suite as suite_module
from hf_tuningfree.compare.spec import RunSpec, TaskSpec, parse_optimizer, parse_optimizers
from hf_tuningfree.compare.suite import SPIKE_LIMIT, cross_task_table, final_over_best
from hf_tuningfree.compare.tasks import build_corpus_lm, corpus_lm_task, default_task
from hf_tuningfree.data import assets
from hf_tuningfree.data import pretrained as pretrained_module
from hf_tuningfree.data.pretrained import PretrainRecipe, pretrain_key, pretrained_gpt2_dir

#: A pretraining recipe of a few seconds: pydoc, a 300-token BPE, one layer of width 16.
TINY_RECIPE = PretrainRecipe(corpus="pydoc", vocab_size=300, n_embd=16, n_layer=1, n_head=2,
                             n_positions=64, block_size=32, batch_size=2, steps=6,
                             warmup_steps=2, eval_blocks=2)  # fmt: skip


# --- optimizer variants -------------------------------------------------------------------------


def test_variants_are_typed_by_the_registry_and_spelled_one_way():
    variant = parse_optimizer("prodigy:d_coef=2,beta2=0.99")
    assert variant.name == "prodigy"
    assert variant.overrides == (("beta2", 0.99), ("d_coef", 2.0))
    assert isinstance(variant.kwargs()["d_coef"], float)
    assert variant.text == "prodigy:beta2=0.99,d_coef=2.0"
    assert variant.optim_args == "beta2=0.99,d_coef=2.0"
    # another spelling of the same settings: the same canonical text
    assert parse_optimizer(" prodigy:beta2=0.99, d_coef=2.0").text == variant.text
    assert parse_optimizer(variant.text) == variant
    assert parse_optimizer("dog").text == "dog" and parse_optimizer("dog").overrides == ()
    flags = parse_optimizer("dadapt_adam:use_bias_correction=false,d0=1e-4")
    assert flags.kwargs() == {"use_bias_correction": False, "d0": 1e-4}
    assert parse_optimizers(["adopt", "adopt:lr=3e-4"]) == ["adopt", "adopt:lr=0.0003"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prodigy:dcoef=2", "Unknown hyperparameter 'dcoef' for optimizer 'prodigy'; valid: "),
        ("prodigy:d_coef=abc", "'d_coef' of optimizer 'prodigy' must be float, got 'abc'"),
        ("prodigy:d_coef", "entry 'd_coef' is not key=value"),
        ("prodigy:", "nothing after ':'"),
        ("prodigy:d_coef=-1", "Invalid d_coef: -1.0; allowed: a finite number > 0"),
        ("prodigy:betas=0.9", "set one entry of a tuple with beta1=..., beta2=..."),
        ("prodigy:d_coef=1,d_coef=2", "'d_coef' is given twice"),
        ("nope:x=1", "unknown optimizer 'nope' in 'nope:x=1'; valid: adopt, "),
    ],
)
def test_bad_variants_fail_at_parse_time_with_one_line(text, message):
    with pytest.raises(ValueError) as error:
        parse_optimizer(text)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_command_line_refuses_a_bad_variant_before_any_run(tmp_path):
    with pytest.raises(SystemExit) as error:
        compare.main(["--optimizers", "prodigy:dcoef=2", "--output-dir", str(tmp_path / "x")])
    assert str(error.value).startswith(
        "hf-tuningfree compare: error: --optimizers: 'prodigy:dcoef=2': Unknown hyperparameter"
    )
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match="'adopt' is listed twice"):
        compare.main(["--optimizers", "adopt", "adopt", "--output-dir", str(tmp_path / "x")])


def test_a_variant_is_its_own_run_label_and_key():
    task = default_task("offline-gpt2")
    plain = RunSpec("prodigy", None, 0, "tuning-free")
    variant = RunSpec(parse_optimizer("prodigy:d_coef=2").text, None, 0, "tuning-free")
    assert (plain.label, variant.label) == ("prodigy", "prodigy:d_coef=2.0")
    assert variant.variant.kwargs() == {"d_coef": 2.0}
    assert plain.key(task) != variant.key(task)


# --- cache keys ---------------------------------------------------------------------------------


def test_tuning_free_keys_follow_the_optimizer_source_and_adamw_keys_do_not(monkeypatch):
    task = default_task("offline-gpt2")
    tuning_free = RunSpec("prodigy", None, 0, "tuning-free")
    grid = RunSpec("adamw_torch", 1e-3, 0, "adamw-grid")
    stock = RunSpec("adamw_torch", 5e-5, 0, "adamw-default")
    before = [r.key(task) for r in (tuning_free, grid, stock)]
    monkeypatch.setattr(spec_module, "optim_source_hash", lambda: "an-edited-optimizer")
    after = [r.key(task) for r in (tuning_free, grid, stock)]
    assert after[0] != before[0]
    assert after[1:] == before[1:]
    # but a task change re-runs AdamW too
    other = dataclasses.replace(task, max_steps=task.max_steps + 1)
    assert grid.key(other) != grid.key(task) and stock.key(other) != stock.key(task)


def test_the_optimizer_source_hash_covers_python_and_c_files_only(tmp_path, monkeypatch):
    package = tmp_path / "optim"
    shutil.copytree(
        spec_module.OPTIM_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    monkeypatch.setattr(spec_module, "OPTIM_PACKAGE", package)
    first = spec_module.optim_source_hash()
    assert first == spec_module.optim_source_hash()
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "dog.cpython-311.pyc").write_bytes(b"compiled")
    (package / "kernels_abc.so").write_bytes(b"\x7fELF")
    assert spec_module.optim_source_hash() == first  # caches and build products do not count
    (package / "kernels.c").write_text("double f(double x) { return x; }\n")
    with_c = spec_module.optim_source_hash()
    assert with_c != first  # a C source does
    (package / "kernels.c").write_text("double f(double x) { return 2 * x; }\n")
    assert spec_module.optim_source_hash() not in (first, with_c)
    dog = package / "dog" / "core.py"  # a file of a subpackage counts too
    dog.write_text(dog.read_text() + "\n# edited\n")
    assert spec_module.optim_source_hash() not in (first, with_c)


# --- the pretrained GPT-2 asset -----------------------------------------------------------------


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_pretraining_is_deterministic_and_cached_under_its_recipe(tmp_path, monkeypatch):
    builds = {}
    for name in ("first", "second"):
        monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / name))
        builds[name] = pretrained_gpt2_dir(TINY_RECIPE)
    first, second = _weights(builds["first"]), _weights(builds["second"])
    assert first.keys() == second.keys() and len(first) > 5
    assert all(torch.equal(first[k], second[k]) for k in first)  # bit for bit
    log = json.loads((builds["first"] / pretrained_module.LOG_FILE).read_text())
    assert log["recipe"] == TINY_RECIPE.to_dict()
    assert [step for step, _ in log["train_loss"]] == [0, 5]
    assert math.isfinite(log["validation_loss"]) and log["validation_loss"] < math.log(300) + 1
    marker = assets.read_marker(builds["first"])
    assert marker["source"] == json.loads(
        json.dumps(pretrained_module.pretrain_source(TINY_RECIPE))
    )

    # the same recipe again: reused, not rebuilt
    monkeypatch.setattr(pretrained_module, "pretrain", lambda *a: pytest.fail("rebuilt"))
    assert pretrained_gpt2_dir(TINY_RECIPE) == builds["second"]

    # another seed: other weights
    monkeypatch.undo()
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "first"))
    reseeded = _weights(pretrained_gpt2_dir(dataclasses.replace(TINY_RECIPE, seed=1)))
    assert not torch.equal(reseeded["transformer.wte.weight"], first["transformer.wte.weight"])


def test_the_pretraining_key_changes_with_every_part_of_the_recipe(monkeypatch):
    base = pretrain_key(TINY_RECIPE)
    assert pretrain_key(PretrainRecipe(**TINY_RECIPE.to_dict())) == base
    changed = {
        "corpus": "kjv", "vocab_size": 301, "n_embd": 32, "n_layer": 2, "n_head": 4,
        "n_positions": 65, "block_size": 16, "batch_size": 3, "steps": 7, "lr": 1e-3,
        "warmup_steps": 3, "min_lr_ratio": 0.2, "weight_decay": 0.0, "max_grad_norm": 0.5,
        "eval_blocks": 3, "seed": 1,
    }  # fmt: skip
    assert set(changed) == {f.name for f in dataclasses.fields(PretrainRecipe)}
    keys = {pretrain_key(dataclasses.replace(TINY_RECIPE, **{k: v})) for k, v in changed.items()}
    assert len(keys) == len(changed) and base not in keys
    # the code, the library versions and the corpus' installed version count too
    monkeypatch.setattr(pretrained_module, "_file_digest", lambda path: "edited")
    assert pretrain_key(TINY_RECIPE) != base
    monkeypatch.undo()
    monkeypatch.setattr(pretrained_module, "_version", lambda name: "9.9")
    assert pretrain_key(TINY_RECIPE) != base
    with pytest.raises(ValueError, match="n_embd \\(20\\) must be a multiple of n_head"):
        dataclasses.replace(TINY_RECIPE, n_embd=20, n_head=3)
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        pretrain_key(dataclasses.replace(TINY_RECIPE, corpus="nope"))


# --- the corpus LM tasks ------------------------------------------------------------------------


def tiny_corpus_task(kind: str, steps: int = 4) -> TaskSpec:
    """A suite kind shrunk to seconds: the tiny recipe, pydoc, blocks of 32, a few steps."""
    task = corpus_lm_task(kind)
    options = dict(task.options, max_eval_blocks=4)
    if "pretrained" in options:
        options.update(pretrained=TINY_RECIPE.to_dict(), pretrained_key=pretrain_key(TINY_RECIPE))
    else:
        options.update(tokenizer="pydoc", vocab_size=300, n_embd=16, n_layer=1, n_head=2)
    sizes = {"max_steps": steps, "batch_size": 2, "block_size": 32, "eval_every": 2}
    return dataclasses.replace(
        task, data="offline:pydoc", logging_every=1, options=options, **sizes
    )


def test_suite_task_specs_carry_what_decides_their_results():
    long, ft, lora = (corpus_lm_task(k) for k in ("gpt2-long", "gpt2-shift-ft", "gpt2-shift-lora"))
    assert (long.max_steps, long.block_size, long.eval_every) == (1000, 64, 100)
    assert (ft.max_steps, ft.block_size, ft.eval_every, ft.data) == (200, 128, 20, "offline:kjv")
    assert (lora.max_steps, lora.eval_every, lora.data) == (300, 30, "offline:pydoc")
    short = corpus_lm_task("gpt2-shift-lora-short")
    assert (short.max_steps, short.eval_every) == (50, 5)
    assert short.options == lora.options and short.kind != lora.kind
    assert ft.options["pretrained_key"] == pretrain_key(PretrainRecipe())
    assert lora.options["lora"] == {"r": 8, "alpha": 16, "target_modules": ["c_attn", "c_proj"]}
    assert ft.options["data_source"]["corpus"] == "kjv" and "lora" not in ft.options
    assert all(t.mc_data is None for t in (long, ft, lora))
    assert default_task("gpt2-long", 50).eval_every == 5
    # a new pretraining recipe changes every run's key, AdamW's included
    grid = RunSpec("adamw_torch", 1e-3, 0, "adamw-grid")
    moved = dataclasses.replace(ft, options={**ft.options, "pretrained_key": "another"})
    assert grid.key(moved) != grid.key(ft)


def test_lora_starts_at_the_pretrained_model_and_full_fine_tuning_loads_it(tmp_path):
    from transformers import GPT2LMHeadModel

    lora_task, ft_task = tiny_corpus_task("gpt2-shift-lora"), tiny_corpus_task("gpt2-shift-ft")
    lora_built = build_corpus_lm(lora_task, tmp_path)
    base = GPT2LMHeadModel.from_pretrained(str(pretrained_gpt2_dir(TINY_RECIPE))).eval()
    assert len(lora_built.train_dataset) == 4 * 2 and len(lora_built.eval_dataset) == 4
    assert all(len(ids) == 32 for ids in lora_built.train_dataset["input_ids"])
    model = lora_built.make_model(0).eval()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_b = [p for n, p in trainable.items() if "lora_B" in n]
    # c_attn, attn.c_proj and mlp.c_proj in each layer; B starts at zero
    assert len(lora_b) == 3 * TINY_RECIPE.n_layer and all(not p.any() for p in lora_b)
    ids = torch.tensor([lora_built.train_dataset["input_ids"][0]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    name_a = next(n for n in trainable if "lora_A" in n)
    other_seed = dict(lora_built.make_model(1).named_parameters())
    assert not torch.equal(other_seed[name_a], trainable[name_a])

    full = build_corpus_lm(ft_task, tmp_path).make_model(0)
    assert all(p.requires_grad for p in full.parameters())
    assert all(torch.equal(p, base.state_dict()[n]) for n, p in full.state_dict().items())


# --- the cross-task table -----------------------------------------------------------------------


def _result(optimizer, lr, role, seed, evals, final, status="ok"):
    run = RunSpec(optimizer, lr, seed, role)
    history = [{"step": float(i), "eval_loss": e} for i, e in enumerate(evals)]
    return {"run": run.to_dict(), "label": run.label, "status": status,
            "final_eval_loss": final, "log_history": history}  # fmt: skip


def test_final_over_best_is_the_spike_criterion():
    assert final_over_best(_result("dog", None, "tuning-free", 0, [5.0, 4.0, 4.5], 4.2)) == 1.05
    assert final_over_best(_result("dog", None, "tuning-free", 0, [5.0, 4.5], 4.2)) == 1.0
    diverged = _result("dog", None, "tuning-free", 0, [5.0], float("nan"), "diverged")
    assert math.isinf(final_over_best(diverged))
    assert math.isnan(final_over_best({"status": "error", "run": {}}))


def test_cross_task_table_ratios_means_worsts_and_spikes():
    specs = {k: dataclasses.replace(default_task("offline-gpt2"), kind=k) for k in ("a", "b")}
    per_task = {
        "a": [_result("dog", None, "tuning-free", s, [3.0], 3.3) for s in (0, 1)]
        + [_result("adamw_torch", 1e-3, "adamw-grid", s, [3.2], 3.0) for s in (0, 1)]
        + [_result("adamw_torch", 1e-2, "adamw-grid", s, [3.5], 3.6) for s in (0, 1)],
        "b": [_result("dog", None, "tuning-free", 0, [2.0], 2.0),
              _result("dog", None, "tuning-free", 1, [2.0], 2.2)]
        + [_result("adamw_torch", 1e-3, "adamw-grid", s, [2.6], 2.5) for s in (0, 1)]
        + [_result("adamw_torch", 1e-2, "adamw-grid", s, [2.2], 2.0) for s in (0, 1)],
    }  # fmt: skip
    table = cross_task_table(per_task, specs)
    rows = {r["label"]: r for r in table["rows"]}
    assert [r["label"] for r in table["rows"]] == [
        "dog", "adamw (best of grid)", "adamw lr=1e-03", "adamw lr=1e-02"
    ]  # fmt: skip
    dog = rows["dog"]
    assert dog["ratio"] == {"a": pytest.approx(1.1), "b": pytest.approx(2.1 / 2.0)}
    assert dog["mean"] == pytest.approx((1.1 + 1.05) / 2) and dog["worst"] == pytest.approx(1.1)
    assert dog["final_over_best"] == {"a": pytest.approx(1.1), "b": pytest.approx(1.1)}
    assert (dog["runs"], dog["runs_over_limit"]) == (4, 3)  # b, seed 0 ends at its best
    best = rows["adamw (best of grid)"]
    assert best["ratio"] == {"a": 1.0, "b": 1.0} and best["runs_over_limit"] == 0
    assert (
        table["tasks"]["a"]["best_adamw_lr"] == 1e-3
        and table["tasks"]["b"]["best_adamw_lr"] == 1e-2
    )
    assert table["tasks"]["a"]["best_at_grid_edge"] and table["spike_limit"] == SPIKE_LIMIT


# --- the command line: a tiny multi-task run ----------------------------------------------------


def test_multi_task_options_are_refused_with_one_line(tmp_path):
    out = ["--output-dir", str(tmp_path / "x")]
    for argv, message in [
        (["--suite", "--task", "gpt2-long"], "--suite runs every suite task"),
        (["--task", "gpt2-long", "gpt2-long"], "--task names gpt2-long twice"),
        (["--task", "gpt2-long", "custom"], "unknown task kind(s) custom for a multi-task run"),
        (["--suite", "--steps", "5"], "--steps describe one task"),
        (["--task", "gpt2-long", "offline-gpt2", "--grid-low", "1e-3"], "--grid-low describe"),
        (["--suite", "--data", "offline:kjv"], "--data describe one task"),
        (["--suite", "--optimizers", "dog:x=1"], "--optimizers: 'dog:x=1': Unknown"),
    ]:
        with pytest.raises(SystemExit) as error:
            compare.main([*argv, *out])
        assert message in str(error.value) and "\n" not in str(error.value), argv
    assert not (tmp_path / "x").exists()


def test_tiny_suite_writes_a_cross_task_table_equal_to_the_per_task_files(tmp_path, monkeypatch):
    """Two tiny tasks (from scratch; LoRA on the tiny pretrained model), two optimizers (one a
    variant), two AdamW learning rates, two seeds, through ``--task a b``."""
    scratch = TaskSpec(kind="offline-gpt2", model="tiny", data="offline:pydoc", max_steps=4,
                       batch_size=4, block_size=64, eval_every=2, logging_every=1,
                       mc_questions_per_subject=2,
                       options={"n_embd": 16, "n_layer": 1, "n_head": 2, "vocab_size": 300,
                                "mc_train": 10, "max_eval_blocks": 4})  # fmt: skip
    tasks = [scratch, tiny_corpus_task("gpt2-shift-lora")]
    monkeypatch.setattr(suite_module, "suite_tasks", lambda kinds: tasks)
    out = tmp_path / "suite"
    argv = ["--task", "offline-gpt2", "gpt2-shift-lora", "--optimizers", "adopt",
            "prodigy:d_coef=2", "--adamw-lrs", "1e-3", "3e-2", "--seeds", "0", "1",
            "--no-stock-adamw", "--no-plots", "--workers", "0",
            "--output-dir", str(out)]  # fmt: skip
    assert compare.main(argv) == 0
    table = json.loads((out / "suite.json").read_text())
    assert list(table["tasks"]) == ["offline-gpt2", "gpt2-shift-lora"]
    rows = {r["label"]: r for r in table["rows"]}
    assert set(rows) == {"adopt", "prodigy:d_coef=2.0", "adamw (best of grid)",
                         "adamw lr=1e-03", "adamw lr=3e-02"}  # fmt: skip
    with (out / "suite.csv").open() as fh:
        csv_rows = {r["label"]: r for r in csv.DictReader(fh)}
    markdown = (out / "suite.md").read_text()

    for kind in table["tasks"]:
        per_task = json.loads((out / kind / "results.json").read_text())
        runs = per_task["runs"]
        assert len(runs) == 8 and all(r["status"] == "ok" for r in runs), [
            r.get("error") for r in runs
        ]
        assert {r["run"]["seed"] for r in runs} == {0, 1}
        losses = {r["label"]: r["eval_loss"] for r in per_task["rows"]}
        best_lr = per_task["verdict"]["best_adamw_lr"]
        base = losses[f"adamw lr={best_lr:.0e}"]
        assert table["tasks"][kind]["best_adamw_lr"] == best_lr
        assert table["tasks"][kind]["best_adamw_eval_loss"] == base
        for label, loss in losses.items():
            assert rows[label]["eval_loss"][kind] == loss
            assert rows[label]["ratio"][kind] == loss / base
            assert float(csv_rows[label][f"ratio:{kind}"]) == loss / base
            if label in per_task["verdict"]["every_ratio"]:
                assert rows[label]["ratio"][kind] == per_task["verdict"]["every_ratio"][label]
            # the spike column, from the per-task runs' own eval curves
            spikes = [
                r["final_eval_loss"]
                / min([r["final_eval_loss"]] + [h["eval_loss"] for h in r["log_history"]
                                                if "eval_loss" in h])
                for r in runs
                if r["label"] == label
            ]  # fmt: skip
            assert len(spikes) == 2 and rows[label]["final_over_best"][kind] == max(spikes)
        assert rows["adamw (best of grid)"]["ratio"][kind] == 1.0
    for label, row in rows.items():
        ratios = list(row["ratio"].values())
        assert row["mean"] == pytest.approx(sum(ratios) / 2, rel=1e-15)
        assert row["worst"] == max(ratios)
        assert float(csv_rows[label]["mean"]) == row["mean"]
        line = next(x for x in markdown.splitlines() if x.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:5] == [f"{row['ratio']['offline-gpt2']:.3f}",
                              f"{row['ratio']['gpt2-shift-lora']:.3f}",
                              f"{row['mean']:.3f}", f"{row['worst']:.3f}"]  # fmt: skip
        assert cells[5] == f"{row['worst_final_over_best']:.4f}"
        assert cells[6] == f"{row['runs_over_limit']} of 4"
    # the variant ran with its setting
    ran = json.loads((out / "gpt2-shift-lora" / "results.json").read_text())["runs"]
    prodigy = [r for r in ran if r["label"].startswith("prodigy")]
    assert [(r["optimizer_class"], r["hyperparameters"]["d_coef"]) for r in prodigy] == [
        ("Prodigy", 2.0)
    ] * 2
    assert {r["hyperparameters"]["lr"] for r in ran if r["label"] == "adamw lr=3e-02"} == {0.03}
    assert table["workers"] == 0 and (table["runs_trained"], table["runs_cached"]) == (16, 0)
    assert table["run_seconds"] == pytest.approx(
        sum(r["wall_seconds"] for k in table["tasks"]
            for r in json.loads((out / k / "results.json").read_text())["runs"])
    )  # fmt: skip
    assert "16 runs trained and 0 reused from the cache" in markdown

    # again: everything is cached, nothing trains
    monkeypatch.setattr(
        "hf_tuningfree.compare.runner.execute_run", lambda *a: pytest.fail("trained again")
    )
    assert compare.main(argv) == 0
    again = json.loads((out / "suite.json").read_text())
    assert again["rows"] == table["rows"]
    assert (again["runs_trained"], again["runs_cached"]) == (0, 16)
    assert again["run_seconds"] == pytest.approx(table["run_seconds"])


def test_suite_runs_every_suite_task_with_three_seeds_by_default(tmp_path, monkeypatch):
    seen = {}

    def capture(tasks, optimizers, seeds, output_dir, **kwargs):
        seen.update(kinds=[t.kind for t in tasks], optimizers=optimizers, seeds=seeds,
                    output_dir=output_dir, workers=kwargs["workers"])  # fmt: skip
        (output_dir / "suite.md").parent.mkdir(parents=True)
        (output_dir / "suite.md").write_text("table\n")
        return {"markdown": output_dir / "suite.md"}

    monkeypatch.setattr(suite_module, "compare_suite", capture)
    compare.main(["--suite", "--workers", "1", "--output-dir", str(tmp_path / "s")])
    assert seen == {"kinds": list(suite_module.SUITE), "optimizers": None, "seeds": [0, 1, 2],
                    "output_dir": tmp_path / "s", "workers": 1}  # fmt: skip
    assert suite_module.SUITE == ("offline-gpt2", "gpt2-long", "gpt2-shift-ft", "gpt2-shift-lora",
                                  "gpt2-shift-lora-short")  # fmt: skip
    argv = ["--task", "gpt2-long", "offline-gpt2", "--seeds", "4",
            "--optimizers", "prodigy:d_coef=2", "--output-dir", str(tmp_path / "t")]  # fmt: skip
    compare.main(argv)
    assert seen["kinds"] == ["gpt2-long", "offline-gpt2"] and seen["seeds"] == [4]
    assert seen["optimizers"] == ["prodigy:d_coef=2.0"]
