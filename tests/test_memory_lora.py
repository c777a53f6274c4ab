"""A LoRA run through the Trainer keeps no copy of the initial weights of the zero-initialised B
matrices (prodigy PR #23), for every optimizer that keeps ``x0``; the state counter shows it."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import PatternDataset

from hf_tuningfree import TuningFreeTrainer, TuningFreeTrainingArguments

#: The optimizers that keep a copy of the initial weights.
WITH_X0 = ["prodigy", "prodigy_sf", "dog", "ldog", "tdog"]


def _lora_model():
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    )  # fmt: skip
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(base, config)


def _train(tmp_path, optim: str, **optim_args):
    model = _lora_model()
    args = TuningFreeTrainingArguments(
        str(tmp_path), optim=optim, max_steps=3, per_device_train_batch_size=8, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        optim_args=",".join(f"{k}={v}" for k, v in optim_args.items()) or None,
    )  # fmt: skip
    trainer = TuningFreeTrainer(model=model, args=args, train_dataset=PatternDataset())
    trainer.train()
    return model, trainer.optimizer.optimizer


@pytest.mark.parametrize("name", WITH_X0)
def test_no_x0_for_the_zero_initialised_b_matrices(name, tmp_path):
    model, opt = _train(tmp_path, name)
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(a) == len(b) == 4
    assert all("x0" not in opt.state[p] for p in b)  # implicit: x0 = 0
    assert all(torch.equal(opt.state[p]["x0"], opt.state[p]["x0"]) for p in a)  # stored
    counted = opt.state_bytes()
    assert "x0" in counted.by_key
    assert counted.by_key["x0"] == sum(4 * p.numel() for p in a)  # the A copies only
    assert all(p.abs().sum() > 0 for p in b)  # the B matrices did train from zero


def test_stored_copy_when_switched_off(tmp_path):
    model, opt = _train(tmp_path, "prodigy", implicit_zero_x0=False)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(opt.state[p]["x0"]) == 0 for p in b)
