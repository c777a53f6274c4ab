"""TuningFreeTrainingArguments: names, command line, optim_args, recommendations, round trips."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import HfArgumentParser
from transformers.training_args import OptimizerNames

from hf_tuningfree import TuningFreeTrainingArguments
from hf_tuningfree.hf import optimizer_cls_and_kwargs, parse_optim_args
from hf_tuningfree.optim import ADOPT, OptimizerSpec, available_optimizers, register_optimizer
from hf_tuningfree.optim import registry as registry_module


def _args(tmp_path, **kw):
    kw.setdefault("report_to", [])
    return TuningFreeTrainingArguments(str(tmp_path), **kw)


def test_registry_name_is_kept_and_stock_names_still_work(tmp_path):
    args = _args(tmp_path, optim="adopt")
    assert args.optim == "adopt"
    stock = _args(tmp_path, optim="adamw_torch")
    assert stock.optim == OptimizerNames.ADAMW_TORCH
    assert stock.learning_rate == 5e-5  # stock optimizers get no recommendations


def test_recommended_lr_replaces_only_the_stock_default(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        args = _args(tmp_path, optim="adopt")
    assert args.learning_rate == 1e-3
    assert "learning_rate 5e-05 -> 0.001" in caplog.text
    assert _args(tmp_path, optim="adopt", learning_rate=3e-4).learning_rate == 3e-4
    off = _args(tmp_path, optim="adopt", tuning_free_defaults=False)
    assert off.learning_rate == 5e-5


@pytest.fixture
def multiplier_optimizer(monkeypatch):
    """A registry entry whose lr is a multiplier and that recommends a schedule and clipping."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register_optimizer(
        OptimizerSpec(
            "test_mult", ADOPT, 1.0, "test entry with lr as a multiplier", "Nobody 2024",
            trainer_defaults={"lr_scheduler_type": "cosine", "max_grad_norm": 0.0,
                              "warmup_steps": 0.1},
            lr_is_multiplier=True,
        )
    )  # fmt: skip
    return "test_mult"


def test_scheduler_warmup_and_clipping_recommendations(tmp_path, multiplier_optimizer):
    args = _args(tmp_path, optim=multiplier_optimizer)
    assert args.learning_rate == 1.0
    assert args.lr_scheduler_type.value == "cosine"
    assert args.max_grad_norm == 0.0
    assert args.warmup_steps == 0.1
    explicit = _args(
        tmp_path, optim=multiplier_optimizer, lr_scheduler_type="constant", max_grad_norm=0.5
    )
    assert explicit.lr_scheduler_type.value == "constant"
    assert explicit.max_grad_norm == 0.5


def test_adamw_sized_lr_for_a_multiplier_is_warned_about(tmp_path, multiplier_optimizer, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        args = _args(tmp_path, optim=multiplier_optimizer, learning_rate=2e-5)
    assert args.learning_rate == 2e-5  # explicit values always win
    assert "MULTIPLIER" in caplog.text
    assert "50000x smaller" in caplog.text


def test_command_line_accepts_registry_names(tmp_path):
    parser = HfArgumentParser(TuningFreeTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "adopt", "--optim_args", "beta2=0.99",
         "--report_to", "none"]
    )  # fmt: skip
    assert args.optim == "adopt"
    cls, kwargs = optimizer_cls_and_kwargs(args)
    assert cls is ADOPT
    assert kwargs["betas"] == (0.9, 0.99)


def test_command_line_rejects_unknown_names_listing_valid_ones(tmp_path, capsys):
    parser = HfArgumentParser(TuningFreeTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "adamq"])
    err = capsys.readouterr().err
    assert "invalid choice: 'adamq'" in err
    for name in [*available_optimizers(), "adamw_torch_fused"]:
        assert repr(name) in err


def test_unknown_optim_in_python_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown optim 'adamq'.*adopt.*adamw_torch"):
        _args(tmp_path, optim="adamq")


def test_optim_args_are_typed_from_the_registry(tmp_path):
    args = _args(tmp_path, optim="adopt", optim_args="beta2=0.99, clip_exponent=None,eps=1e-8")
    _, kwargs = optimizer_cls_and_kwargs(args)
    assert kwargs["betas"] == (0.9, 0.99)
    assert kwargs["clip_exponent"] is None
    assert kwargs["eps"] == 1e-8
    assert parse_optim_args("adopt", "maximize=true") == {"maximize": True}


@pytest.mark.parametrize(
    "text, error, match",
    [
        ("d0=1e-5", ValueError, r"Unknown hyperparameter 'd0' for optimizer 'adopt'; valid: .*eps"),
        ("beta2=high", TypeError, "'beta2' of optimizer 'adopt' must be float, got 'high'"),
        ("beta2", ValueError, "is not KEY=VALUE"),
    ],
)
def test_bad_optim_args_fail_at_construction_naming_the_key(tmp_path, text, error, match):
    with pytest.raises(error, match=match):
        _args(tmp_path, optim="adopt", optim_args=text)


def test_changed_adam_arguments_reach_the_optimizer(tmp_path):
    args = _args(tmp_path, optim="adopt", adam_beta2=0.95)
    _, kwargs = optimizer_cls_and_kwargs(args)
    assert kwargs["betas"] == (0.9, 0.95)
    _, untouched = optimizer_cls_and_kwargs(_args(tmp_path, optim="adopt"))
    assert "betas" not in untouched or untouched["betas"] == (0.9, 0.9999)


def test_set_optimizer_accepts_registry_names(tmp_path):
    args = _args(tmp_path)
    args.set_optimizer(name="adopt", learning_rate=2e-3, beta1=0.8)
    assert args.optim == "adopt"
    assert args.learning_rate == 2e-3
    _, kwargs = optimizer_cls_and_kwargs(args)
    assert kwargs["betas"][0] == 0.8


def test_round_trips_through_dict_json_and_training_args_bin(tmp_path):
    args = _args(tmp_path, optim="adopt", optim_args="beta2=0.99")
    data = json.loads(args.to_json_string())
    assert data["optim"] == "adopt"
    again = TuningFreeTrainingArguments(**data)
    assert again.optim == "adopt"
    assert again.learning_rate == args.learning_rate == 1e-3
    assert again.optim_args == "beta2=0.99"
    path = tmp_path / "training_args.bin"
    torch.save(args, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded.optim == "adopt"
    assert optimizer_cls_and_kwargs(loaded)[1] == optimizer_cls_and_kwargs(args)[1]


def test_deepspeed_config_with_its_own_optimizer_is_rejected(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="declares its own 'optimizer' section"):
        _args(tmp_path, optim="adopt", deepspeed=str(cfg))
