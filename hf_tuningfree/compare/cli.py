"""``hf-tuningfree compare``: did the untuned optimizer match a tuned baseline?

On one model and data set it runs every tuning-free optimizer at its registry defaults, AdamW over
a log-spaced learning-rate grid and AdamW at the stock Trainer learning rate, all with the same
seeds, data order, steps and evaluation; then writes JSON, CSV, a markdown table, plots and a
plain-words summary. Runs are cached, so an interrupted comparison resumes where it stopped.

    hf-tuningfree compare                       # offline default (~3 min on 2 CPU cores)
    python -m hf_tuningfree.compare --steps 300 --seeds 0 1 2
    hf-tuningfree compare --model offline:gpt2-tiny --data my_corpus.txt --steps 200
    hf-tuningfree compare --model offline:llama-tiny --train-file mc_train.jsonl \\
        --validation-file mc_val.jsonl --lora --lora-target-modules q_proj v_proj

Any model and data the fine-tuning scripts accept (task kind ``custom``, implied by ``--model``,
``--data`` or ``--train-file``): the model an ``offline:NAME``, a local directory or a hub name
(online), optionally with LoRA; the data an ``offline:NAME``, local files or a directory, or a hub
name. Plain text trains a causal LM on blocks (as ``run_clm.py``); MMLU-format questions,
prompt/completion or instruction rows train one supervised example per row, and MMLU-format data is
scored after training (its test split, else validation). Loss is evaluated on the validation split
(5% of train when the data has none).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hf_tuningfree.argtypes import nonnegative_int, positive_float, positive_int
from hf_tuningfree.compare.spec import (
    ADAMW,
    CUSTOM,
    TASK_GRIDS,
    RunSpec,
    TaskSpec,
    build_runs,
    log_grid,
    parse_optimizers,
)

#: AdamW grids per task kind: from-scratch training wants larger steps than LoRA fine-tuning.
DEFAULT_GRIDS = TASK_GRIDS
#: ``custom`` tasks: a random-init model trained from scratch, or fine-tuning (pretrained, LoRA).
CUSTOM_GRIDS = {"from-scratch": (1e-4, 1e-1), "fine-tuning": (1e-5, 1e-2)}

#: Options that describe a ``custom`` task (argparse dest -> option string).
CUSTOM_OPTIONS = {
    "model": "--model",
    "tokenizer": "--tokenizer",
    "config_overrides": "--config-overrides",
    "data": "--data",
    "data_config": "--data-config",
    "train_file": "--train-file",
    "validation_file": "--validation-file",
    "text_column": "--text-column",
    "lora": "--lora",
    "lora_r": "--lora-r",
    "lora_alpha": "--lora-alpha",
    "lora_dropout": "--lora-dropout",
    "lora_target_modules": "--lora-target-modules",
    "mc_split": "--mc-split",
}
#: Options that size any task kind (to shrink a fixed kind for a quick check, e.g.
#: ``--task smollm2-lora --steps 4 --max-eval-samples 12 --mc-max-questions 12``).
SIZE_OPTIONS = {
    "max_eval_samples": "--max-eval-samples",
    "mc_shots": "--mc-shots",
    "mc_max_questions": "--mc-max-questions",
}
#: How many times ``--extend-grid`` may add a learning rate beyond an end of the grid.
MAX_GRID_EXTENSIONS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        nargs="+",
        default=None,
        help="task kind: offline-gpt2 (the default), smollm2-lora, gpt2-long, gpt2-shift-ft, "
        "gpt2-shift-lora, or custom (any model and data; implied by --model, --data or "
        "--train-file, which the fixed kinds reject); several kinds: a suite run (see --suite)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        help="registry names or variants NAME:KEY=VALUE,... (e.g. prodigy:d_coef=2,beta3=0.99), "
        "labelled by their canonical spelling (default: every tuning-free optimizer)",
    )
    parser.add_argument(
        "--adamw-lrs",
        nargs="+",
        type=positive_float,
        default=None,
        help="explicit AdamW learning rates (default: a log-spaced grid)",
    )
    parser.add_argument(
        "--grid-points", type=positive_int, default=7, help="AdamW grid points (default 7)"
    )
    parser.add_argument(
        "--grid-low", type=positive_float, default=None, help="lowest AdamW lr of the grid"
    )
    parser.add_argument(
        "--grid-high", type=positive_float, default=None, help="highest AdamW lr of the grid"
    )
    parser.add_argument(
        "--extend-grid",
        action="store_true",
        help="when the best AdamW lr is an end of the grid, add the next lr beyond it (one "
        f"log-step of the grid) and run it, up to {MAX_GRID_EXTENSIONS} times per end; without "
        "it the summary warns, as the tuned baseline may then be better than the grid shows",
    )
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps per run")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=nonnegative_int,
        default=None,
        help="seeds of each configuration (default 0; a suite: 0 1 2)",
    )
    parser.add_argument("--output-dir", default=None)
    parser.add_argument(
        "--workers",
        type=nonnegative_int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default 2; 0 runs in this process, one after another)",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-stock-adamw", action="store_true",
                        help="skip AdamW at the stock Trainer lr (5e-5)")  # fmt: skip
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="examples per step (default: the task's; custom 8)",
    )
    parser.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        help="tokens per text block / longest supervised example (default: the task's; custom 128)",
    )
    sizes = parser.add_argument_group(
        "evaluation size (any task kind)",
        "Shrink a comparison for a quick check, e.g. --task smollm2-lora --steps 4 "
        "--max-eval-samples 12 --mc-max-questions 12. The fixed kinds draw their evaluation and "
        "scored questions from the synthetic benchmark's six subjects, so a count is rounded up "
        "to a multiple of six.",
    )
    sizes.add_argument(
        "--max-eval-samples",
        type=positive_int,
        default=None,
        help="evaluation blocks / examples (default: the task's; custom 64)",
    )
    sizes.add_argument(
        "--mc-shots",
        type=nonnegative_int,
        default=None,
        help="k of the k-shot scoring prompts, from the dev split (default 0)",
    )
    sizes.add_argument(
        "--mc-max-questions",
        type=positive_int,
        default=None,
        help="multiple-choice questions scored after training, a fixed subset (default: the "
        "task's; custom 200)",
    )
    from hf_tuningfree.compare.suite import add_suite_arguments

    add_suite_arguments(parser)
    _add_custom_arguments(
        parser.add_argument_group(
            "any model and data (task kind custom)",
            "The model and data arguments of scripts/finetune_gpt2.py and finetune_llama_lora.py. "
            "Any of them selects --task custom; with --task offline-gpt2 or smollm2-lora they are "
            "an error.",
        )
    )


def _add_custom_arguments(group: argparse._ActionsContainer) -> None:
    """The options of a ``custom`` task (every default is ``None``: unset options do not select
    the custom kind)."""
    group.add_argument(
        "--model",
        default=None,
        help="offline:NAME (offline:gpt2-tiny, offline:gpt2-small, "
        "offline:llama-tiny, offline:smollm2-135m-instruct), a directory written "
        "by save_pretrained, or a hub model id (online). Default offline:gpt2-tiny "
        "(with --lora offline:smollm2-135m-instruct)",
    )
    group.add_argument(
        "--tokenizer",
        default=None,
        help="another tokenizer than the model's (same kinds as --model)",
    )
    group.add_argument(
        "--config-overrides",
        default=None,
        help="random-init offline models only: config fields, e.g. 'n_embd=64,n_layer=4'",
    )
    group.add_argument(
        "--data",
        default=None,
        help="offline:NAME (offline:shakespeare, offline:kjv, offline:pydoc, "
        "offline:synthetic-mc), a local .txt/.json/.jsonl/.csv/.parquet file or "
        "a directory of them, or a hub dataset name (online). Default "
        "offline:pydoc (with --lora offline:synthetic-mc)",
    )
    group.add_argument(
        "--data-config",
        default=None,
        help="the hub dataset's configuration, e.g. wikitext-2-raw-v1",
    )
    group.add_argument(
        "--train-file", nargs="+", default=None, help="local training file(s) instead of --data"
    )
    group.add_argument(
        "--validation-file",
        nargs="+",
        default=None,
        help="local evaluation file(s) (default: the first 5%% of the training data)",
    )
    group.add_argument(
        "--text-column",
        default=None,
        help="train a causal LM on this column (default: decided by the "
        "columns: MMLU-format, prompt/completion and instruction rows are "
        "supervised examples; otherwise 'text', else the first column)",
    )
    group.add_argument(
        "--lora", action="store_true", default=None, help="train LoRA adapters only (PEFT)"
    )
    group.add_argument("--lora-r", type=positive_int, default=None, help="LoRA rank (default 16)")
    group.add_argument(
        "--lora-alpha",
        type=positive_int,
        default=None,
        help="LoRA alpha; the update is scaled by alpha/r (default 32)",
    )
    group.add_argument(
        "--lora-dropout", type=float, default=None, help="dropout on the LoRA branch (default 0)"
    )
    group.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        help="linear layers that get adapters (default q_proj k_proj v_proj o_proj; GPT-2: c_attn)",
    )
    group.add_argument(
        "--mc-split",
        default=None,
        help="MMLU-format split to score after training: auto (test, else "
        "validation, when the data has the question/subject/choices/answer "
        "columns; the default), a split name, or none",
    )


def _custom_options_given(args: argparse.Namespace) -> list[str]:
    return [flag for dest, flag in CUSTOM_OPTIONS.items() if getattr(args, dest, None) is not None]


def _sized_fixed_task(task: TaskSpec, args: argparse.Namespace) -> TaskSpec:
    """A fixed task kind with the command line's sizes (batch, block, evaluation, scoring)."""
    from hf_tuningfree.data.synthetic_mc import SUBJECTS

    def per_subject(count: int) -> int:
        return math.ceil(count / len(SUBJECTS))

    changes: dict[str, Any] = {
        k: v
        for k, v in (("batch_size", args.batch_size), ("block_size", args.block_size),
                     ("mc_shots", args.mc_shots))
        if v is not None
    }  # fmt: skip
    options = dict(task.options)
    if args.max_eval_samples is not None:
        if task.kind == "offline-gpt2":  # text blocks of the validation split
            options["max_eval_blocks"] = args.max_eval_samples
        else:  # supervised examples: validation questions, per subject
            options["mc_validation"] = per_subject(args.max_eval_samples)
    if args.mc_max_questions is not None:
        changes["mc_questions_per_subject"] = per_subject(args.mc_max_questions)
    if options != task.options:
        changes["options"] = options
    return dataclasses.replace(task, **changes)


