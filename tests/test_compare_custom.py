"""hf-tuningfree compare on any model and data (task kind ``custom``): the command line end to end,
the cache key, LoRA with MMLU-style scoring, identical runs across optimizers, and the errors."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

from hf_tuningfree import compare
from hf_tuningfree.compare import runner as runner_module
from hf_tuningfree.compare import tasks as tasks_module
from hf_tuningfree.compare.spec import RunSpec
from hf_tuningfree.compare.tasks import build_custom, custom_task, default_task
from hf_tuningfree.data import write_synthetic_mc

WORDS = ("the", "a", "of", "to", "and", "in", "is", "that", "it", "was", "for", "on", "are",
         "as", "with", "his", "they", "at", "be", "this", "from")  # fmt: skip
#: Small and fast: a few steps of batch 2; no plots, no AdamW at the stock lr.
FAST = ["--steps", "4", "--batch-size", "2", "--no-plots", "--no-stock-adamw"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """200 lines of 40 words (about 8k GPT-2 tokens) as a local .txt file."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mc_files(tmp_path_factory) -> dict[str, Path]:
    """The synthetic benchmark (MMLU format) as jsonl: 24 training and 12 validation questions."""
    return write_synthetic_mc(tmp_path_factory.mktemp("mc"), 0, n_validation=2, n_test=2, n_train=4)


def compare_main(argv: list[str]) -> dict:
    """``hf-tuningfree compare ARGV``; returns the results.json it wrote."""
    assert compare.main(argv) == 0
    out = Path(argv[argv.index("--output-dir") + 1])
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_custom_comparison_end_to_end(corpus, tmp_path):
    """--model/--data select the custom kind; 2 optimizers + 2 AdamW lrs in a worker process."""
    out = tmp_path / "cmp"
    argv = ["--model", "offline:gpt2-tiny", "--data", str(corpus), "--block-size", "32",
            "--optimizers", "adopt", "dog", "--adamw-lrs", "1e-3", "1e-2", "--workers", "1",
            "--output-dir", str(out), *FAST]  # fmt: skip
    data = compare_main(argv)

    assert data["task"]["kind"] == "custom"
    assert (data["task"]["model"], data["task"]["data"]) == ("offline:gpt2-tiny", str(corpus))
    assert data["task"]["options"]["fingerprints"] == {
        str(corpus): tasks_module.path_fingerprint(corpus)
    }
    assert len(data["rows"]) == 4 and len(data["runs"]) == 4
    assert [r["status"] for r in data["runs"]] == ["ok"] * 4, [r.get("error") for r in data["runs"]]
    losses = {r["label"]: r["final_eval_loss"] for r in data["runs"]}
    assert set(losses) == {"adopt", "dog", "adamw lr=1e-03", "adamw lr=1e-02"}
    # a random-init 50k-vocabulary model starts near ln(50257) = 10.8 and learns in 4 steps
    assert all(math.isfinite(v) and 5.0 < v < 11.5 for v in losses.values()), losses
    assert losses["adamw lr=1e-02"] < losses["adamw lr=1e-03"]
    for run in data["runs"]:  # full training: every parameter, 1.64 M of them
        assert run["trainable_parameters"] == run["total_parameters"] > 1_600_000
        assert "mc_accuracy" not in run  # plain text: nothing to score
        assert [h["step"] for h in run["log_history"] if "eval_loss" in h][-1] == 4

    # the table, the CSV and the JSON say the same numbers
    by_label = {r["label"]: r for r in data["rows"]}
    assert {k: r["eval_loss"] for k, r in by_label.items()} == losses
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    for row in rows:
        assert float(row["eval_loss"]) == pytest.approx(losses[row["label"]])
    table = (out / "results.md").read_text()
    for label, loss in losses.items():
        line = next(x for x in table.splitlines() if x.startswith(f"| {label}"))
        assert f"{loss:.4f}" in line
    summary = (out / "summary.txt").read_text()
    assert f"Task: custom (offline:gpt2-tiny on {corpus}), 4 steps." in summary


