"""Hugging Face integration: Trainer, TrainingArguments, the stock-Trainer hook, the factory.

- :class:`TuningFreeTrainingArguments`: ``optim="adopt"`` / ``--optim adopt``, typed ``optim_args``,
  the registry's recommended lr / scheduler / warm-up / clipping where nothing was set.
- :class:`TuningFreeTrainer`: registry optimizers, ``optim/...`` statistics in the logs, iterate
  averaging for evaluation and saving, an optimizer section in the model card.
- :func:`install`: the same optimizers for the stock ``Trainer`` and its subclasses.
- :class:`OptimizerFactory`: for ``Trainer(optimizers=...)`` / ``optimizer_cls_and_kwargs=...``.
- :mod:`.script_args`: the scripts' argument groups (``ModelArguments``, ``DataArguments``,
  ``LoraArguments``, ``MMLUScoringArguments``, ``FinetuneTrainingArguments``).
- :mod:`.clm` (text -> ``block_size`` blocks), :mod:`.sft` (prompt/completion examples, MMLU-format
  rows in the scorer's prompt, the padding collator), :mod:`.lora` (PEFT wrapping and merging) and
  :mod:`.pipeline` (config files, resume, train -> evaluate -> save): what the fine-tuning scripts
  are made of, importable on their own.
"""

from hf_tuningfree.hf.factory import OptimizerFactory, trainer_param_groups
from hf_tuningfree.hf.recommend import (
    apply_recommended_defaults,
    optimizer_cls_and_kwargs,
    parse_optim_args,
)
from hf_tuningfree.hf.stock_trainer import install
from hf_tuningfree.hf.trainer import TuningFreeTrainer, optimizer_log_values, unwrap_optimizer
from hf_tuningfree.hf.training_args import OptimChoices, TuningFreeTrainingArguments

__all__ = [
    "OptimChoices",
    "OptimizerFactory",
    "TuningFreeTrainer",
    "TuningFreeTrainingArguments",
    "apply_recommended_defaults",
    "install",
    "optimizer_cls_and_kwargs",
    "optimizer_log_values",
    "parse_optim_args",
    "trainer_param_groups",
    "unwrap_optimizer",
]
