#!/usr/bin/env python
"""Score a causal LM on MMLU-format multiple choice (the MMLU paper's k-shot protocol, as in
lm-evaluation-harness); write per-subject results as JSON and print a table.

    python scripts/eval_mmlu.py --model DIR [--adapter DIR] [--data synthetic|FILES|cais/mmlu] \
        [--shots 5] [--output results.json]

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/eval_mmlu.py ...

``--data synthetic`` (the default) is the project's offline synthetic multiple-choice benchmark in
MMLU format, not MMLU. Local data: a directory with ``dev.jsonl``/``test.jsonl`` (or .json, .csv,
.parquet), or files, optionally as ``split=path``. Under ``accelerate launch`` the questions are
split across processes; the main process writes the output.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_tuningfree.data import (
    HubOfflineError,
    MMLUFormatError,
    describe_source,
    load_multiple_choice,
)
from hf_tuningfree.eval import process_state, score_mmlu


@dataclass
class EvalArguments:
    """Command-line arguments of ``eval_mmlu.py``."""

    model: str = field(
        metadata={"help": "Model directory (save_pretrained) or hub id when online."}
    )
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter directory."})
    data: list[str] = field(
        default_factory=lambda: ["synthetic"],
        metadata={"help": "'synthetic', a directory, files ('split=path' allowed), or a hub name."},
    )
    split: str = field(default="test", metadata={"help": "Split to score."})
    fewshot_split: str = field(default="dev", metadata={"help": "Split the shots come from."})
    shots: int = field(default=5, metadata={"help": "k of the k-shot prompt (0 allowed)."})
    variant: str = field(
        default="letters",
        metadata={
            "help": "Score letters (MMLU) or answer texts.",
            "choices": ["letters", "continuation"],
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Rows per forward pass."})
    max_length: int | None = field(default=None, metadata={"help": "Context size override."})
    padding_side: str = field(default="right", metadata={"choices": ["right", "left"]})
    limit: int | None = field(
        default=None, metadata={"help": "Score only the first N per subject."}
    )
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark."})
    synthetic_test_size: int = field(
        default=50, metadata={"help": "Synthetic questions per subject."}
    )
    output: str | None = field(default=None, metadata={"help": "Where to write the JSON results."})
    save_questions: bool = field(
        default=False, metadata={"help": "Add per-question scores to JSON."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})


def first_per_subject(rows, limit: int | None):
    """The first ``limit`` rows of every subject (all rows when ``limit`` is None)."""
    if limit is None:
        return rows
    seen: dict[str, int] = {}
    keep = []
    for i, subject in enumerate(rows["subject"]):
        seen[subject] = seen.get(subject, 0) + 1
        if seen[subject] <= limit:
            keep.append(i)
    return rows.select(keep)


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, score, print the table and write the JSON on the main process."""
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    try:
        data = load_multiple_choice(
            args.data, seed=args.synthetic_seed, n_test=args.synthetic_test_size
        )
    except (HubOfflineError, MMLUFormatError, FileNotFoundError) as err:
        raise SystemExit(f"--data: {err}") from err
    if args.split not in data:
        raise SystemExit(f"--split {args.split}: the data has splits {sorted(data)}")
    if args.shots > 0 and args.fewshot_split not in data:
        raise SystemExit(
            f"--shots {args.shots} needs the few-shot split {args.fewshot_split!r}, and the data "
            f"has splits {sorted(data)}: pass --shots 0, name the split with --fewshot_split, or "
            f"add a file for it (--data test=FILE {args.fewshot_split}=FILE)"
        )
    result = score_mmlu(
        args.model,
        first_per_subject(data[args.split], args.limit),
        fewshot=data.get(args.fewshot_split),
        adapter=args.adapter,
        shots=args.shots,
        variant=args.variant,
        batch_size=args.batch_size,
        max_length=args.max_length,
        padding_side=args.padding_side,
        progress=args.progress,
    )
    report = {
        "model": args.model,
        "adapter": args.adapter,
        "data": describe_source(args.data),
        "split": args.split,
        **result.to_dict(include_questions=args.save_questions),
    }
    if process_state().is_main_process:
        print(f"{report['data']} [{args.split}], {args.shots}-shot, {args.variant}")
        print(result.format_table())
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
