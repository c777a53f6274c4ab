"""Task builders: turn a :class:`TaskSpec` into a tokenizer, datasets, a model factory and the
multiple-choice questions to score after training.

``offline-gpt2``: a small GPT-2-architecture model trained from scratch on an offline English
corpus mixed with solved questions of the synthetic multiple-choice benchmark (MMLU format), with a
byte-level BPE tokenizer trained on that text (a 50k-token vocabulary would spend most of a CPU
step in the output layer). Everything is built locally; nothing touches the model hub.
"""

from __future__ import annotations

import hashlib
import json
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


def _corpus_texts(name: str) -> list[str]:
    """Paragraphs of an offline corpus (``pydoc``: the standard library's pydoc topics)."""
    if name in ("pydoc", "offline:pydoc"):
        from pydoc_data.topics import topics

        paragraphs = []
        for key in sorted(topics):
            paragraphs += [p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 40]
        return paragraphs
    raise ValueError(f"Unknown offline corpus {name!r}; available: offline:pydoc")


def _mc_texts(rows: list[dict]) -> list[str]:
    from hf_tuningfree.eval.prompts import get_format, solved_example, subject_text

    fmt = get_format("letters")
    return [
        "The following are multiple choice questions (with answers) about "
        f"{subject_text(r['subject'])}.\n\n{solved_example(r, fmt)}"
        for r in rows
    ]


def _train_tokenizer(texts: list[str], vocab_size: int, path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        path.mkdir(parents=True, exist_ok=True)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
        wrapped.pad_token = wrapped.eos_token
        wrapped.save_pretrained(str(path))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def group_texts(texts: list[str], tokenizer: Any, block_size: int) -> datasets.Dataset:
    """Tokenise, join with EOS and cut into ``block_size`` blocks (labels = inputs), as
    ``run_clm.py`` does; the remainder shorter than a block is dropped."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // block_size
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def build_offline_gpt2(spec: TaskSpec, cache_dir: Path) -> BuiltTask:
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_tuningfree.data import make_synthetic_mc

    opts = spec.options
    paragraphs = _corpus_texts(spec.data)
    random.Random(0).shuffle(paragraphs)
    n_eval = max(1, len(paragraphs) // 20)
    mc = make_synthetic_mc(
        0,
        n_test=spec.mc_questions_per_subject,
        n_validation=opts.get("mc_validation", 10),
        n_train=opts.get("mc_train", 150),
    )
    train_texts = paragraphs[n_eval:] + _mc_texts(list(mc["auxiliary_train"]))
    eval_texts = paragraphs[:n_eval] + _mc_texts(list(mc["validation"]))
    random.Random(1).shuffle(train_texts)
    vocab = opts.get("vocab_size", 2048)
    tokenizer = _train_tokenizer(
        train_texts, vocab, cache_dir / f"tokenizer-{_digest([spec.data, vocab, len(train_texts)])}"
    )
    train = group_texts(train_texts, tokenizer, spec.block_size)
    evaluation = group_texts(eval_texts, tokenizer, spec.block_size)
    max_eval = opts.get("max_eval_blocks", 48)
    evaluation = evaluation.select(range(min(max_eval, len(evaluation))))

    def make_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            # room for multiple-choice prompts longer than a training block
            n_positions=max(spec.block_size, opts.get("n_positions", 256)),
            n_embd=opts.get("n_embd", 64),
            n_layer=opts.get("n_layer", 2),
            n_head=opts.get("n_head", 4),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return GPT2LMHeadModel(config)

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
        data="offline:pydoc",
        max_steps=max_steps,
        batch_size=8,
        block_size=128,
        eval_every=max(1, max_steps // 6),
        logging_every=5,
        mc_shots=0,
        mc_questions_per_subject=20,
    )
