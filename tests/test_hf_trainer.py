"""TuningFreeTrainer end to end on a tiny GPT-2 (CPU): training, logging, exact resume, model card,
the stock-Trainer hook and the factory."""

from __future__ import annotations

import os

import pytest
import torch
from trainer_helpers import PatternDataset, tiny_gpt2, train_losses
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_tuningfree import TuningFreeTrainer, TuningFreeTrainingArguments
from hf_tuningfree.hf import OptimizerFactory, install, stock_trainer
from hf_tuningfree.optim import ADOPT, available_optimizers, get_optimizer_spec

NAMES = available_optimizers()


def _args(path, **kw):
    base = dict(
        max_steps=30, per_device_train_batch_size=8, logging_steps=5, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
    )  # fmt: skip
    base.update(kw)
    return TuningFreeTrainingArguments(str(path), **base)


def _trainer(args, **kw):
    kw.setdefault("model", tiny_gpt2())
    kw.setdefault("train_dataset", PatternDataset())
    return TuningFreeTrainer(args=args, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_every_registry_optimizer_trains_tiny_gpt2(name, tmp_path):
    """60 steps for every optimizer, with the knobs its registry entry declares
    (``smoke_training_args``; ``visible_lr``: T-DoG's taming factor given back)."""
    spec = get_optimizer_spec(name)
    extra = dict(spec.smoke_training_args)
    if spec.visible_lr is not None:
        extra["learning_rate"] = spec.visible_lr
    trainer = _trainer(_args(tmp_path, optim=name, logging_steps=1, max_steps=60, **extra))
    trainer.train()
    losses = train_losses(trainer)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"{name}: loss {first:.3f} -> {last:.3f}")
    assert last < 0.9 * first, f"{name}: loss fell only from {first:.3f} to {last:.3f}"
    inner = trainer.optimizer.optimizer  # AcceleratedOptimizer -> ours
    assert type(inner) is get_optimizer_spec(name).cls
    # decay: wte, wpe and 4 matrices per block; no decay: 8 biases/norm tensors per block + ln_f
    assert [len(g["params"]) for g in inner.param_groups] == [10, 18]


def test_optimizer_statistics_reach_log_history_and_lr_stays_the_multiplier(tmp_path):
    trainer = _trainer(_args(tmp_path, optim="adopt", logging_steps=5))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6
    for h in logs:
        assert h["optim/step"] == h["step"]  # ADOPT counts its own steps
        assert h["optim/skipped_steps"] == 0.0
        assert h["optim/clip"] == pytest.approx((h["step"] - 1) ** 0.25)
    # the stock linear schedule on lr 1e-3: learning_rate is the schedule's value, not d*lr etc.
    assert logs[0]["learning_rate"] == pytest.approx(1e-3 * (30 - 4) / 30, rel=1e-6)
    assert logs[-1]["learning_rate"] == pytest.approx(1e-3 * (30 - 29) / 30, rel=1e-6)


