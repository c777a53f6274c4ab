"""``scripts/eval_mmlu.py``: JSON with per-subject results, a table, synthetic or local data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_gpt2, trained_bpe_tokenizer
from script_loader import load_script

from hf_tuningfree.data import SUBJECTS, write_synthetic_mc

eval_mmlu = load_script("eval_mmlu")
COMMON = ["--shots", "2", "--batch_size", "8", "--no_progress", "--save_questions"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tokenizer = trained_bpe_tokenizer()
    tiny_gpt2(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_synthetic_run_writes_per_subject_json_and_prints_a_table(model_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--model", str(model_dir), "--data", "synthetic", "--synthetic_test_size", "3"]
    eval_mmlu.main([*argv, *COMMON, "--output", str(out)])
    report = json.loads(out.read_text())
    assert report["data"] == "synthetic multiple-choice benchmark (MMLU format)"
    assert report["count"] == 3 * len(SUBJECTS) and report["shots"] == 2
    assert sorted(report["per_subject"]) == sorted(SUBJECTS)
    predictions = np.argmax(np.array(report["loglikelihoods"]), axis=1)
    right = predictions == np.array(report["references"])
    assert report["accuracy"] == pytest.approx(right.mean())
    for subject, scores in report["per_subject"].items():
        mask = np.array(report["subjects"]) == subject
        assert scores["count"] == 3 and scores["correct"] == int(right[mask].sum())
    printed = capsys.readouterr().out
    assert "unit_conversion" in printed and f"{report['accuracy']:.3f}" in printed


def test_local_files_give_the_same_scores_as_the_generator(model_dir, tmp_path):
    write_synthetic_mc(tmp_path / "data", 0, n_validation=0, n_test=2, n_train=0)
    argv = ["--model", str(model_dir), *COMMON, "--limit", "1"]
    from_files = eval_mmlu.main([*argv, "--data", str(tmp_path / "data")])
    generated = eval_mmlu.main([*argv, "--data", "synthetic", "--synthetic_test_size", "2"])
    assert from_files["count"] == len(SUBJECTS) == generated["count"]
    assert from_files["loglikelihoods"] == generated["loglikelihoods"]
    assert from_files["data"] == str(tmp_path / "data")


def test_unknown_split_is_named(model_dir):
    with pytest.raises(SystemExit, match="--split train: the data has splits"):
        eval_mmlu.main(
            ["--model", str(model_dir), "--split", "train", "--synthetic_test_size", "1"]
        )


def test_offline_hub_name_exits_with_the_alternatives(model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"--data: 'cais/mmlu' is not a local file.*'synthetic'"):
        eval_mmlu.main(["--model", str(model_dir), "--data", "cais/mmlu"])
