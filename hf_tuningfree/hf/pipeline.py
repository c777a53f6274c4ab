"""The fine-tuning scripts' shared flow: arguments, resume, train -> evaluate -> save, reports.

- :func:`parse_script_arguments`: the command line, or a ``.yaml`` / ``.json`` file followed by
  optional command-line overrides.
- :func:`find_resume_checkpoint`: ``--resume_from_checkpoint``, else the last ``checkpoint-N`` in
  ``output_dir`` (``run_clm.py``'s behaviour), refusing a non-empty ``output_dir`` without one.
- :func:`train_evaluate_save`: train (resuming), save model/adapter + tokenizer, metrics
  (``train_results.json``, ``eval_results.json``, ``all_results.json``), ``trainer_state.json``
  and the model card; evaluate with ``eval_loss`` and ``perplexity``.
- :func:`write_rank_report`: one JSON per process with parameter checksums, the optimizer's
  statistics and the log history, for checking that data-parallel ranks agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_tuningfree.data.mmlu_format import HubOfflineError, MMLUFormatError
from hf_tuningfree.data.packages import MissingAssetError
from hf_tuningfree.data.resolve import ResolvedModel, resolve_dataset, resolve_model_source
from hf_tuningfree.hf.callback import NonFiniteGradientsError
from hf_tuningfree.hf.errors import ScriptArgumentError, UserInputError
from hf_tuningfree.hf.trainer import optimizer_log_values

__all__ = [
    "RANK_REPORT_ENV",
    "USER_ERRORS",
    "FinetuneResult",
    "ScriptArgumentError",
    "UserInputError",
    "find_resume_checkpoint",
    "load_model",
    "load_raw_data",
    "parse_script_arguments",
    "train_evaluate_save",
    "write_rank_report",
]

logger = logging.getLogger("hf_tuningfree")

#: A directory to write ``rank{N}.json`` into (see :func:`write_rank_report`); unset: nothing.
RANK_REPORT_ENV = "HF_TUNINGFREE_RANK_REPORT_DIR"

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class FinetuneResult:
    """What a fine-tuning script's ``run()`` returns: the metrics written, the trainer (its
    ``model`` is the trained model in memory) and the output directory."""

    metrics: dict[str, float]
    trainer: Any
    output_dir: Path


#: Errors a script reports as a one-line message (exit status 1) instead of a traceback: they are
#: about the user's input (names, paths, missing assets), not bugs.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserInputError,
    NonFiniteGradientsError,
    HubOfflineError,
    MissingAssetError,
    MMLUFormatError,
    FileNotFoundError,
)


def _load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ScriptArgumentError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ScriptArgumentError(f"{path}: expected a mapping of argument names to values")
    return values


def parse_script_arguments(
    parser: HfArgumentParser, argv: Sequence[str] | None = None
) -> tuple[Any, ...]:
    """Parse ``argv`` (default ``sys.argv[1:]``) into the parser's dataclasses.

    ``argv`` may start with a ``.yaml`` / ``.yml`` / ``.json`` file of ``name: value`` pairs; the
    rest of ``argv`` then overrides single values (``config.yaml --max_steps 10``). File values go
    through the same type conversion as command-line strings.

    Raises:
        ScriptArgumentError: the file is missing, not a mapping, or names unknown arguments.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].endswith(CONFIG_SUFFIXES) and not args[0].startswith("-"):
        path = Path(args.pop(0))
        values = _load_config_file(path)
        unknown = sorted(set(values) - {action.dest for action in parser._actions})
        if unknown:
            raise ScriptArgumentError(
                f"{path}: unknown argument(s) {unknown}; see --help for the valid names"
            )
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=args)


def setup_logging(training_args: TrainingArguments) -> None:
    """Log level from ``training_args`` for this process (warnings only on non-main ranks)."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def find_resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: ``resume_from_checkpoint`` if set, else the last
    ``checkpoint-N`` in ``output_dir`` when training (unless ``overwrite_output_dir``).

    Raises:
        ScriptArgumentError: ``resume_from_checkpoint`` is not a directory, or ``output_dir`` is
            non-empty, has no checkpoint and ``overwrite_output_dir`` is not set.
    """
    explicit = training_args.resume_from_checkpoint
    if explicit:
        if not os.path.isdir(explicit):
            raise ScriptArgumentError(f"resume_from_checkpoint={explicit!r} is not a directory")
        return str(explicit)
    output_dir = training_args.output_dir
    if not training_args.do_train or getattr(training_args, "overwrite_output_dir", False):
        return None
    if not output_dir or not os.path.isdir(output_dir):
        return None
    last = get_last_checkpoint(output_dir)
    if last is None and os.listdir(output_dir):
        raise ScriptArgumentError(
            f"output_dir {output_dir!r} is not empty and has no checkpoint-N to resume from; "
            "pass --overwrite_output_dir to train there anyway, or choose another output_dir"
        )
    if last is not None:
        logger.info("resuming from %s (pass --overwrite_output_dir to start over)", last)
    return last


def load_model(model_args: Any, *, default: str, seed: int | None = None) -> ResolvedModel:
    """The model and tokenizer ``ModelArguments`` name (``default`` when none is named).

    Raises:
        ScriptArgumentError: an unknown ``offline:`` name, overrides for a pretrained model, an
            unknown dtype.
    """
    source = model_args.model_name_or_path or default
    try:
        return resolve_model_source(
            source,
            tokenizer_name=model_args.tokenizer_name,
            config_overrides=model_args.config_overrides,
            dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
            revision=model_args.model_revision,
            cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code,
            seed=seed,
        )
    except ValueError as error:
        raise ScriptArgumentError(f"model_name_or_path={source!r}: {error}") from error


