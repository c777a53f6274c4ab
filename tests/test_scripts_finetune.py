"""scripts/finetune_gpt2.py and scripts/finetune_llama_lora.py end to end, and the library pieces
they are thin over (hf.clm, hf.sft, hf.lora, hf.pipeline). Tiny models, a few CPU steps each."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from script_loader import load_script
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_tuningfree.data.resolve import resolve_tokenizer
from hf_tuningfree.data.synthetic_mc import make_synthetic_mc
from hf_tuningfree.eval.loglikelihood import encode_question
from hf_tuningfree.eval.prompts import build_prompt, get_format
from hf_tuningfree.hf.clm import group_texts, resolve_block_size, text_column, tokenize_and_group
from hf_tuningfree.hf.lora import apply_lora
from hf_tuningfree.hf.pipeline import (
    RANK_REPORT_ENV,
    ScriptArgumentError,
    parse_script_arguments,
    tensor_checksum,
)
from hf_tuningfree.hf.script_args import LoraArguments
from hf_tuningfree.hf.sft import (
    IGNORE_INDEX,
    PaddingCollator,
    detect_format,
    mmlu_prompt_completion,
    render_prompt_completion,
    tokenize_prompt_completion,
)
from hf_tuningfree.optim import available_optimizers

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
# D-Adaptation's d is the statistic the issue names; ADOPT (always registered) stands in until
# dadapt_adam is in the registry.
OPTIM = "dadapt_adam" if "dadapt_adam" in available_optimizers() else "adopt"
OPTIM_STAT = "optim/d" if OPTIM == "dadapt_adam" else "optim/step"
PROBE = torch.arange(100, 116).reshape(2, 8)  # token ids fed to compare logits

GPT2_ARGS = [
    "--model_name_or_path", "offline:gpt2-tiny",
    "--dataset_name", "offline:pydoc",
    "--block_size", "32",
    "--max_train_samples", "32",
    "--max_eval_samples", "8",
    "--optim", OPTIM,
    "--max_steps", "4",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "8",
    "--logging_steps", "1",
    "--use_cpu", "true",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--dataloader_num_workers", "0",
    "--seed", "0",
]  # fmt: skip


def run_in_process(script: str, argv: list[str]):
    """``scripts/{script}.py``'s ``run()`` on parsed ``argv``: the result keeps the trainer."""
    module = load_script(script)
    return module.run(*parse_script_arguments(module.build_parser(), argv))


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(PROBE).logits


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_results(out: Path, samples: tuple[int, int]) -> dict:
    """``all_results.json`` after the checks every fine-tuning run passes: a finite eval loss,
    the perplexity that goes with it, and the (train, eval) sample counts."""
    results = read_json(out / "all_results.json")
    assert math.isfinite(results["eval_loss"])
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-12)
    assert (results["train_samples"], results["eval_samples"]) == samples
    return results


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)
    return {**env, **extra}


# --- finetune_gpt2.py ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2") / "run"
    argv = [*GPT2_ARGS, "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out)]
    return run_in_process("finetune_gpt2", argv)


def test_gpt2_metrics_model_tokenizer_and_state_are_saved(gpt2_run):
    out = gpt2_run.output_dir
    results = read_results(out, samples=(32, 8))
    assert results == {
        **read_json(out / "train_results.json"),
        **read_json(out / "eval_results.json"),
    }
    block = gpt2_run.trainer.train_dataset[0]
    assert len(block["input_ids"]) == 32 and block["labels"] == block["input_ids"]

    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 4
    train_logs = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in train_logs] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) and OPTIM_STAT in h for h in train_logs)

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded), logits(gpt2_run.trainer.model))
    assert AutoTokenizer.from_pretrained(out)("Hello world")["input_ids"] == [15496, 995]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_gpt2_model_card_names_the_optimizer_and_the_offline_base(gpt2_run):
    card = (gpt2_run.output_dir / "README.md").read_text(encoding="utf-8")
    assert "## Optimizer" in card
    assert f'`optim="{OPTIM}"`' in card
    assert "Final adapted values" in card
    assert "This model was trained from scratch (tiny GPT-2" in card
    assert "huggingface.co/offline:" not in card and "huggingface.co/)" not in card