def task_from_args(args: argparse.Namespace) -> TaskSpec:
    """The :class:`TaskSpec` the command line describes.

    Raises:
        SystemExit: custom-task options with a fixed task kind, or invalid custom options.
    """
    from hf_tuningfree.compare.tasks import custom_task, default_task

    given = _custom_options_given(args)
    task = args.task[0] if isinstance(args.task, list) else args.task  # one kind here
    kind = task or (CUSTOM if given else "offline-gpt2")
    if kind != CUSTOM:
        if given:
            raise SystemExit(
                f"hf-tuningfree compare: error: {' and '.join(given)} describe a custom task "
                f"(any model and data), not --task {kind}; drop --task: they imply --task custom"
            )
        try:
            return _sized_fixed_task(default_task(kind, args.steps), args)
        except ValueError as error:
            raise SystemExit(f"hf-tuningfree compare: error: --task {kind}: {error}") from None
    custom = {dest: getattr(args, dest, None) for dest in CUSTOM_OPTIONS}
    custom.update({dest: getattr(args, dest, None) for dest in SIZE_OPTIONS})
    lora_options = [flag for flag in given if flag.startswith("--lora-")]
    if lora_options and not custom["lora"]:
        raise SystemExit(f"hf-tuningfree compare: error: {' and '.join(lora_options)} need --lora")
    mc_split = custom.pop("mc_split")
    renamed = {"train_file": "train_files", "validation_file": "validation_files"}
    kwargs = {renamed.get(k, k): v for k, v in custom.items() if v is not None}
    try:
        return custom_task(
            max_steps=args.steps,
            batch_size=args.batch_size,
            block_size=args.block_size,
            mc_split=None if mc_split == "none" else mc_split or "auto",
            **kwargs,
        )
    except ValueError as error:
        raise SystemExit(f"hf-tuningfree compare: error: {error}") from error