def test_tensorboard_receives_optim_keys(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing import event_accumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    args = _args(tmp_path, optim="adopt", report_to=["tensorboard"])
    _trainer(args).train()
    runs = [os.path.join(dp, f) for dp, _, fs in os.walk(logdir) for f in fs if "tfevents" in f]
    assert runs
    acc = event_accumulator.EventAccumulator(os.path.dirname(runs[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/optim/clip" in tags
    clips = [e.value for e in acc.Scalars("train/optim/clip")]
    assert clips[-1] == pytest.approx(29**0.25, rel=1e-5)


def _resume_pair(tmp_path, name, **kw):
    """Uninterrupted 20 steps vs. stop at 10 + resume_from_checkpoint."""
    common = dict(optim=name, max_steps=20, logging_steps=1, save_strategy="steps", save_steps=10)
    full = _trainer(_args(tmp_path / "full", **common, **kw))
    full.train()
    resumed = _trainer(_args(tmp_path / "resumed", **common, **kw), model=tiny_gpt2(seed=1))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))
    return full, resumed


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "variant", [{}, {"gradient_accumulation_steps": 2, "bf16": True}], ids=["plain", "accum2-bf16"]
)
def test_resume_from_checkpoint_is_bit_exact(name, variant, tmp_path):
    full, resumed = _resume_pair(tmp_path, name, **variant)
    full_losses, resumed_losses = train_losses(full), train_losses(resumed)
    assert len(full_losses) == 20
    assert resumed_losses[-10:] == full_losses[-10:]
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_model_card_names_optimizer_values_and_paper(tmp_path):
    trainer = _trainer(_args(tmp_path, optim="adopt", optim_args="beta2=0.999"))
    trainer.train()
    trainer.create_model_card(model_name="tiny")
    text = (tmp_path / "README.md").read_text()
    assert "## Optimizer" in text
    assert "**ADOPT**" in text
    assert "| betas | (0.9, 0.999) |" in text
    assert "| clip_exponent | 0.25 |" in text
    assert "| lr | 0.001 |" in text  # the configured lr, not the end of the linear schedule
    assert "| step | 30 |" in text  # a final value from optimizer.stats()
    assert "Taniguchi et al." in text and "NeurIPS 2024" in text
    assert "- optimizer: ADOPT (hf_tuningfree `optim=adopt`)" in text
    assert "epsilon=1e-08" not in text  # the stock line quoted AdamW's arguments


def test_install_teaches_the_stock_trainer(tmp_path):
    names = install()
    assert "adopt" in names
    args = TrainingArguments(
        str(tmp_path), optim="adopt", max_steps=5, report_to=[], use_cpu=True, save_strategy="no"
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=PatternDataset())
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, ADOPT)
    assert trainer.optimizer.optimizer.param_groups[0]["initial_lr"] == 1e-3  # recommended
    (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "adopt"]
    )
    assert parsed.optim == "adopt"


def test_install_says_clearly_when_transformers_has_no_handler_table(monkeypatch):
    from transformers import trainer_optimizer

    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(RuntimeError, match=r"has no optimizer handler table.*TuningFreeTrainer"):
        stock_trainer.install()


def test_factory_for_optimizer_cls_and_kwargs(tmp_path):
    args = TrainingArguments(str(tmp_path), max_steps=10, report_to=[], use_cpu=True,
                             save_strategy="no", weight_decay=0.01)  # fmt: skip
    factory = OptimizerFactory("adopt", args)
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=PatternDataset(),
        optimizer_cls_and_kwargs=factory.cls_and_kwargs(),
    )
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, ADOPT)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert args.learning_rate == 5e-5  # the factory never modifies the caller's args


def test_factory_for_optimizers_tuple_carries_the_recommended_schedule(tmp_path):
    args = TrainingArguments(str(tmp_path), max_steps=10, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1)  # fmt: skip
    model = tiny_gpt2()
    opt, sched = OptimizerFactory("adopt", args, beta2=0.99).optimizers(model, 10)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    trainer = Trainer(
        model=model, args=args, train_dataset=PatternDataset(), optimizers=(opt, sched)
    )
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[:2] == pytest.approx([1e-3, 1e-3 * 0.9])  # recommended lr, stock linear decay


def test_peft_lora_trains_only_the_adapters(tmp_path):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    )  # fmt: skip
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    trainer = _trainer(_args(tmp_path, optim="adopt", logging_steps=1, learning_rate=1e-2),
                       model=model)  # fmt: skip
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    trainer.train()
    opt = trainer.optimizer.optimizer
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert in_opt == {id(p) for p in lora}
    assert len(lora) == 8  # A and B for q and v in 2 layers
    losses = train_losses(trainer)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n])


def test_install_works_for_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer (a Trainer subclass with its own config defaults: lr 2e-5)."""
    import datasets
    from helpers import sample_texts, trained_bpe_tokenizer
    from helpers import tiny_gpt2 as tiny_gpt2_vocab
    from trl import SFTConfig, SFTTrainer

    install()
    tok = trained_bpe_tokenizer()
    args = SFTConfig(str(tmp_path), optim="adopt", max_steps=3, report_to=[], use_cpu=True,
                     save_strategy="no", max_length=64)  # fmt: skip
    trainer = SFTTrainer(
        model=tiny_gpt2_vocab(len(tok)),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": sample_texts(32)}),
        processing_class=tok,
    )
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, ADOPT)
    assert opt.param_groups[0]["initial_lr"] == 1e-3  # SFTConfig's 2e-5 default was not "set"
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].item() == 3
