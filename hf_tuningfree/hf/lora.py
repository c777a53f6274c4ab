"""PEFT LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) for the
fine-tuning scripts: wrap a causal LM from :class:`~hf_tuningfree.hf.script_args.LoraArguments`, and
merge a saved adapter into its base model.

Each targeted linear layer ``W`` becomes ``W + (alpha / r) * B A`` with ``A`` (r x in) random and
``B`` (out x r) zero at the start, so the wrapped model starts out equal to the base; only ``A``
and ``B`` are trained and saved (``adapter_model.safetensors``, a few MB even for 7B models).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_tuningfree.hf.errors import UserInputError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedTokenizerBase

    from hf_tuningfree.hf.script_args import LoraArguments

logger = logging.getLogger(__name__)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name components of the model's ``nn.Linear`` (and GPT-2 ``Conv1D``)
    layers: what ``target_modules`` can name."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(lora_args: LoraArguments) -> LoraConfig:
    """A causal-LM ``peft.LoraConfig`` from ``LoraArguments`` (r, alpha, dropout, targets)."""
    from peft import LoraConfig, TaskType

    if lora_args.lora_r <= 0:
        raise UserInputError(f"lora_r must be positive, got {lora_args.lora_r}")
    if not 0.0 <= lora_args.lora_dropout < 1.0:
        raise UserInputError(f"lora_dropout must be in [0, 1), got {lora_args.lora_dropout}")
    if not lora_args.lora_target_modules:
        raise UserInputError("lora_target_modules is empty; name at least one linear layer")
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=list(lora_args.lora_target_modules),
    )


def apply_lora(
    model: torch.nn.Module,
    lora_args: LoraArguments,
    *,
    base_model_name_or_path: str | None = None,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; only the adapters are trainable afterwards.

    Args:
        model: a causal LM (any dtype: PEFT keeps the adapter weights in float32 over a bf16/fp16
            base).
        lora_args: rank, alpha, dropout and the target module names.
        base_model_name_or_path: recorded in ``adapter_config.json`` so that
            ``PeftModel.from_pretrained`` users know which base to load (PEFT takes it from the
            model's ``name_or_path``, which this sets; default: leave that as it is).

    Raises:
        ValueError: a target module name matches no linear layer of the model (the message lists
            the names that would).
    """
    from peft import get_peft_model

    available = linear_module_names(model)
    missing = [name for name in lora_args.lora_target_modules if name not in available]
    if missing:
        raise UserInputError(
            f"lora_target_modules {missing} match no linear layer of {type(model).__name__}; "
            f"its linear layers are named {available}"
        )
    if base_model_name_or_path is not None:
        model.name_or_path = base_model_name_or_path
    peft_model = get_peft_model(model, lora_config(lora_args))
    trainable, total = trainable_parameters(peft_model)
    logger.info(
        "LoRA r=%d alpha=%d on %s: %d trainable of %d parameters (%.3f%%)",
        lora_args.lora_r,
        lora_args.lora_alpha,
        list(lora_args.lora_target_modules),
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def merge_adapter(
    base_model: torch.nn.Module,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Load the adapter saved in ``adapter_dir`` onto ``base_model``, merge it into the weights
    (``W + (alpha / r) B A``) and save an ordinary model directory (plus ``tokenizer``).

    Merging from the saved adapter, not from the training model, works the same after DDP, FSDP or
    DeepSpeed, and merges what was saved (the iterate average where one was used).

    Raises:
        FileNotFoundError: ``adapter_dir`` has no ``adapter_config.json``.
    """
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_config.json; expected PeftModel.save_pretrained output"
        )
    merged: Any = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    out = Path(output_dir)
    merged.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    logger.info("merged adapter %s into the base model: %s", adapter_dir, out)
    return out