def default_grid(task: TaskSpec) -> tuple[float, float]:
    """The AdamW grid's ends for ``task``: per fixed kind; for a custom task by whether it trains
    a random-init model from scratch or fine-tunes."""
    if task.kind in DEFAULT_GRIDS:
        return DEFAULT_GRIDS[task.kind]
    from hf_tuningfree.data.resolve import OFFLINE_MODELS, OFFLINE_PREFIX

    offline = OFFLINE_MODELS.get(task.model.removeprefix(OFFLINE_PREFIX))
    from_scratch = offline is not None and offline.config is not None
    if from_scratch and not task.options.get("lora"):
        return CUSTOM_GRIDS["from-scratch"]
    return CUSTOM_GRIDS["fine-tuning"]


def default_output_dir(task: TaskSpec) -> Path:
    """``outputs/compare-KIND``; a custom task adds its model's and data's names."""
    if task.kind != CUSTOM:
        return Path(f"outputs/compare-{task.kind}")
    data = task.options.get("train_files", [task.data])[0]
    names = [Path(task.model.removeprefix("offline:")).name, Path(data.removeprefix("offline:"))]
    slug = "-".join([names[0], names[1].stem or names[1].name])
    return Path("outputs") / ("compare-custom-" + re.sub(r"[^A-Za-z0-9._-]+", "-", slug)[:80])