def test_the_cache_key_follows_the_block_size(corpus, tmp_path, monkeypatch):
    """Same arguments: nothing is built or trained again; another --block-size: trained again."""
    out = tmp_path / "cmp"
    argv = ["--data", str(corpus), "--optimizers", "adopt", "--adamw-lrs", "1e-2",
            "--workers", "0", "--output-dir", str(out), *FAST]  # fmt: skip
    first = compare_main([*argv, "--block-size", "32"])
    assert [r["cached"] for r in first["runs"]] == [False, False]
    assert len(list((out / "runs").glob("*.json"))) == 2

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached comparison built or trained something")

    with monkeypatch.context() as m:
        m.setattr(runner_module, "execute_run", forbidden)
        m.setattr(tasks_module, "build_task", forbidden)
        again = compare_main([*argv, "--block-size", "32"])
    assert [r["cached"] for r in again["runs"]] == [True, True]
    assert [r["final_eval_loss"] for r in again["runs"]] == [
        r["final_eval_loss"] for r in first["runs"]
    ]

    other = compare_main([*argv, "--block-size", "16"])
    assert [r["cached"] for r in other["runs"]] == [False, False]
    assert other["task"]["block_size"] == 16
    assert {r["key"] for r in other["runs"]}.isdisjoint(r["key"] for r in first["runs"])
    assert len(list((out / "runs").glob("*.json"))) == 4
    assert other["runs"][0]["final_eval_loss"] != first["runs"][0]["final_eval_loss"]


def test_task_keys_follow_every_setting_and_keep_the_offline_default(corpus, tmp_path):
    run = RunSpec("adopt", None, 0, "tuning-free")
    base = custom_task("offline:gpt2-tiny", str(corpus))
    changed = [
        custom_task("offline:llama-tiny", str(corpus)),
        custom_task("offline:gpt2-tiny", "offline:pydoc"),
        custom_task("offline:gpt2-tiny", str(corpus), block_size=64),
        custom_task("offline:gpt2-tiny", str(corpus), batch_size=4),
        custom_task("offline:gpt2-tiny", str(corpus), text_column="text"),
        custom_task("offline:gpt2-tiny", str(corpus), config_overrides="n_layer=1"),
        custom_task("offline:gpt2-tiny", str(corpus), lora=True),
        custom_task("offline:gpt2-tiny", str(corpus), lora=True, lora_r=4),
        custom_task("offline:gpt2-tiny", str(corpus), mc_split=None),
        custom_task("offline:gpt2-tiny", train_files=[str(corpus)]),
    ]
    keys = {run.key(t) for t in [base, *changed]}
    assert len(keys) == len(changed) + 1
    assert run.key(custom_task("offline:gpt2-tiny", str(corpus))) == run.key(base)

    # editing the data file changes the key (content fingerprint)
    edited = tmp_path / "edited.txt"
    edited.write_text("one two three\n")
    before = run.key(custom_task(data=str(edited)))
    edited.write_text("one two four\n")
    assert run.key(custom_task(data=str(edited))) != before

    # the fixed kinds' specs (and so the cached results of earlier comparisons) are unchanged
    def digest(kind: str) -> str:
        payload = json.dumps(default_task(kind).to_dict(), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    assert digest("offline-gpt2") == "efb626d034184cd0", "offline-gpt2 cache keys changed"
    assert digest("smollm2-lora") == "917e5d6df0e8eb33", "smollm2-lora cache keys changed"


def test_lora_on_mmlu_format_data_is_scored_and_trains_only_the_adapters(mc_files, tmp_path):
    files = ["--train-file", str(mc_files["auxiliary_train"]),
             "--validation-file", str(mc_files["validation"])]  # fmt: skip
    common = ["--model", "offline:llama-tiny", *files, "--block-size", "128", "--optimizers",
              "adopt", "--workers", "0", *FAST]  # fmt: skip
    lora = compare_main([*common, "--adamw-lrs", "1e-3", "--lora", "--lora-r", "4",
                         "--lora-target-modules", "q_proj", "v_proj",
                         "--output-dir", str(tmp_path / "lora")])  # fmt: skip
    full = compare_main([*common, "--adamw-lrs", "1e-3", "--output-dir", str(tmp_path / "full")])
    assert [r["status"] for r in lora["runs"] + full["runs"]] == ["ok"] * 4

    # LoRA r=4 on q_proj (32 -> 32) and v_proj (32 -> 16: 2 KV heads of 8) in 2 layers
    adapters = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    total = full["runs"][0]["total_parameters"]
    for run in lora["runs"]:
        assert run["trainable_parameters"] == adapters == 896
        assert run["total_parameters"] == total + adapters
    for run in full["runs"]:
        assert run["trainable_parameters"] == run["total_parameters"] == total > 1_600_000
    # ADOPT keeps two moments per trained parameter: 896 vs 1.6 M parameters
    lora_adopt, full_adopt = lora["runs"][0], full["runs"][0]
    assert lora_adopt["label"] == full_adopt["label"] == "adopt"
    assert lora_adopt["optimizer_state_mb"] == pytest.approx(2 * adapters * 4 / 2**20, rel=0.05)
    assert full_adopt["optimizer_state_mb"] > 1000 * lora_adopt["optimizer_state_mb"]
    # per trained element: two fp32 moments, plus ADOPT's 0-dim fp32 step per tensor (8 adapters)
    assert lora_adopt["optimizer_state_bytes_per_param"] == pytest.approx(
        8.0 + 8 * 4 / adapters, rel=1e-12
    )

    # MMLU-format data without a test split: its 12 validation questions are scored
    for run in lora["runs"] + full["runs"]:
        assert run["mc_questions"] == 12
        assert 0.0 <= run["mc_accuracy"] <= 1.0
        assert run["mc_accuracy"] * 12 == pytest.approx(round(run["mc_accuracy"] * 12))
        assert math.isfinite(run["final_eval_loss"])
    table = (tmp_path / "lora" / "results.md").read_text()
    line = next(x for x in table.splitlines() if x.startswith("| adopt"))
    assert f"| {lora_adopt['mc_accuracy']:.3f} |" in line


def test_every_run_gets_the_same_model_and_data(mc_files):
    """What keeps runs comparable: a seed gives the same initial weights (LoRA adapters too), and
    the training subset and evaluation data are the same at every build."""
    task = custom_task(
        "offline:llama-tiny",
        train_files=[str(mc_files["auxiliary_train"])],
        validation_files=[str(mc_files["validation"])],
        max_steps=5,
        batch_size=2,
        lora=True,
        lora_r=2,
        lora_target_modules=["q_proj"],
    )
    first, second = build_custom(task, Path()), build_custom(task, Path())
    assert len(first.train_dataset) == 10  # 5 steps x 2 of the 24 questions, drawn once
    assert first.train_dataset["input_ids"] == second.train_dataset["input_ids"]
    assert first.eval_dataset["input_ids"] == second.eval_dataset["input_ids"]
    assert len(first.eval_dataset) == len(first.mc_test) == 12

    a, b, c = (dict(first.make_model(seed).named_parameters()) for seed in (0, 0, 1))
    lora_a = [name for name in a if "lora_A" in name]
    assert len(lora_a) == 2 and all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in lora_a)
    assert [name for name, p in a.items() if p.requires_grad] == [
        name for name in a if "lora_" in name
    ]


