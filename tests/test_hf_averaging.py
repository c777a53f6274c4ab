"""Iterate averaging in TuningFreeTrainer: evaluation and saving use the average, training goes on
with the training weights, checkpoints carry both."""

from __future__ import annotations

import torch
from test_hf_trainer import _args, _trainer
from trainer_helpers import PatternDataset
from transformers import Trainer


def test_iterate_average_is_used_for_evaluation_and_saving(tmp_path):
    from safetensors.torch import load_file

    data = PatternDataset(n=16, seed=3)
    trainer = _trainer(
        _args(tmp_path, optim="adopt", average_weights=True, max_steps=20, learning_rate=1e-2),
        eval_dataset=data,
    )
    trainer.train()
    assert trainer.averager is not None and trainer.averager.num_updates == 20
    training = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    stock_evaluate = Trainer.evaluate.__get__(trainer)  # the stock Trainer's own evaluation
    on_training_weights = stock_evaluate()["eval_loss"]
    with trainer.averager.swapped():
        averaged = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        on_average = stock_evaluate()["eval_loss"]
    assert not torch.equal(averaged["transformer.h.0.attn.c_attn.weight"],
                           training["transformer.h.0.attn.c_attn.weight"])  # fmt: skip
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == on_average
    assert abs(on_average - on_training_weights) > 1e-3
    for n, p in trainer.model.named_parameters():  # training weights are back, bit-exactly
        assert torch.equal(p, training[n])
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert torch.equal(saved["transformer.h.0.attn.c_attn.weight"],
                       averaged["transformer.h.0.attn.c_attn.weight"])  # fmt: skip


def test_dog_family_averages_by_default_and_checkpoints_carry_it(tmp_path):
    trainer = _trainer(_args(tmp_path, optim="dog", max_steps=10, save_strategy="steps",
                             save_steps=10))  # fmt: skip
    trainer.train()
    assert trainer.averager is not None
    ckpt = tmp_path / "checkpoint-10"
    assert (ckpt / "averager.pt").exists() and (ckpt / "training_weights.pt").exists()
    no_avg = _trainer(_args(tmp_path / "b", optim="dog", max_steps=2, average_weights=False))
    assert no_avg.averager is None
