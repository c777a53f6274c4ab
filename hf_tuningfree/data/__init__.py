"""Data for evaluation and fine-tuning: MMLU-format files and a synthetic benchmark (datasets).

- :mod:`hf_tuningfree.data.mmlu_format`: load and validate data in the ``cais/mmlu`` schema
  (Hendrycks et al., "Measuring Massive Multitask Language Understanding", ICLR 2021).
- :mod:`hf_tuningfree.data.synthetic_mc`: the project's offline synthetic multiple-choice
  benchmark in MMLU format (not MMLU).
"""

from __future__ import annotations

from hf_tuningfree.data.mmlu_format import (
    HubOfflineError,
    MMLUFormatError,
    load_mmlu_file,
    load_mmlu_format,
    rows_to_dataset,
    validate_row,
    write_jsonl,
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
    "SUBJECTS",
    "SYNTHETIC",
    "SYNTHETIC_BENCHMARK_NAME",
    "HubOfflineError",
    "MMLUFormatError",
    "describe_source",
    "load_mmlu_file",
    "load_mmlu_format",
    "load_multiple_choice",
    "make_synthetic_mc",
    "rows_to_dataset",
    "synthetic_mc_rows",
    "validate_row",
    "write_jsonl",
    "write_synthetic_mc",
]
