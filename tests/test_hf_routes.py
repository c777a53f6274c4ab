"""The Trainer routes behave as the README says: the stock Trainer after install() gets what
TuningFreeTrainer adds, skipped steps stop a diverged run, the factory says only what it applies,
and a checkpoint of another optimizer is refused with a message."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_hf_trainer import _args, _trainer
from trainer_helpers import PatternDataset, tiny_gpt2
from transformers import Trainer, TrainingArguments

from hf_tuningfree.hf import OptimizerFactory, TuningFreeTrainer, install, stock_trainer
from hf_tuningfree.hf.callback import NonFiniteGradientsError, TuningFreeCallback
from hf_tuningfree.hf.errors import ResumeError
from hf_tuningfree.optim import DoG


@pytest.fixture
def installed():
    """install() for this test; the default settings again afterwards."""
    yield install
    install()


def _stock_args(path, **kw) -> TrainingArguments:
    base = dict(max_steps=12, per_device_train_batch_size=8, logging_steps=4, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    base.update(kw)
    return TrainingArguments(str(path), **base)


# --- the stock Trainer after install() (issue 18.7) ---------------------------------------------


def test_stock_trainer_gets_statistics_averaging_and_the_model_card(tmp_path, installed):
    from safetensors.torch import load_file

    installed()
    data = PatternDataset(n=16, seed=3)
    trainer = Trainer(
        model=tiny_gpt2(), args=_stock_args(tmp_path, optim="dog"), train_dataset=PatternDataset(),
        eval_dataset=data,
    )  # fmt: skip
    assert isinstance(trainer, Trainer) and type(trainer).__name__ == "TuningFreeTrainer"
    assert any(isinstance(cb, TuningFreeCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, DoG)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [4, 8, 12]
    for h in logs:  # the optimizer's statistics reach log_history
        assert h["optim/eta"] > 0 and h["optim/skipped_steps"] == 0.0
    assert trainer.args.max_grad_norm == 0.0  # DoG's recommendation, applied on this route too

    # DoG's iterate average: kept, used for evaluation and saving, training weights untouched
    assert trainer.averager is not None and trainer.averager.num_updates == 12
    training = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    stock_evaluate = Trainer.evaluate.__get__(trainer)
    with trainer.averager.swapped():
        on_average = stock_evaluate()["eval_loss"]
        averaged = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert trainer.evaluate()["eval_loss"] == on_average != stock_evaluate()["eval_loss"]
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, training[n])
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(saved[key], averaged[key]) and not torch.equal(saved[key], training[key])

    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "## Optimizer" in card and "**DoG**" in card
    assert "polynomial-decay average of the iterates" in card
    assert "- optimizer: DoG (hf_tuningfree `optim=dog`)" in card


def test_stock_trainer_resumes_dog_with_its_average_bit_exactly(tmp_path, installed):
    installed()
    common = dict(optim="dog", max_steps=8, logging_steps=1, save_strategy="steps", save_steps=4)
    full = Trainer(model=tiny_gpt2(), args=_stock_args(tmp_path / "full", **common),
                   train_dataset=PatternDataset())  # fmt: skip
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-4"
    assert (ckpt / "averager.pt").exists() and (ckpt / "training_weights.pt").exists()
    resumed = Trainer(model=tiny_gpt2(seed=1), args=_stock_args(tmp_path / "r", **common),
                      train_dataset=PatternDataset())  # fmt: skip
    resumed.train(resume_from_checkpoint=str(ckpt))
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (full, resumed)]
    assert losses[1][-4:] == losses[0][-4:]
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with full.averaged_weights(), resumed.averaged_weights():
        for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
            assert torch.equal(a, b)


def test_stock_route_keeps_subclasses_and_leaves_stock_optimizers_alone(tmp_path, installed):
    import datasets
    from helpers import sample_texts, trained_bpe_tokenizer
    from helpers import tiny_gpt2 as tiny_gpt2_vocab
    from trl import SFTConfig, SFTTrainer

    installed()
    tok = trained_bpe_tokenizer()
    args = SFTConfig(str(tmp_path), optim="adopt", max_steps=4, logging_steps=2, report_to=[],
                     use_cpu=True, save_strategy="no", max_length=64)  # fmt: skip
    trainer = SFTTrainer(
        model=tiny_gpt2_vocab(len(tok)),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": sample_texts(32)}),
        processing_class=tok,
    )
    assert isinstance(trainer, SFTTrainer) and type(trainer).__name__ == "TuningFreeSFTTrainer"
    trainer.train()
    assert [h["optim/step"] for h in trainer.state.log_history if "loss" in h] == [2.0, 4.0]
    stock = Trainer(model=tiny_gpt2(), args=_stock_args(tmp_path), train_dataset=PatternDataset())
    assert type(stock) is Trainer  # adamw_torch: nothing added
    installed(extend_trainers=False)
    names_only = Trainer(
        model=tiny_gpt2(), args=_stock_args(tmp_path, optim="adopt"), train_dataset=PatternDataset()
    )
    assert type(names_only) is Trainer


def test_stock_arguments_say_what_they_replaced_and_how_to_keep_it(tmp_path, installed, caplog):
    installed()
    args = _stock_args(tmp_path, optim="dog", learning_rate=5e-5)  # equal to the stock default
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=PatternDataset())
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        trainer.create_optimizer()
    assert trainer.optimizer.param_groups[0]["lr"] == 1.0
    assert (
        "the registry's recommendations replace learning_rate 5e-05 -> 1.0, lr_scheduler_type "
        "'linear' -> 'constant', max_grad_norm 1.0 -> 0.0 (lr multiplies the adapted step): these "
        "values equal TrainingArguments's defaults" in caplog.text
    )
    assert "install(recommended_defaults=False)" in caplog.text
    installed(recommended_defaults=False)
    kept = Trainer(model=tiny_gpt2(), args=_stock_args(tmp_path, optim="dog", learning_rate=5e-5),
                   train_dataset=PatternDataset())  # fmt: skip
    kept.create_optimizer()
    assert kept.optimizer.param_groups[0]["lr"] == 5e-5
    assert kept.args.max_grad_norm == 1.0


# --- skipped steps: logged, and a diverged run stops (issue 18.8, the Trainer side) -------------


class Exploding(torch.nn.Module):
    """A 4-parameter model whose loss (so every gradient) is infinite from its ``bad_from``-th
    forward pass on."""

    def __init__(self, bad_from: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))
        self.bad_from = bad_from
        self.calls = 0

    def forward(self, input_ids=None, labels=None, **kwargs):
        self.calls += 1
        loss = ((self.w * input_ids.float().mean() / 64) ** 2).sum()
        if self.calls >= self.bad_from:
            loss = loss * math.inf
        return {"loss": loss}


def _exploding_trainer(tmp_path, bad_from=5, trainer_cls=TuningFreeTrainer, **kw):
    settings = {"optim": "adopt", "max_steps": 10, "logging_steps": 1, "max_grad_norm": 0.0, **kw}
    make = _args if trainer_cls is TuningFreeTrainer else _stock_args
    args = make(tmp_path, **settings)
    return trainer_cls(model=Exploding(bad_from), args=args, train_dataset=PatternDataset(n=80))


def test_a_run_whose_gradients_stay_infinite_stops_with_a_clear_error(tmp_path, caplog):
    trainer = _exploding_trainer(tmp_path)
    with (
        caplog.at_level(logging.WARNING, logger="hf_tuningfree"),
        pytest.raises(NonFiniteGradientsError) as info,
    ):
        trainer.train()
    assert str(info.value).startswith(
        "hf_tuningfree: stopped training at step 9: 5 consecutive optimizer steps (steps 5-9) were "
        "skipped because a gradient held NaN/Inf (5 skipped in all); the weights are those "
        "before step 5."
    )
    assert "max_consecutive_skipped_steps=5 (0 never stops)" in str(info.value)
    assert trainer.state.global_step == 8  # steps 1-8 completed, the 9th stopped the run
    inner = trainer.optimizer.optimizer
    assert inner.stats()["skipped_steps"] == 5.0 and inner.stats()["step"] == 4.0
    # every logging step with new skips says so
    lines = [r.getMessage() for r in caplog.records if "since the last log" in r.getMessage()]
    assert lines[0].startswith("hf_tuningfree: 1 optimizer step(s) skipped since the last log")
    assert "(4 of 8 in all;" in lines[-1]


def test_the_limit_is_configurable_and_zero_only_reports_at_the_end(tmp_path, caplog):
    with pytest.raises(NonFiniteGradientsError, match="at step 6: 2 consecutive"):
        _exploding_trainer(tmp_path / "a", max_consecutive_skipped_steps=2).train()
    trainer = _exploding_trainer(tmp_path / "b", max_consecutive_skipped_steps=0)
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        trainer.train()  # the run: 6 of 10 steps skipped, and now it says so at the end
    assert trainer.state.global_step == 10
    assert (
        "hf_tuningfree: 6 of 10 optimizer steps were skipped because a gradient held NaN/Inf "
        "(longest run: 6 in a row, up to step 10)" in caplog.text
    )
    # an occasional bad step does not stop anything
    ok = _exploding_trainer(tmp_path / "c", bad_from=10)
    ok.train()
    assert ok.optimizer.optimizer.stats()["skipped_steps"] == 1.0


def test_on_an_accelerator_the_count_is_read_at_logging_steps_only(tmp_path, monkeypatch):
    """Where reading the counters would synchronise with the device, the check waits for the
    next logging step (``optimizer.stats()`` synchronises there anyway) and still names the
    skipped steps exactly."""
    from hf_tuningfree.hf import callback as callback_module

    reads = []
    real_read = callback_module.SkippedStepCounter.read

    def counting_read(self):
        reads.append(1)
        return real_read(self)

    monkeypatch.setattr(callback_module.SkippedStepCounter, "on_host", property(lambda s: False))
    monkeypatch.setattr(callback_module.SkippedStepCounter, "read", counting_read)
    trainer = _exploding_trainer(tmp_path, logging_steps=4, max_consecutive_skipped_steps=2)
    with pytest.raises(NonFiniteGradientsError) as info:
        trainer.train()
    assert "stopped training at step 8: 4 consecutive optimizer steps (steps 5-8)" in str(
        info.value
    )
    assert len(reads) == 2  # at the logging steps 4 and 8, never per step


def test_the_stock_trainer_after_install_stops_too(tmp_path, installed):
    installed(max_consecutive_skipped_steps=3)
    trainer = _exploding_trainer(tmp_path, trainer_cls=Trainer)
    with pytest.raises(NonFiniteGradientsError, match=r"at step 7: 3 consecutive .*steps 5-7"):
        trainer.train()
    with pytest.raises(ValueError, match="max_consecutive_skipped_steps must be an int >= 0"):
        installed(max_consecutive_skipped_steps=-1)


# --- OptimizerFactory says what it applies (issue 18.6) -----------------------------------------


def test_factory_with_cls_and_kwargs_announces_only_what_the_trainer_uses(tmp_path, caplog):
    args = _stock_args(tmp_path, max_steps=10, logging_steps=1)
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        factory = OptimizerFactory("dog", args)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=PatternDataset(),
                          optimizer_cls_and_kwargs=factory.cls_and_kwargs())  # fmt: skip
    applied, ignored = [r.getMessage() for r in caplog.records]
    assert "learning_rate 5e-05 -> 1.0 (lr multiplies" in applied
    assert "lr_scheduler_type" not in applied and "max_grad_norm" not in applied
    assert ignored == (
        "hf_tuningfree: OptimizerFactory('dog').cls_and_kwargs() does not apply the registry's "
        "recommendations lr_scheduler_type='constant', max_grad_norm=0.0: the Trainer takes them "
        "from its own TrainingArguments, which keep lr_scheduler_type='linear', max_grad_norm=1.0. "
        "Set them there to follow the recommendation."
    )
    trainer.train()  # and that is what happens: lr 1.0 decays linearly, clipping at 1.0
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert lrs == pytest.approx([1.0 - 0.1 * i for i in range(10)])
    assert trainer.args.max_grad_norm == 1.0


def test_factory_optimizers_applies_the_schedule_not_the_clipping(tmp_path, caplog):
    args = _stock_args(tmp_path, max_steps=10, logging_steps=1)
    model = tiny_gpt2()
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        opt, sched = OptimizerFactory("dog", args).optimizers(model, 10)
    applied, ignored = [r.getMessage() for r in caplog.records]
    assert "lr_scheduler_type 'linear' -> 'constant'" in applied and "max_grad" not in applied
    assert "does not apply the registry's recommendations max_grad_norm=0.0" in ignored
    trainer = Trainer(model=model, args=args, train_dataset=PatternDataset(),
                      optimizers=(opt, sched))  # fmt: skip
    trainer.train()
    assert {h["learning_rate"] for h in trainer.state.log_history if "loss" in h} == {1.0}


def test_factory_checks_hyperparameters_at_once(tmp_path):
    from hf_tuningfree.hf.errors import OptimizerArgumentError

    with pytest.raises(OptimizerArgumentError, match=r"optim='adopt': Invalid betas\[1\]: 1.5"):
        OptimizerFactory("adopt", _stock_args(tmp_path), beta2=1.5)


# --- resuming with another optimizer (issue 18.11) ----------------------------------------------


def test_resuming_a_checkpoint_of_another_optimizer_says_so(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    _trainer(_args(tmp_path / "a", optim="adopt", **common)).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    other = _trainer(_args(tmp_path / "b", optim="dadapt_adam", **common))
    with pytest.raises(ResumeError) as info:
        other.train(resume_from_checkpoint=str(ckpt))
    assert str(info.value).startswith(
        f"checkpoint {ckpt} was written with optim='adopt' (ADOPT); this run uses "
        "optim='dadapt_adam' (DAdaptAdam): resume with the optimizer that wrote it"
    )
    # a checkpoint without the marker (e.g. the stock Trainer's): the param groups tell
    (ckpt / "hf_tuningfree_optimizer.json").unlink()
    other = _trainer(_args(tmp_path / "c", optim="dadapt_adam", **common))
    with pytest.raises(ResumeError, match=r"holds the state of another optimizer .*lack .*d0"):
        other.train(resume_from_checkpoint=str(ckpt))
    # the same optimizer resumes as before
    same = _trainer(_args(tmp_path / "d", optim="adopt", **common))
    same.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert same.state.global_step == 4


def test_install_wraps_the_trainer_once(installed):
    installed()
    init = Trainer.__init__
    installed()
    assert Trainer.__init__ is init
    assert stock_trainer.is_installed("adopt")
