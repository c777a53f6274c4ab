"""Data-parallel scoring: two CPU processes (gloo) give the result of one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from accelerate import debug_launcher
from accelerate.state import PartialState
from helpers import tiny_llama, trained_bpe_tokenizer
from script_loader import load_script


def _two_process_run(argv: list[str]) -> None:
    PartialState._reset_state()  # forked from pytest: forget the parent's single-process state
    load_script("eval_mmlu").main(argv)


def test_accelerate_two_processes_equal_one(tmp_path):
    tokenizer = trained_bpe_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--synthetic_test_size", "3", "--shots", "2"]
    argv += ["--batch_size", "4", "--no_progress", "--save_questions"]
    debug_launcher(_two_process_run, args=([*argv, "--output", str(tmp_path / "two.json")],))
    load_script("eval_mmlu").main([*argv, "--output", str(tmp_path / "one.json")])
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert (two["processes"], one["processes"]) == (2, 1)
    assert two["subjects"] == one["subjects"] and two["references"] == one["references"]
    diff = np.abs(np.array(two["loglikelihoods"]) - np.array(one["loglikelihoods"])).max()
    assert diff <= 1e-5
    assert two["per_subject"] == one["per_subject"]
    assert two["accuracy"] == pytest.approx(one["accuracy"])
