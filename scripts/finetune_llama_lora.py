#!/usr/bin/env python
"""LoRA fine-tuning of a LLaMA-architecture causal LM with a tuning-free optimizer (PEFT).

Data, by its columns (see :mod:`hf_tuningfree.hf.sft`):

- MMLU-format questions (``question``/``subject``/``choices``/``answer``, e.g. ``auxiliary_train``):
  each question becomes the zero-shot prompt the MMLU-style scorer uses and its answer letter, so
  the adapter can be scored afterwards (``--score_mmlu``, or ``scripts/eval_mmlu.py``);
- instruction data (``prompt``/``completion`` or ``instruction``/``input``/``output``);
- plain text (a ``text`` column), cut into ``block_size`` blocks as in ``finetune_gpt2.py``.

Saves the adapter (``adapter_model.safetensors``, ``adapter_config.json``) and the tokenizer in
``output_dir``, metrics, trainer state and a model card; ``--merge_adapter`` also writes the base
model with the adapter merged in to ``output_dir/merged``. A randomly initialised offline base
(``offline:llama-tiny``) is saved to ``output_dir/base_model`` so that the adapter can be loaded
again (``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), output_dir)``).

    # offline: SmolLM2-135M-Instruct on the synthetic multiple-choice questions (MMLU format)
    python scripts/finetune_llama_lora.py configs/experiments/offline_smollm2_lora_synthetic_mc.yaml
    # tiny random LLaMA, seconds, then score on the synthetic test split
    python scripts/finetune_llama_lora.py \\
        configs/experiments/offline_llama_tiny_lora_synthetic_mc.yaml --score_mmlu --mmlu_shots 0
    # Llama-2-7B on MMLU's auxiliary_train (online), one GPU, bf16 weights and autocast
    accelerate launch --config_file configs/accelerate/gpu_single.yaml \\
        scripts/finetune_llama_lora.py configs/experiments/llama2_7b_lora_mmlu_prodigy.yaml

GPU options pass through: ``--bf16`` (autocast), ``--dtype bfloat16`` (frozen base in bf16; the
LoRA weights stay float32), ``--attn_implementation sdpa``, ``--activation_checkpointing``.
Resume as ``finetune_gpt2.py``: ``--resume_from_checkpoint DIR`` or rerun into the same
``output_dir``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import datasets
from transformers import HfArgumentParser, default_data_collator, set_seed

from hf_tuningfree.data.sources import load_multiple_choice
from hf_tuningfree.eval import score_mmlu
from hf_tuningfree.hf import TuningFreeTrainer
from hf_tuningfree.hf.clm import limit_samples, resolve_block_size, tokenize_and_group
from hf_tuningfree.hf.lora import apply_lora, merge_adapter
from hf_tuningfree.hf.pipeline import (
    USER_ERRORS,
    FinetuneResult,
    ScriptArgumentError,
    find_resume_checkpoint,
    load_model,
    load_raw_data,
    logger,
    maybe_write_rank_report,
    model_card_fields,
    parse_script_arguments,
    require_split,
    save_extra_metrics,
    setup_logging,
    train_evaluate_save,
)
from hf_tuningfree.hf.script_args import (
    DataArguments,
    FinetuneTrainingArguments,
    LoraArguments,
    MMLUScoringArguments,
    ModelArguments,
)
from hf_tuningfree.hf.sft import PaddingCollator, detect_format, tokenize_supervised

DEFAULT_MODEL = "offline:smollm2-135m-instruct"
DEFAULT_DATASET = "offline:synthetic-mc"
BASE_MODEL_DIR = "base_model"
MERGED_DIR = "merged"
MMLU_SCORES_FILE = "mmlu_scores.json"


def build_parser() -> HfArgumentParser:
    """The argument groups: model, data, LoRA, MMLU-style scoring, training."""
    return HfArgumentParser(
        (
            ModelArguments,
            DataArguments,
            LoraArguments,
            MMLUScoringArguments,
            FinetuneTrainingArguments,
        )
    )


def train_split_name(raw: datasets.DatasetDict, data_args: DataArguments) -> str:
    """``train_split_name``; MMLU-format data without ``train`` falls back to
    ``auxiliary_train`` (the ``cais/mmlu`` layout)."""
    name = data_args.train_split_name
    if name not in raw and name == "train" and "auxiliary_train" in raw:
        logger.info("no 'train' split: training on 'auxiliary_train' (MMLU layout)")
        return "auxiliary_train"
    return name


def row_source(
    raw: datasets.DatasetDict, key: str, split: str, data_args: DataArguments
) -> tuple[str, int]:
    """What an error about a row of ``split`` names: the file it came from and where the split
    starts in it (with only ``--train_file``, the first rows became the validation split), or
    the dataset and split."""
    carved = data_args.train_file and not data_args.validation_file and "validation" in raw
    if key == "train" and data_args.train_file:
        return str(data_args.train_file), len(raw["validation"]) if carved else 0
    if key == "eval" and data_args.validation_file:
        return str(data_args.validation_file), 0
    if key == "eval" and carved:
        return str(data_args.train_file), 0
    return f"{data_args.dataset_name or DEFAULT_DATASET} [{split}]", 0


def prepare_splits(
    raw: datasets.DatasetDict,
    splits: dict[str, str],
    tokenizer: Any,
    block_size: int,
    data_args: DataArguments,
    training_args: FinetuneTrainingArguments,
) -> tuple[dict[str, datasets.Dataset], str]:
    """Tokenised splits (``{"train": ..., "eval": ...}``) and the data layout found."""
    chosen = {key: require_split(raw, name, option) for key, (name, option) in splits.items()}
    if not chosen:
        return {}, "none"
    data_format = detect_format(next(iter(chosen.values())).column_names)
    limits = {"train": data_args.max_train_samples, "eval": data_args.max_eval_samples}
    if data_format == "text":
        blocks = tokenize_and_group(
            datasets.DatasetDict(chosen),
            tokenizer,
            block_size,
            text_column_name=data_args.text_column_name,
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            main_process_first=training_args.main_process_first,
        )
        return {key: limit_samples(blocks[key], limits[key]) for key in blocks}, data_format
    out = {}
    for key, split in chosen.items():
        source, first_row = row_source(raw, key, splits[key][0], data_args)
        out[key] = tokenize_supervised(
            limit_samples(split, limits[key]),
            tokenizer,
            block_size,
            data_format=data_format,
            completion_only_loss=data_args.completion_only_loss,
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            main_process_first=training_args.main_process_first,
            desc=f"Tokenising {splits[key][0]}",
            source=source,
            first_row=first_row,
        )
    return out, data_format


def score_after_training(
    trainer: TuningFreeTrainer,
    tokenizer: Any,
    raw: datasets.DatasetDict,
    scoring: MMLUScoringArguments,
) -> dict[str, float]:
    """Score the trained model (the saved weights: the iterate average where one is kept) with
    the MMLU-style evaluation; write ``mmlu_results.json`` and ``mmlu_*`` metrics."""
    if scoring.mmlu_data is None:
        data = raw
    elif scoring.mmlu_data.startswith("offline:"):
        data = load_raw_data(
            DataArguments(dataset_name=scoring.mmlu_data, validation_split_percentage=0),
            default=DEFAULT_DATASET,
        )
    else:
        data = load_multiple_choice(scoring.mmlu_data)
    questions = require_split(data, scoring.mmlu_split, "mmlu_split")
    if scoring.mmlu_max_questions is not None:
        questions = limit_samples(questions, scoring.mmlu_max_questions)
    fewshot = data.get(scoring.mmlu_fewshot_split)
    if scoring.mmlu_shots > 0 and fewshot is None:
        raise ScriptArgumentError(
            f"--mmlu_shots {scoring.mmlu_shots} needs the few-shot split "
            f"{scoring.mmlu_fewshot_split!r}; the data has {sorted(data)} (or use --mmlu_shots 0)"
        )
    with trainer.averaged_weights():
        result = score_mmlu(
            trainer.model,
            questions,
            tokenizer=tokenizer,
            fewshot=fewshot,
            shots=scoring.mmlu_shots,
            variant=scoring.mmlu_variant,
            batch_size=scoring.mmlu_batch_size,
            progress=False,
        )
    metrics = {
        "mmlu_accuracy": result.accuracy,
        "mmlu_macro_accuracy": result.macro_accuracy,
        "mmlu_questions": float(result.count),
    }
    if trainer.args.should_save:
        report = {"data": scoring.mmlu_data or "training data", "split": scoring.mmlu_split}
        path = Path(trainer.args.output_dir) / MMLU_SCORES_FILE
        path.write_text(json.dumps({**report, **result.to_dict()}, indent=2) + "\n")
        save_extra_metrics(trainer, "mmlu", metrics)
    logger.info("MMLU-style scores:\n%s", result.format_table())
    return metrics


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    scoring: MMLUScoringArguments,
    training_args: FinetuneTrainingArguments,
) -> FinetuneResult:
    """LoRA-train, evaluate, save (and optionally score and merge)."""
    checkpoint = find_resume_checkpoint(training_args)
    set_seed(training_args.seed)
    resolved = load_model(model_args, default=DEFAULT_MODEL, seed=training_args.seed)
    tokenizer = resolved.tokenizer
    raw = load_raw_data(data_args, default=DEFAULT_DATASET, cache_dir=model_args.cache_dir)
    block_size = resolve_block_size(tokenizer, resolved.model.config, data_args.block_size)
    splits = {}
    if training_args.do_train:
        splits["train"] = (train_split_name(raw, data_args), "train_split_name")
    if training_args.do_eval:
        splits["eval"] = (data_args.validation_split_name, "validation_split_name")
    tokenized, data_format = prepare_splits(
        raw, splits, tokenizer, block_size, data_args, training_args
    )
    # A random-init base exists only in memory: save it beside the adapter (before training, so
    # that checkpoints' adapters have it too) and keep a copy for merging.
    base_copy = copy.deepcopy(resolved.model) if resolved.kind == "offline-random-init" else None
    base_path = str(Path(training_args.output_dir) / BASE_MODEL_DIR) if base_copy else None
    if base_copy is not None and training_args.should_save:
        base_copy.save_pretrained(base_path)
        tokenizer.save_pretrained(base_path)
    model = apply_lora(resolved.model, lora_args, base_model_name_or_path=base_path)
    if data_format == "text":
        collator: Any = default_data_collator
    else:
        collator = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=None)
    trainer = TuningFreeTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("eval"),
        processing_class=tokenizer,
        data_collator=collator,
    )
    if scoring.score_mmlu and trainer.is_fsdp_enabled:
        raise ScriptArgumentError(
            "--score_mmlu with FSDP: the sharded model cannot be scored in place; score the saved "
            "adapter afterwards with scripts/eval_mmlu.py --model BASE --adapter OUTPUT_DIR"
        )
    logger.info(
        "%s + LoRA on %s data (%s): %s train / %s eval examples, block_size %d, world size %d",
        resolved.description,
        data_format,
        data_args.dataset_name or data_args.train_file or DEFAULT_DATASET,
        len(tokenized["train"]) if "train" in tokenized else 0,
        len(tokenized["eval"]) if "eval" in tokenized else 0,
        block_size,
        training_args.world_size,
    )
    dataset = data_args.dataset_name or data_args.train_file or DEFAULT_DATASET
    metrics = train_evaluate_save(
        trainer,
        training_args,
        resume_from_checkpoint=checkpoint,
        train_samples=len(tokenized["train"]) if "train" in tokenized else None,
        eval_samples=len(tokenized["eval"]) if "eval" in tokenized else None,
        model_card=model_card_fields(
            resolved, training_args.output_dir, str(dataset), tags=["lora", "peft"]
        ),
    )
    if scoring.score_mmlu:
        metrics.update(score_after_training(trainer, tokenizer, raw, scoring))
    if lora_args.merge_adapter and training_args.should_save:
        base = base_copy
        if base is None:
            base = load_model(model_args, default=DEFAULT_MODEL, seed=training_args.seed).model
        merge_adapter(
            base, training_args.output_dir, Path(training_args.output_dir) / MERGED_DIR, tokenizer
        )
    maybe_write_rank_report(trainer)
    return FinetuneResult(metrics, trainer, Path(training_args.output_dir))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse ``argv`` (a config file and/or options) and run; bad input exits with a message."""
    try:
        parsed = parse_script_arguments(build_parser(), argv)
        setup_logging(parsed[-1])
        return run(*parsed).metrics
    except USER_ERRORS as error:
        raise SystemExit(f"finetune_llama_lora.py: error: {error}") from error


if __name__ == "__main__":
    main(sys.argv[1:])
