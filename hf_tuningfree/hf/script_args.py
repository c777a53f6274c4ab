"""Argument groups shared by the fine-tuning scripts, in the style of Hugging Face's
``examples/pytorch/language-modeling/run_clm.py``: dataclasses whose fields' ``metadata["help"]``
becomes ``--help``, parsed with ``HfArgumentParser`` from the command line or from a YAML / JSON
file (``configs/experiments/*.yaml``) together with the training arguments::

    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, TrainingArgs))
    model_args, data_args, lora_args, training_args = parser.parse_yaml_file("configs/....yaml")

The scripts parse with :func:`hf_tuningfree.hf.pipeline.parse_script_arguments` (a config file
plus command-line overrides) and use :class:`FinetuneTrainingArguments` (training and evaluation on
by default, ``overwrite_output_dir``); the LoRA script adds :class:`MMLUScoringArguments`.

``model_name_or_path``, ``tokenizer_name`` and ``dataset_name`` accept an offline default
(``offline:NAME``), a local path or a hub name; see :mod:`hf_tuningfree.data.resolve`, whose
:func:`~hf_tuningfree.data.resolve.resolve_model_source` and
:func:`~hf_tuningfree.data.resolve.resolve_dataset` take these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hf_tuningfree.data.resolve import offline_names
from hf_tuningfree.hf.training_args import TuningFreeTrainingArguments

_OFFLINE_MODELS = ", ".join(offline_names("model"))
_OFFLINE_DATASETS = ", ".join(offline_names("dataset"))


@dataclass
class ModelArguments:
    """Which model and tokenizer to fine-tune, and how to load them."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model to fine-tune: an offline default (" + _OFFLINE_MODELS + "), a "
            "directory written by save_pretrained, or a hub model id (online). Default: the "
            "script's offline default."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer, if not the model's: offline:gpt2, offline:shakespeare-bpe4k, "
            "offline:smollm2-135m-instruct, a directory or a hub id. Random-init offline models "
            "size their vocabulary to it."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "For random-init offline models only: override config fields, e.g. "
            "'n_embd=64,n_layer=4' (as run_clm.py)."
        },
    )
    model_revision: str = field(
        default="main", metadata={"help": "Hub revision (branch, tag or commit) of the model."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where hub downloads are stored (default: HF's cache)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights' dtype when loading. 'auto' takes the checkpoint's; default float32. "
            "For mixed-precision training keep float32 weights and set bf16 in the training "
            "arguments; pure bfloat16 weights suit LoRA on a frozen base.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel: 'sdpa' (PyTorch's fused attention, the default where "
            "supported), 'eager', 'flash_attention_2' (needs flash-attn and a GPU)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow a hub model's own Python code to run (only for models you trust)."
        },
    )


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how to cut it into blocks."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset: an offline default (" + _OFFLINE_DATASETS + "), a local file or "
            "directory, or a hub dataset name (online, e.g. wikitext). Default: the script's "
            "offline default."
        },
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={"help": "The hub dataset's configuration, e.g. wikitext-2-raw-v1."},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training data file (.txt, .json, .jsonl, .csv, .parquet)."},
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Evaluation data file (same formats as train_file)."},
    )
    train_split_name: str = field(
        default="train",
        metadata={
            "help": "Split to train on ('auxiliary_train' for MMLU-format multiple-choice data)."
        },
    )
    validation_split_name: str = field(
        default="validation", metadata={"help": "Split to evaluate on."}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "When the data has no validation split: the first this many percent of the "
            "training split become one."
        },
    )
    text_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the text (default: 'text', else the first column)."},
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training sequence after concatenating and chunking the texts. "
            "Default: the model's context length, at most 1024."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Keep only this many training examples, for quick runs (causal-LM text: "
            "blocks after grouping; multiple-choice data: questions)."
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Keep only this many evaluation examples (as max_train_samples)."},
    )
    keep_linebreaks: bool = field(
        default=True, metadata={"help": "For .txt files: keep each line's line break."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenisation (datasets.map num_proc)."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Recompute tokenisation instead of reusing the cache."}
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={
            "help": "LoRA script, prompt/completion data (MMLU-format questions, prompt/completion "
            "or instruction/output columns): compute the loss on the completion and its EOS only "
            "(as TRL's SFTTrainer does); false: on the prompt too."
        },
    )


@dataclass
class LoraArguments:
    """PEFT LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022)."""

    lora_r: int = field(default=16, metadata={"help": "Rank of the LoRA update matrices."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling numerator: the update is scaled by alpha/r."}
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the LoRA branch's input."}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get LoRA adapters (LLaMA attention projections)."},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "After training, also save the base model with the adapter merged in."},
    )


@dataclass
class MMLUScoringArguments:
    """Optional MMLU-style scoring of the fine-tuned model after training (LoRA script)."""

    score_mmlu: bool = field(
        default=False,
        metadata={
            "help": "After training, score the model with the MMLU-style log-likelihood "
            "evaluation (hf_tuningfree.eval.score_mmlu) and add mmlu_* to the metrics."
        },
    )
    mmlu_data: str | None = field(
        default=None,
        metadata={
            "help": "MMLU-format data to score (same kinds as dataset_name); default: the "
            "training data, which then needs the test split."
        },
    )
    mmlu_split: str = field(default="test", metadata={"help": "Split to score."})
    mmlu_fewshot_split: str = field(
        default="dev", metadata={"help": "Split the few-shot examples come from."}
    )
    mmlu_shots: int = field(default=5, metadata={"help": "k of the k-shot prompt (0 allowed)."})
    mmlu_variant: str = field(
        default="letters",
        metadata={
            "help": "Score the letters (MMLU) or the answer texts (lm-eval's mmlu_continuation).",
            "choices": ["letters", "continuation"],
        },
    )
    mmlu_max_questions: int | None = field(
        default=None, metadata={"help": "Score only the first N questions of the split."}
    )
    mmlu_batch_size: int = field(default=16, metadata={"help": "Rows per scoring forward pass."})


ARGUMENT_GROUPS: tuple[type, ...] = (
    ModelArguments,
    DataArguments,
    LoraArguments,
    MMLUScoringArguments,
)


def field_names(*groups: type) -> set[str]:
    """Every field name of the given dataclasses (default: :data:`ARGUMENT_GROUPS`)."""
    return {f.name for group in (groups or ARGUMENT_GROUPS) for f in dataclasses.fields(group)}


@dataclass
class FinetuneTrainingArguments(TuningFreeTrainingArguments):
    """``TuningFreeTrainingArguments`` for the fine-tuning scripts.

    - ``do_train`` / ``do_eval`` default to true (the scripts train, then evaluate; pass
      ``--do_train false`` to only evaluate a model);
    - ``overwrite_output_dir`` (transformers 5 removed it from ``TrainingArguments``): the scripts
      resume from the last ``checkpoint-N`` in ``output_dir`` and refuse a non-empty
      ``output_dir`` without checkpoints unless it is set.
    """

    do_train: bool = field(
        default=True, metadata={"help": "Train (default true; false: evaluate only)."}
    )
    do_eval: bool = field(
        default=True, metadata={"help": "Evaluate after training (loss and perplexity)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start from scratch in a non-empty output_dir instead of resuming from its "
            "last checkpoint (or refusing, when it has none)."
        },
    )