def test_gpt2_resume_from_last_checkpoint_matches_the_uninterrupted_run(gpt2_run, tmp_path):
    # An interrupted run: only checkpoint-2 exists. Rerunning the same command resumes from it.
    out = tmp_path / "run"
    shutil.copytree(gpt2_run.output_dir / "checkpoint-2", out / "checkpoint-2")
    argv = [*GPT2_ARGS, "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out)]
    resumed = run_in_process("finetune_gpt2", argv)

    assert resumed.metrics["eval_loss"] == gpt2_run.metrics["eval_loss"]
    full, part = (
        read_json(d / "trainer_state.json")["log_history"] for d in (gpt2_run.output_dir, out)
    )
    losses = [(h["step"], h["loss"], h[OPTIM_STAT]) for h in full if "loss" in h]
    assert [(h["step"], h["loss"], h[OPTIM_STAT]) for h in part if "loss" in h] == losses
    expected = load_file(gpt2_run.output_dir / "model.safetensors")
    actual = load_file(out / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_gpt2_refuses_a_non_empty_output_dir_without_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    module = load_script("finetune_gpt2")
    with pytest.raises(
        SystemExit, match=r"not empty and has no checkpoint-N.*--overwrite_output_dir"
    ):
        module.main([*GPT2_ARGS, "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"resume_from_checkpoint=.*is not a directory"):
        module.main([*GPT2_ARGS, "--output_dir", str(tmp_path / "new"),
                     "--resume_from_checkpoint", str(tmp_path / "missing")])  # fmt: skip


def test_gpt2_hub_dataset_offline_fails_fast_naming_the_offline_corpora(tmp_path):
    module = load_script("finetune_gpt2")
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=r"dataset 'wikitext'.*offline:pydoc"):
        module.main(["--dataset_name", "wikitext", "--dataset_config_name", "wikitext-2-raw-v1",
                     "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])  # fmt: skip
    assert time.perf_counter() - start < 15


def test_gpt2_trains_on_local_text_files(tmp_path):
    tokenizer = resolve_tokenizer("offline:gpt2")
    lines = [f"Line {i} of a small local corpus about tuning-free optimizers." for i in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:30]) + "\n")
    (tmp_path / "validation.txt").write_text("\n".join(lines[30:]) + "\n")
    # The text loader yields one row per line, each keeping its line break.
    tokens = sum(len(tokenizer(line + "\n")["input_ids"]) for line in lines[:30])
    argv = [*GPT2_ARGS, "--train_file", str(tmp_path / "train.txt"),
            "--validation_file", str(tmp_path / "validation.txt"), "--dataset_name", "",
            "--max_train_samples", "1000", "--max_steps", "2", "--save_strategy", "no",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = run_in_process("finetune_gpt2", argv)
    assert result.metrics["train_samples"] == tokens // 32
    assert math.isfinite(result.metrics["eval_loss"])


def test_two_real_gloo_ranks_agree_on_optimizer_statistics_and_parameters(tmp_path):
    out, reports = tmp_path / "run", tmp_path / "ranks"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0", str(ROOT / "scripts" / "finetune_gpt2.py"),
    ]  # fmt: skip
    # The last occurrence of an option wins: 64 training blocks instead of 32.
    args = [*GPT2_ARGS, "--max_train_samples", "64", "--save_strategy", "no"]
    args += ["--ddp_find_unused_parameters", "false"]
    result = subprocess.run(
        [*launch, *args, "--output_dir", str(out)],
        env=subprocess_env(ACCELERATE_USE_CPU="1", **{RANK_REPORT_ENV: str(reports)}),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (read_json(reports / f"rank{r}.json") for r in (0, 1))
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["distributed_type"] == "DistributedType.MULTI_CPU"
    assert rank0["parameters"] and rank0["parameters"] == rank1["parameters"]
    assert rank0["optimizer_stats"] == rank1["optimizer_stats"]
    assert OPTIM_STAT in rank0["optimizer_stats"]

    def optim_entries(history):
        return [
            {k: v for k, v in h.items() if k.startswith("optim/")} for h in history if "loss" in h
        ]

    logged = read_json(out / "trainer_state.json")["log_history"]
    assert len(optim_entries(logged)) == 4
    assert optim_entries(logged) == optim_entries(rank0["log_history"])
    assert optim_entries(logged) == optim_entries(rank1["log_history"])
    # 64 blocks, 4 per rank per step: two ranks make 4 steps half an epoch (one rank: a quarter).
    assert [h for h in logged if "loss" in h][-1]["epoch"] == pytest.approx(0.5)
    saved = load_file(out / "model.safetensors")
    assert {k: tensor_checksum(v) for k, v in saved.items()} == {
        k: v for k, v in rank0["parameters"].items() if k in saved
    }


# --- finetune_llama_lora.py ---------------------------------------------------------------------

LORA_CONFIG = EXPERIMENTS / "offline_llama_tiny_lora_synthetic_mc.yaml"
LORA_OVERRIDES = ["--disable_tqdm", "true", "--save_strategy", "steps", "--save_steps", "2"]
if OPTIM != "dadapt_adam":  # the config's optimizer and its multiplier lr of 1.0
    LORA_OVERRIDES += ["--optim", OPTIM, "--learning_rate", "1e-2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    scoring = ["--score_mmlu", "--mmlu_shots", "1", "--mmlu_max_questions", "24"]
    argv = [
        str(LORA_CONFIG),
        *LORA_OVERRIDES,
        *scoring,
        "--merge_adapter",
        "--output_dir",
        str(out),
    ]
    return run_in_process("finetune_llama_lora", argv)


def test_lora_adapter_reloads_to_identical_logits_and_merges(lora_run):
    out = lora_run.output_dir
    config = read_json(out / "adapter_config.json")
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["base_model_name_or_path"] == str(out / "base_model")
    trained = lora_run.trainer.model
    assert all("lora_" in n for n, p in trained.named_parameters() if p.requires_grad)
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B starts at zero: it trained

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    base_logits = logits(base)
    reloaded = PeftModel.from_pretrained(base, out)
    assert torch.equal(logits(reloaded), logits(trained))
    assert not torch.equal(logits(trained), base_logits)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(logits(merged), logits(trained), atol=1e-5, rtol=1e-5)


def test_lora_metrics_scores_and_card(lora_run):
    out = lora_run.output_dir
    results = read_results(out, samples=(32, 16))
    scores = read_json(out / "mmlu_scores.json")
    assert scores["count"] == 24 and scores["shots"] == 1
    assert results["mmlu_accuracy"] == scores["accuracy"] == lora_run.metrics["mmlu_accuracy"]
    assert 0.0 <= scores["accuracy"] <= 1.0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and "## Optimizer" in card
    # Completion-only loss: one answer token and EOS carry labels; the prompt does not.
    example = lora_run.trainer.train_dataset[0]
    learned = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert len(learned) == 2 and learned[-1] == resolve_tokenizer("offline:gpt2").eos_token_id


def test_lora_resume_from_an_explicit_checkpoint_matches(lora_run, tmp_path):
    out = tmp_path / "resumed"
    checkpoint = lora_run.output_dir / "checkpoint-2"
    # Activation checkpointing recomputes the same forward pass: the results stay bit-equal.
    argv = [str(LORA_CONFIG), *LORA_OVERRIDES, "--output_dir", str(out),
            "--resume_from_checkpoint", str(checkpoint),
            "--activation_checkpointing", "true"]  # fmt: skip
    resumed = run_in_process("finetune_llama_lora", argv)
    assert resumed.trainer.model.get_base_model().is_activation_checkpointing
    assert resumed.metrics["eval_loss"] == lora_run.metrics["eval_loss"]
    expected = load_file(lora_run.output_dir / "adapter_model.safetensors")
    actual = load_file(out / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_lora_script_prepares_instruction_and_plain_text_data(tmp_path):
    module = load_script("finetune_llama_lora")
    parsed = parse_script_arguments(
        module.build_parser(), ["--output_dir", str(tmp_path), "--use_cpu", "true"]
    )
    _, data_args, _, _, training_args = parsed
    tokenizer = resolve_tokenizer("offline:gpt2")
    rows = {"instruction": ["Add the numbers.", "Name a colour."], "input": ["2 + 2", ""]}
    rows["output"] = ["4", "Blue"]
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)})
    splits = {"train": ("train", "train_split_name")}
    out, layout = module.prepare_splits(raw, splits, tokenizer, 64, data_args, training_args)
    assert layout == "instruction"
    first = out["train"][0]
    assert tokenizer.decode(first["input_ids"]).endswith("### Response:\n4<|endoftext|>")
    learned = [t for t in first["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "\n4<|endoftext|>"  # the scorer's split: "\n" moves over

    text = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["word " * 50]})})
    out, layout = module.prepare_splits(text, splits, tokenizer, 16, data_args, training_args)
    assert layout == "text" and [len(b) for b in out["train"]["input_ids"]] == [16, 16, 16]
    with pytest.raises(ScriptArgumentError, match=r"--train_split_name auxiliary.*\['train'\]"):
        module.prepare_splits(
            text, {"train": ("auxiliary", "train_split_name")}, tokenizer, 16, data_args,
            training_args,
        )  # fmt: skip


@pytest.mark.slow
def test_smollm2_lora_two_steps_as_a_script(tmp_path):
    from hf_tuningfree.data.assets import smollm2_dir

    out = tmp_path / "smollm2"
    command = [
        sys.executable, str(ROOT / "scripts" / "finetune_llama_lora.py"),
        "--output_dir", str(out), "--max_steps", "2", "--optim", OPTIM,
        "--max_train_samples", "4", "--max_eval_samples", "2", "--block_size", "128",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
        "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "true",
        "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = read_json(out / "trainer_state.json")
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 2 and len(losses) == 2 and all(map(math.isfinite, losses))
    assert math.isfinite(read_json(out / "all_results.json")["eval_loss"])
    config = read_json(out / "adapter_config.json")
    assert config["base_model_name_or_path"] == str(smollm2_dir())
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 30 and all(v.abs().max() > 0 for v in lora_b)  # 30 layers x q, v


# --- library pieces -----------------------------------------------------------------------------


def test_mmlu_training_example_has_the_scorers_prompt_tokens():
    tokenizer = resolve_tokenizer("offline:gpt2")
    row = make_synthetic_mc(0)["auxiliary_train"][3]
    prompt, completion = mmlu_prompt_completion(row)
    scored = build_prompt(row, [], get_format("letters"))
    assert (prompt, completion) == (scored.context, scored.continuations[row["answer"]])
    encoded = encode_question(tokenizer, scored, 0, 1024)
    example = tokenize_prompt_completion(tokenizer, prompt, completion, max_length=1024)
    answer = encoded.continuations[row["answer"]]
    eos = tokenizer.eos_token_id
    assert example["input_ids"] == [*encoded.context, *answer, eos]
    assert example["labels"] == [IGNORE_INDEX] * len(encoded.context) + [*answer, eos]
    full = tokenize_prompt_completion(
        tokenizer, prompt, completion, max_length=1024, completion_only_loss=False
    )
    assert full["labels"] == full["input_ids"]
    assert tokenize_prompt_completion(tokenizer, prompt, completion, max_length=5) is None


def test_padding_collator_keeps_a_real_eos_that_equals_the_pad_token():
    eos = 7  # pad == eos, as GPT-2 and SmolLM2 are set up
    features = [
        {"input_ids": [1, 2, eos], "attention_mask": [1, 1, 1], "labels": [-100, 2, eos]},
        {"input_ids": [3, eos], "attention_mask": [1, 1]},
    ]
    batch = PaddingCollator(pad_token_id=eos, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].tolist() == [[1, 2, eos, eos], [3, eos, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, eos, -100], [3, eos, -100, -100]]


def test_data_layouts_are_detected_and_rendered():
    assert detect_format(["question", "subject", "choices", "answer"]) == "mmlu"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["instruction", "input", "output"]) == "instruction"
    assert detect_format(["text", "document"]) == "text"
    row = {"instruction": "Add.", "input": "2 + 2", "output": "4"}
    assert render_prompt_completion(row, "instruction") == (
        "### Instruction:\nAdd.\n\n### Input:\n2 + 2\n\n### Response:\n",
        "4",
    )
    no_subject = {"question": "Q?", "subject": "", "choices": ["a", "b", "c", "d"], "answer": "B"}
    prompt, completion = mmlu_prompt_completion(no_subject)
    assert prompt.startswith("The following are multiple choice questions (with answers).\n\nQ?")
    assert completion == " B"
    with pytest.raises(ValueError, match="no prompt/completion"):
        render_prompt_completion(row, "text")


def test_group_texts_cuts_blocks_and_drops_the_remainder():
    examples = {"input_ids": [[1, 2, 3], [4, 5, 6, 7]], "attention_mask": [[1, 1, 1], [1, 1, 1, 1]]}
    out = group_texts(examples, 3)
    assert out["input_ids"] == [[1, 2, 3], [4, 5, 6]] == out["labels"]
    assert out["attention_mask"] == [[1, 1, 1], [1, 1, 1]]


def test_tokenize_and_group_errors_name_the_problem():
    tokenizer = resolve_tokenizer("offline:gpt2")
    raw = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a short line\n"], "n": [1]})}
    )
    with pytest.raises(ValueError, match="has 4 tokens, not enough for one block of 64"):
        tokenize_and_group(raw, tokenizer, 64)
    with pytest.raises(ValueError, match=r"column 'n' holds .*not text"):
        text_column(raw["train"], "n")
    with pytest.raises(ValueError, match=r"splits \['validation'\] are not in the data"):
        tokenize_and_group(raw, tokenizer, 2, splits=["validation"])
    with pytest.raises(ValueError, match="has 4 tokens, not enough for one block of 5"):
        tokenize_and_group(raw, tokenizer, 5)
    blocks = tokenize_and_group(raw, tokenizer, 5, append_eos=True)["train"]
    assert [b["input_ids"] for b in blocks] == [[64, 1790, 1627, 198, tokenizer.eos_token_id]]