def check_task(task: TaskSpec, output_dir: Path) -> None:
    """Build a custom task in this process before any run starts (when some run is not cached),
    so that a bad model or data name, a missing column or an offline hub name stops the command
    with one message (workers build it again; with ``--workers 0`` the runs reuse this build).
    For ``smollm2-lora``, convert the model from its GGUF file here, once, so that the message
    saying so reaches the console (the workers' output goes to the runs' log files).

    Raises:
        SystemExit: the task cannot be built from the user's input.
    """
    if task.kind == "smollm2-lora":  # converted once (~30 s), here where its message is seen
        from hf_tuningfree.data.assets import smollm2_dir
        from hf_tuningfree.data.packages import MissingAssetError

        try:
            smollm2_dir()
        except MissingAssetError as error:
            raise SystemExit(f"hf-tuningfree compare: error: {error}") from error
        return
    if task.kind != CUSTOM:
        return
    import datasets

    from hf_tuningfree.compare.tasks import build_task
    from hf_tuningfree.hf.pipeline import USER_ERRORS

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the console shows the comparison's progress only
    try:
        build_task(task, output_dir / "cache")
    except (*USER_ERRORS, ValueError) as error:
        raise SystemExit(f"hf-tuningfree compare: error: {error}") from error
    finally:
        if bars:
            datasets.enable_progress_bars()