def test_custom_task_errors_say_what_to_change(corpus, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "err"), "--workers", "0", *FAST]
    cases = [
        # a hub name while offline: the resolver's HubOfflineError message, at once
        (["--model", "gpt2"],
         "model 'gpt2' is not a local path and not in the local Hugging Face cache, and the hub "
         "is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). Offline alternatives: "
         "offline:gpt2-tiny"),
        (["--data", "wikitext", "--data-config", "wikitext-2-raw-v1"],
         "dataset 'wikitext' is not a local path and not in the local Hugging Face cache"),
        (["--data", str(corpus), "--text-column", "body"],
         "--text-column 'body' is not a column of the data; its columns are ['text']"),
        (["--task", "offline-gpt2", "--model", "offline:gpt2-tiny"],
         "--model describe a custom task (any model and data), not --task offline-gpt2; drop "
         "--task: they imply --task custom"),
        (["--data", str(corpus), "--lora-r", "4"], "--lora-r need --lora"),
        (["--data", str(corpus), "--train-file", str(corpus)],
         "give either --data or --train-file/--validation-file, not both"),
        (["--data", str(corpus), "--block-size", "512"],
         "block_size=512 exceeds the model's context of 256 tokens"),
        (["--data", str(corpus), "--mc-split", "test"],
         "--mc-split test: the data has splits ['train', 'validation']; scoring needs one of "
         "them with the MMLU columns ['question', 'subject', 'choices', 'answer']"),
    ]  # fmt: skip
    for argv, message in cases:
        start = time.perf_counter()
        with pytest.raises(SystemExit) as info:
            compare.main([*argv, *out])
        assert str(info.value).startswith("hf-tuningfree compare: error: "), argv
        assert message in str(info.value), (argv, str(info.value))
        assert time.perf_counter() - start < 10, f"{argv} did not fail fast"
    assert not (tmp_path / "err" / "runs").exists()  # nothing ran
    assert "tuning-free optimizer(s)" not in capsys.readouterr().out