def test_block_size_defaults_to_the_context_and_rejects_longer():
    from hf_tuningfree.data.model_configs import tiny_gpt2_config

    tokenizer = resolve_tokenizer("offline:gpt2")  # model_max_length 1024
    config = tiny_gpt2_config(len(tokenizer))  # 256 positions
    assert resolve_block_size(tokenizer, config) == 256
    assert resolve_block_size(tokenizer, None) == 1024
    assert resolve_block_size(tokenizer, config, 64) == 64
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        resolve_block_size(tokenizer, config, 512)


def test_lora_target_that_matches_nothing_lists_the_linear_layers():
    import helpers

    with pytest.raises(ValueError, match=r"\['c_proj'\] match no linear layer.*'q_proj'"):
        apply_lora(helpers.tiny_llama(64), LoraArguments(lora_target_modules=["q_proj", "c_proj"]))


def test_config_file_with_command_line_overrides(tmp_path):
    module = load_script("finetune_gpt2")
    config = str(EXPERIMENTS / "offline_gpt2_tiny_pydoc.yaml")
    model_args, data_args, training_args = parse_script_arguments(
        module.build_parser(), [config, "--max_steps", "3", "--output_dir", str(tmp_path)]
    )
    assert model_args.model_name_or_path == "offline:gpt2-tiny"
    assert (data_args.dataset_name, data_args.block_size) == ("offline:pydoc", 64)
    assert (training_args.optim, training_args.learning_rate) == ("adopt", 1e-3)
    assert (training_args.max_steps, training_args.output_dir) == (3, str(tmp_path))
    assert training_args.do_train and training_args.do_eval
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: offline:gpt2-tiny\nlearning_rat: 0.1\n")
    with pytest.raises(ScriptArgumentError, match=r"unknown argument\(s\) \['learning_rat'\]"):
        parse_script_arguments(module.build_parser(), [str(bad)])


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("offline_*.yaml")), ids=lambda p: p.name)
def test_offline_experiment_configs_parse_with_their_scripts_parser(path: Path):
    script = "finetune_llama_lora" if "lora" in path.name else "finetune_gpt2"
    module = load_script(script)
    data = read_json_or_yaml(path)
    overrides = [] if data["optim"] in available_optimizers() else ["--optim", "adopt"]
    parsed = parse_script_arguments(module.build_parser(), [str(path), *overrides])
    training_args = parsed[-1]
    assert training_args.output_dir == data["output_dir"]
    assert training_args.max_steps == data["max_steps"]
    assert parsed[0].model_name_or_path == data["model_name_or_path"]


def read_json_or_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))