def console_printer() -> Callable[[str], None]:
    """A line printer to this process's stdout as it is now: it keeps writing to the console
    while a run in this process sends file descriptor 1 to its log file (``--workers 0``), and it
    is unbuffered (``os.write``), so the Ctrl-C handler may call it while a line is being written
    (``signal_safe``)."""
    try:
        sys.stdout.flush()
        fd = os.dup(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no real stdout (captured): print as usual
        return lambda text: print(text, flush=True)

    def write(text: str) -> None:
        data = (text + "\n").encode("utf-8", errors="replace")
        while data:
            data = data[os.write(fd, data) :]

    write.signal_safe = True  # type: ignore[attr-defined]
    return write


def _grid_extension(
    results: list[dict[str, Any]], runs: list[RunSpec], seeds: list[int]
) -> tuple[str | None, list[RunSpec]]:
    """Where the best AdamW lies (``"low"``/``"high"`` end of the grid, or None) and the runs
    ``--extend-grid`` adds there: the lr one log-step of the grid beyond that end."""
    from hf_tuningfree.compare.results import aggregate, grid_edge

    edge = grid_edge(aggregate(results))
    lrs = sorted({r.lr for r in runs if r.role == "adamw-grid" and r.lr is not None})
    if edge is None or len(lrs) < 2:
        return None, []
    beyond = lrs[-1] * lrs[-1] / lrs[-2] if edge == "high" else lrs[0] * lrs[0] / lrs[1]
    lr = float(f"{beyond:.3g}")
    return edge, [RunSpec(ADAMW, lr, seed, "adamw-grid") for seed in seeds]


def run(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Run the comparison the command line describes and write its outputs.

    Raises:
        SystemExit: bad input (one line naming the option).
        ComparisonInterrupted: Ctrl-C; the finished runs are cached.
    """
    from hf_tuningfree.compare.report import write_outputs
    from hf_tuningfree.compare.runner import load_cached, run_comparison
    from hf_tuningfree.compare.suite import requested_tasks, run_suite
    from hf_tuningfree.optim import available_optimizers

    say = progress or console_printer()
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"hf-tuningfree compare: error: --seeds repeats a seed: {args.seeds}")
    if requested_tasks(args) is not None:  # --suite or several --task kinds
        return run_suite(args, _custom_options_given(args), progress=say)
    task = task_from_args(args)
    try:
        optimizers = parse_optimizers(args.optimizers or [])
    except ValueError as error:
        raise SystemExit(f"hf-tuningfree compare: error: --optimizers: {error}") from error
    optimizers = optimizers or available_optimizers(tuning_free_only=True, aliases=False)
    seeds = args.seeds or [0]
    low, high = default_grid(task)
    low, high = args.grid_low or low, args.grid_high or high
    if args.adamw_lrs is None and low > high:
        raise SystemExit(
            f"hf-tuningfree compare: error: --grid-low {low:g} is above --grid-high {high:g}"
        )
    lrs = args.adamw_lrs or log_grid(low, high, args.grid_points)
    runs = build_runs(optimizers, lrs, seeds, include_stock=not args.no_stock_adamw)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(task)
    if any(load_cached(output_dir, task, r) is None for r in runs):
        check_task(task, output_dir)
    say(
        f"hf-tuningfree compare: {task.kind}, {task.max_steps} steps, {len(optimizers)} "
        f"tuning-free optimizer(s) + AdamW at {len(lrs)} learning rates, seeds {seeds}: "
        f"{len(runs)} runs, {args.workers} worker(s); output in {output_dir}"
    )
    start = time.perf_counter()
    results = run_comparison(task, runs, output_dir, workers=args.workers, progress=say)
    extended = {"low": 0, "high": 0}
    while args.extend_grid:
        edge, extra = _grid_extension(results, runs, seeds)
        if edge is None or extended[edge] >= MAX_GRID_EXTENSIONS:
            break
        extended[edge] += 1
        say(
            f"--extend-grid: the best AdamW lr is the {edge} end of the grid; "
            f"adding lr={extra[0].lr:g}"
        )
        runs += extra
        results += run_comparison(task, extra, output_dir, workers=args.workers, progress=say)
    paths = write_outputs(results, task, output_dir, plots=not args.no_plots)
    say("")
    say(paths["markdown"].read_text(encoding="utf-8"))
    say(f"finished in {time.perf_counter() - start:.0f}s; written:")
    for name, path in paths.items():
        say(f"  {name:<18} {path}")
    return paths


def run_command(args: argparse.Namespace, *, exiting: bool = False) -> int:
    """``run(args)`` as a command: 0, or 130 after Ctrl-C (with a line saying what is kept).

    ``exiting``: the process ends after this (the command line): after a Ctrl-C, further ones
    are ignored, so a quick second Ctrl-C cannot interrupt the interpreter's shutdown with a
    traceback.
    """
    from hf_tuningfree.compare.runner import ComparisonInterrupted

    say = console_printer()
    try:
        run(args, progress=say)
    except ComparisonInterrupted as stop:
        _ignore_further_interrupts(exiting)
        say(
            f"hf-tuningfree compare: {stop}; run the same command again to continue (the cached "
            "runs are not trained again)"
        )
        return 130
    except KeyboardInterrupt:  # before the runs started (building the task)
        _ignore_further_interrupts(exiting)
        say("hf-tuningfree compare: interrupted before any run started")
        return 130
    return 0


def _ignore_further_interrupts(exiting: bool) -> None:
    if exiting and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-tuningfree compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, *, exiting: bool = False) -> int:
    """``hf-tuningfree compare ARGV``; the exit status (130 after Ctrl-C). ``exiting``: see
    :func:`run_command`."""
    return run_command(build_parser().parse_args(argv), exiting=exiting)