def load_raw_data(data_args: Any, *, default: str, cache_dir: str | None = None) -> Any:
    """The ``DatasetDict`` ``DataArguments`` name: files, else ``dataset_name``, else ``default``.

    Raises:
        ScriptArgumentError: an unknown ``offline:`` name, files of an unknown format, a name and
            files together.
    """
    files = data_args.train_file or data_args.validation_file
    name = data_args.dataset_name or (None if files else default)
    try:
        return resolve_dataset(
            name,
            data_args.dataset_config_name,
            train_file=data_args.train_file,
            validation_file=data_args.validation_file,
            validation_split_percentage=data_args.validation_split_percentage,
            keep_linebreaks=data_args.keep_linebreaks,
            cache_dir=cache_dir,
        )
    except ValueError as error:
        raise ScriptArgumentError(f"data: {error}") from error


def require_split(data: Any, name: str, option: str) -> Any:
    """``data[name]``, or a :class:`ScriptArgumentError` naming ``option`` and the splits."""
    if name not in data:
        raise ScriptArgumentError(
            f"--{option} {name}: the data has splits {sorted(data)}; pick one of them"
        )
    return data[name]


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def train_evaluate_save(
    trainer: Any,
    training_args: TrainingArguments,
    *,
    resume_from_checkpoint: str | None = None,
    train_samples: int | None = None,
    eval_samples: int | None = None,
    model_card: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Train (if ``do_train``), save, evaluate (if ``do_eval``), write metrics and the model card.

    Saving (main process): the model (or, for a PEFT model, the adapter) and the tokenizer in
    ``output_dir``, ``trainer_state.json``, ``train_results.json``, ``eval_results.json``,
    ``all_results.json``, and ``README.md`` with the optimizer section. Evaluation adds
    ``perplexity = exp(eval_loss)``.

    Returns:
        Every metric written, train ones prefixed ``train_``, eval ones ``eval_`` (plus
        ``perplexity``).
    """
    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        trainer.save_model()
        train_metrics = dict(result.metrics)
        if train_samples is not None:
            train_metrics["train_samples"] = train_samples
        train_metrics.update(
            {f"train_{k}": v for k, v in optimizer_log_values(trainer.optimizer).items()}
        )
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if training_args.do_eval and trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        if eval_samples is not None:
            eval_metrics["eval_samples"] = eval_samples
        eval_metrics["perplexity"] = perplexity(eval_metrics["eval_loss"])
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.do_train and training_args.should_save:
        card = dict(model_card or {})
        base = card.pop("base_model_sentence", None)
        trainer.create_model_card(**card)
        if base:
            rewrite_base_model_sentence(Path(training_args.output_dir) / "README.md", base)
    return metrics


_BASE_SENTENCE = re.compile(
    r"^This model (?:was trained from scratch|is a fine-tuned version of \[[^\]]*\]\([^)]*\))"
    r" on ",
    flags=re.MULTILINE,
)


def base_model_sentence(resolved: ResolvedModel) -> str | None:
    """How the model card should name a base model the stock card cannot link to (offline
    defaults, local directories); ``None`` for hub models, which the stock card links."""
    if resolved.kind == "hub":
        return None
    if resolved.kind == "offline-random-init":
        return f"This model was trained from scratch ({resolved.description}, `{resolved.source}`)"
    return f"This model is a fine-tuned version of {resolved.description} (`{resolved.source}`)"


def rewrite_base_model_sentence(card: Path, sentence: str) -> None:
    """Replace the stock card's "trained from scratch" / "fine-tuned version of [..](..)" opening
    with ``sentence`` (no-op when the card or the sentence is not there)."""
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8")
    new = _BASE_SENTENCE.sub(lambda _m: sentence + " on ", text, count=1)
    card.write_text(new, encoding="utf-8")


def model_card_fields(resolved: ResolvedModel, output_dir: str, dataset: str, **extra: Any) -> dict:
    """``create_model_card`` arguments for a resolved model (plus ``base_model_sentence``)."""
    return {
        "model_name": Path(output_dir).name,
        "finetuned_from": resolved.source if resolved.kind == "hub" else "",
        "dataset": dataset,
        "base_model_sentence": base_model_sentence(resolved),
        **extra,
    }


def save_extra_metrics(trainer: Any, split: str, values: Mapping[str, float]) -> None:
    """Write ``{split}_results.json`` and fold the values into ``all_results.json``."""
    trainer.log_metrics(split, dict(values))
    trainer.save_metrics(split, dict(values))


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (dtype and shape matter; equal values on two ranks give
    equal digests)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{data.dtype}{tuple(tensor.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parameter_checksums(model: torch.nn.Module) -> dict[str, str]:
    """:func:`tensor_checksum` of every parameter, by name."""
    return {name: tensor_checksum(p) for name, p in model.named_parameters()}


def write_rank_report(trainer: Any, directory: str | os.PathLike) -> Path:
    """Write ``rank{N}.json``: world size, rank, parameter checksums of ``trainer.model``, the
    optimizer's ``stats()`` and ``log_history``, as this process sees them."""
    args = trainer.args
    report = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "parameters": parameter_checksums(trainer.model),
        "optimizer_stats": optimizer_log_values(trainer.optimizer),
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
    }
    path = Path(directory) / f"rank{args.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def maybe_write_rank_report(trainer: Any) -> Path | None:
    """:func:`write_rank_report` into ``$HF_TUNINGFREE_RANK_REPORT_DIR`` when it is set."""
    directory = os.environ.get(RANK_REPORT_ENV)
    return write_rank_report(trainer, directory) if directory else None
