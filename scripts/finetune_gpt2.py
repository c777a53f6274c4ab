#!/usr/bin/env python
"""Fine-tune a GPT-2-family causal LM on text with a tuning-free optimizer (or any stock one).

The flow of Hugging Face's ``run_clm.py``: tokenise the text, concatenate it and cut it into
``block_size`` blocks, train with the Trainer, evaluate (loss and perplexity), save the model,
tokenizer, metrics, trainer state and a model card with an optimizer section. The work is done by
:mod:`hf_tuningfree.hf.clm` and :mod:`hf_tuningfree.hf.pipeline`; this file only wires it up.

    # offline (no hub): tiny GPT-2 on Python's pydoc topics, ADOPT, a few CPU steps
    python scripts/finetune_gpt2.py configs/experiments/offline_gpt2_tiny_pydoc.yaml
    # a config file plus overrides
    python scripts/finetune_gpt2.py configs/experiments/offline_gpt2_tiny_pydoc.yaml --max_steps 20
    # everything on the command line
    python scripts/finetune_gpt2.py --model_name_or_path offline:gpt2-small \\
        --dataset_name offline:shakespeare --optim adopt --max_steps 300 --output_dir out
    # GPT-2 124M on WikiText-2 (online), one GPU
    accelerate launch --config_file configs/accelerate/gpu_single.yaml \\
        scripts/finetune_gpt2.py configs/experiments/gpt2_wikitext2_dadapt_adam.yaml

Data: ``--dataset_name`` (``offline:pydoc`` / ``offline:shakespeare`` / ``offline:kjv``, a local
file or directory, or a hub name with ``--dataset_config_name``) or ``--train_file`` /
``--validation_file`` (.txt, .json, .jsonl, .csv, .parquet). Default: ``offline:pydoc`` with
``offline:gpt2-tiny``.

Resume: ``--resume_from_checkpoint DIR``, or rerun the same command: the last ``checkpoint-N`` in
``output_dir`` is picked up (``--overwrite_output_dir`` starts over).
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import HfArgumentParser, default_data_collator, set_seed

from hf_tuningfree.hf import TuningFreeTrainer
from hf_tuningfree.hf.clm import limit_samples, resolve_block_size, tokenize_and_group
from hf_tuningfree.hf.pipeline import (
    USER_ERRORS,
    FinetuneResult,
    find_resume_checkpoint,
    load_model,
    load_raw_data,
    logger,
    maybe_write_rank_report,
    model_card_fields,
    parse_script_arguments,
    require_split,
    setup_logging,
    train_evaluate_save,
)
from hf_tuningfree.hf.script_args import DataArguments, FinetuneTrainingArguments, ModelArguments

DEFAULT_MODEL = "offline:gpt2-tiny"
DEFAULT_DATASET = "offline:pydoc"


def build_parser() -> HfArgumentParser:
    """The argument groups: model, data, training (with the tuning-free optimizers)."""
    return HfArgumentParser((ModelArguments, DataArguments, FinetuneTrainingArguments))


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FinetuneTrainingArguments,
) -> FinetuneResult:
    """Train, evaluate and save as the arguments say."""
    checkpoint = find_resume_checkpoint(training_args)
    set_seed(training_args.seed)
    resolved = load_model(model_args, default=DEFAULT_MODEL, seed=training_args.seed)
    model, tokenizer = resolved.model, resolved.tokenizer
    raw = load_raw_data(data_args, default=DEFAULT_DATASET, cache_dir=model_args.cache_dir)
    block_size = resolve_block_size(tokenizer, model.config, data_args.block_size)
    wanted = {}
    if training_args.do_train:
        wanted["train"] = require_split(raw, data_args.train_split_name, "train_split_name")
    if training_args.do_eval:
        wanted["eval"] = require_split(
            raw, data_args.validation_split_name, "validation_split_name"
        )
    blocks = tokenize_and_group(
        type(raw)(wanted),
        tokenizer,
        block_size,
        text_column_name=data_args.text_column_name,
        num_proc=data_args.preprocessing_num_workers,
        load_from_cache_file=not data_args.overwrite_cache,
        main_process_first=training_args.main_process_first,
    )
    train = (
        limit_samples(blocks["train"], data_args.max_train_samples) if "train" in blocks else None
    )
    evaluation = (
        limit_samples(blocks["eval"], data_args.max_eval_samples) if "eval" in blocks else None
    )
    logger.info(
        "%s: block_size %d, %s train / %s eval blocks, world size %d",
        resolved.description,
        block_size,
        len(train) if train is not None else 0,
        len(evaluation) if evaluation is not None else 0,
        training_args.world_size,
    )
    trainer = TuningFreeTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    dataset = data_args.dataset_name or data_args.train_file or DEFAULT_DATASET
    metrics = train_evaluate_save(
        trainer,
        training_args,
        resume_from_checkpoint=checkpoint,
        train_samples=len(train) if train is not None else None,
        eval_samples=len(evaluation) if evaluation is not None else None,
        model_card=model_card_fields(
            resolved,
            training_args.output_dir,
            str(dataset),
            tasks="text-generation",
            dataset_args=data_args.dataset_config_name,
        ),
    )
    maybe_write_rank_report(trainer)
    return FinetuneResult(metrics, trainer, Path(training_args.output_dir))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse ``argv`` (a config file and/or options) and run; bad input exits with a message."""
    try:
        model_args, data_args, training_args = parse_script_arguments(build_parser(), argv)
        setup_logging(training_args)
        return run(model_args, data_args, training_args).metrics
    except USER_ERRORS as error:
        raise SystemExit(f"finetune_gpt2.py: error: {error}") from error


if __name__ == "__main__":
    main(sys.argv[1:])
