"""Task builders: turn a :class:`TaskSpec` into a tokenizer, datasets, a model factory and the
multiple-choice questions to score after training.

``offline-gpt2``: a small GPT-2-architecture model trained from scratch on an offline English
corpus mixed with solved questions of the synthetic multiple-choice benchmark (MMLU format), with a
byte-level BPE tokenizer trained on that text (a 50k-token vocabulary would spend most of a CPU
step in the output layer). Everything is built locally; nothing touches the model hub.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from hf_tuningfree.compare.spec import TaskSpec

TASK_KINDS = ("offline-gpt2",)


@dataclass
class BuiltTask:
    tokenizer: Any
    train_dataset: datasets.Dataset
    eval_dataset: datasets.Dataset
    make_model: Callable[[int], torch.nn.Module]
    mc_test: datasets.Dataset | None
    mc_dev: datasets.Dataset | None


def _corpus_name(data: str) -> str:
    from hf_tuningfree.data.corpora import available_corpora

    name = data.removeprefix("offline:")
    if name not in available_corpora():
        raise ValueError(
            f"Unknown offline corpus {data!r}; available: "
            + ", ".join(f"offline:{c}" for c in available_corpora())
        )
    return name


def _mc_texts(rows: list[dict]) -> list[str]:
    from hf_tuningfree.eval.prompts import get_format, solved_example, subject_text

    fmt = get_format("letters")
    return [
        "The following are multiple choice questions (with answers) about "
        f"{subject_text(r['subject'])}.\n\n{solved_example(r, fmt)}"
        for r in rows
    ]


def group_texts(
    texts: list[str], tokenizer: Any, block_size: int, max_blocks: int | None = None
) -> datasets.Dataset:
    """Tokenise, join with EOS and cut into ``block_size`` blocks (labels = inputs), as
    ``run_clm.py`` does; the remainder shorter than a block is dropped. Stops after
    ``max_blocks`` blocks (a run of N steps with batch B reads N*B blocks)."""
    ids: list[int] = []
    limit = None if max_blocks is None else (max_blocks + 1) * block_size
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
        if limit is not None and len(ids) >= limit:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def build_offline_gpt2(spec: TaskSpec, cache_dir: Path) -> BuiltTask:
    from transformers import GPT2LMHeadModel

    from hf_tuningfree.data import make_synthetic_mc
    from hf_tuningfree.data.assets import load_corpus_tokenizer
    from hf_tuningfree.data.corpora import load_text_corpus
    from hf_tuningfree.data.model_configs import small_gpt2_config

    opts = spec.options
    corpus = _corpus_name(spec.data)
    text = load_text_corpus(corpus)
    mc = make_synthetic_mc(
        0,
        n_test=spec.mc_questions_per_subject,
        n_validation=opts.get("mc_validation", 10),
        n_train=opts.get("mc_train", 150),
    )
    train_texts = list(text["train"]["text"]) + _mc_texts(list(mc["auxiliary_train"]))
    eval_texts = list(text["validation"]["text"]) + _mc_texts(list(mc["validation"]))
    random.Random(1).shuffle(train_texts)
    random.Random(2).shuffle(eval_texts)
    tokenizer = load_corpus_tokenizer(corpus, opts.get("vocab_size", 4096))
    # one pass over the data: every run reads the same blocks in the same order
    max_train = opts.get("max_train_blocks", spec.max_steps * spec.batch_size)
    train = group_texts(train_texts, tokenizer, spec.block_size, max_blocks=max_train)
    evaluation = group_texts(
        eval_texts, tokenizer, spec.block_size, max_blocks=opts.get("max_eval_blocks", 48)
    )
    overrides = {k: opts[k] for k in ("n_embd", "n_layer", "n_head") if k in opts}

    def make_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        # room for multiple-choice prompts longer than a training block
        positions = max(spec.block_size, opts.get("n_positions", 256))
        return GPT2LMHeadModel(
            small_gpt2_config(len(tokenizer), n_positions=positions, **overrides)
        )

    return BuiltTask(tokenizer, train, evaluation, make_model, mc["test"], mc["dev"])


BUILDERS: dict[str, Callable[[TaskSpec, Path], BuiltTask]] = {"offline-gpt2": build_offline_gpt2}


def build_task(spec: TaskSpec, cache_dir: Path) -> BuiltTask:
    if spec.kind not in BUILDERS:
        raise ValueError(f"Unknown task kind {spec.kind!r}; available: {sorted(BUILDERS)}")
    return BUILDERS[spec.kind](spec, cache_dir)


def default_task(kind: str, max_steps: int | None = None) -> TaskSpec:
    """The default :class:`TaskSpec` of a task kind (``max_steps`` overrides its budget)."""
    if kind == "offline-gpt2":
        return offline_default_task(max_steps or 150)
    raise ValueError(f"Unknown task kind {kind!r}; available: {sorted(BUILDERS)}")


def offline_default_task(max_steps: int = 150) -> TaskSpec:
    """The offline default of ``hf-tuningfree compare`` (sized for ~4 minutes on 2 CPU cores)."""
    return TaskSpec(
        kind="offline-gpt2",
        model="gpt2-small-from-scratch",
        data="offline:shakespeare",
        max_steps=max_steps,
        batch_size=8,
        block_size=128,
        eval_every=max(1, max_steps // 6),
        logging_every=5,
        mc_shots=0,
        mc_questions_per_subject=20,
    )
