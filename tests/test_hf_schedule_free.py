"""The Trainer's path for schedule-free optimizers: checkpoints and the final model hold the
average x, evaluation uses it, training resumes at y, through Accelerate's wrapper and through
a wrapper without ``eval`` (huggingface/accelerate #4159)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from trainer_helpers import PatternDataset, tiny_gpt2
from transformers import TrainerCallback

from hf_tuningfree import TuningFreeTrainer, TuningFreeTrainingArguments
from hf_tuningfree.hf.schedule_free import eval_mode, schedule_free_optimizer
from hf_tuningfree.optim import ProdigyScheduleFree


class _RecordY(TrainerCallback):
    """At the end of step ``at`` (before the schedule-free callback, which the trainer adds
    after the user's callbacks), the parameters (y) and the optimizer's z."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen: dict[str, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step == self.at:
            inner = schedule_free_optimizer(optimizer)
            self.seen["y"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.seen["z"] = {n: inner.state[p]["z"].clone() for n, p in model.named_parameters()}


def _trainer(tmp_path, callbacks=(), **kw):
    base = dict(
        optim="prodigy_sf", max_steps=12, per_device_train_batch_size=8, logging_steps=4,
        report_to=[], save_strategy="steps", save_steps=6, use_cpu=True, disable_tqdm=True,
        seed=0, data_seed=0, optim_args="d0=1e-3",
    )  # fmt: skip
    base.update(kw)
    args = TuningFreeTrainingArguments(str(tmp_path), **base)
    return TuningFreeTrainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=PatternDataset(),
        eval_dataset=PatternDataset(16, seed=1),
        callbacks=list(callbacks),
    )


def test_checkpoint_model_is_the_average_and_training_continues_at_y(tmp_path):
    record = _RecordY(6)
    trainer = _trainer(tmp_path, callbacks=[record])
    trainer.train()
    inner = trainer.optimizer.optimizer  # AcceleratedOptimizer -> ours
    assert isinstance(inner, ProdigyScheduleFree)
    beta1 = inner.param_groups[0]["betas"][0]
    saved = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    y, z = record.seen["y"], record.seen["z"]
    worst = max((saved[n] - (y[n] - (1 - beta1) * z[n]) / beta1).abs().max().item() for n in saved)
    moved = max((saved[n] - y[n]).abs().max().item() for n in saved)
    print(f"checkpoint vs x: {worst:.1e}; x vs y: {moved:.1e}")
    assert worst < 1e-6 < moved  # the checkpoint is x, measurably not y
    opt_state = torch.load(tmp_path / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert [g["train_mode"] for g in opt_state["param_groups"]] == [False, False]
    # steps 7-12 ran at y: the trainer called train() again after the save
    assert inner.stats()["step"] == 12


def test_after_training_the_model_evaluates_and_saves_the_average(tmp_path):
    trainer = _trainer(tmp_path, save_strategy="no")
    trainer.train()
    inner = schedule_free_optimizer(trainer.optimizer)
    assert inner is not None and not inner.training  # on_train_end: x is in the model
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.equal(saved[n], params[n]) for n in saved)
    at_x = trainer.evaluate()["eval_loss"]
    inner.train()  # y in the model, as after a training step
    ids = torch.stack([PatternDataset(16, seed=1)[i]["input_ids"] for i in range(16)])
    with torch.no_grad():
        forward_y = trainer.model(input_ids=ids, labels=ids).loss.item()
    again = trainer.evaluate()["eval_loss"]  # the evaluation loop calls eval(): x again
    assert not inner.training
    with torch.no_grad():
        forward_x = trainer.model(input_ids=ids, labels=ids).loss.item()
    print(
        f"eval at x {at_x:.6f}, again {again:.6f}; forward at y {forward_y:.6f}, x {forward_x:.6f}"
    )
    assert abs(again - at_x) < 1e-6
    assert abs(forward_y - forward_x) > 1e-3


def test_wrappers_are_looked_through():
    p = torch.nn.Parameter(torch.randn(4))
    opt = ProdigyScheduleFree([p], d0=1e-2)
    for _ in range(3):
        p.grad = p.detach().clone()
        opt.step()

    class NoEvalWrapper:  # a DeepSpeed-like wrapper that lost eval()/train()
        def __init__(self, inner):
            self.optimizer = inner

    eval_mode(NoEvalWrapper(NoEvalWrapper(opt)))
    assert not opt.training
    eval_mode(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))  # no-op
    assert schedule_free_optimizer(torch.optim.SGD([p], lr=0.1)) is None
