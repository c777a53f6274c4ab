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


# --- explicit values win, even when they equal the stock defaults (issue 18.3) ------------------


def _parse(tmp_path, *argv):
    (args,) = HfArgumentParser(TuningFreeTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", *argv]
    )
    return args


def test_explicit_values_equal_to_the_stock_defaults_are_kept(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        args = _parse(tmp_path, "--optim", "dog", "--learning_rate", "5e-5", "--max_grad_norm",
                      "1.0", "--lr_scheduler_type", "linear")  # fmt: skip
    assert args.learning_rate == 5e-5
    assert args.lr_scheduler_type.value == "linear"
    assert args.max_grad_norm == 1.0
    assert "registry's recommendations" not in caplog.text  # nothing was replaced
    assert "MULTIPLIER" in caplog.text  # but 5e-5 as DoG's multiplier is worth a warning
    assert optimizer_cls_and_kwargs(args)[1]["lr"] == 5e-5


def test_what_was_not_set_is_filled_in_and_the_log_says_exactly_what(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        args = _parse(tmp_path, "--optim", "dog", "--max_grad_norm", "1.0")
    assert args.learning_rate == 1.0
    assert args.lr_scheduler_type.value == "constant"
    assert args.max_grad_norm == 1.0  # given, though DoG recommends 0
    (line,) = [r.getMessage() for r in caplog.records if "recommendations" in r.getMessage()]
    assert line == (
        "hf_tuningfree: optim=dog: not set, so the registry's recommendations are used: "
        "learning_rate 5e-05 -> 1.0, lr_scheduler_type 'linear' -> 'constant' (lr multiplies the "
        "adapted step). Set any of them to keep your value, or tuning_free_defaults=False."
    )
    # Python keyword arguments and a stock optimizer: explicit wins, unset gets the stock default
    kept = _args(tmp_path, optim="dog", learning_rate=5e-5, lr_scheduler_type="linear")
    assert (kept.learning_rate, kept.lr_scheduler_type.value) == (5e-5, "linear")
    assert kept.max_grad_norm == 0.0
    stock = _args(tmp_path, optim="adamw_torch")
    assert (stock.learning_rate, stock.lr_scheduler_type.value, stock.max_grad_norm) == (
        5e-5, "linear", 1.0)  # fmt: skip
    off = _args(tmp_path, optim="dog", tuning_free_defaults=False)
    assert (off.learning_rate, off.max_grad_norm) == (5e-5, 1.0)


def test_a_config_file_value_equal_to_the_stock_default_is_explicit(tmp_path):
    from hf_tuningfree.hf.pipeline import parse_script_arguments

    config = tmp_path / "run.yaml"
    config.write_text(
        f"output_dir: {tmp_path}\noptim: dog\nlearning_rate: 5.0e-5\nreport_to: none\n"
    )
    parser = HfArgumentParser(TuningFreeTrainingArguments)
    (args,) = parse_script_arguments(parser, [str(config)])
    assert args.learning_rate == 5e-5 and args.max_grad_norm == 0.0
    (args,) = parse_script_arguments(parser, [str(config), "--max_grad_norm", "1.0"])
    assert args.learning_rate == 5e-5 and args.max_grad_norm == 1.0


def test_set_optimizer_keeps_an_explicit_learning_rate_and_fills_a_missing_one(tmp_path):
    args = _args(tmp_path)
    args.set_optimizer(name="dog", learning_rate=5e-5)
    assert args.learning_rate == 5e-5
    args.set_optimizer(name="dog")  # the stock method would reset it to 5e-5: counts as unset
    assert args.learning_rate == 1.0
    later = _args(tmp_path, optim="adamw_torch")
    later.learning_rate = 5e-5  # assigned after construction: the user's value
    later.set_optimizer(name="dog", learning_rate=later.learning_rate)
    assert later.learning_rate == 5e-5


# --- optimizer mistakes fail when the arguments are built (issue 18.2) --------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim", "prodigy", "--optim_args", "beta2=1.5"],
         "optim='prodigy': Invalid betas[1]: 1.5; allowed: a number in [0.0, 1.0) "
         "(from optim_args='beta2=1.5')"),
        (["--optim", "adopt", "--optim_args", "eps=-1"],
         "optim='adopt': Invalid eps: -1.0; allowed: a finite number > 0 "
         "(from optim_args='eps=-1')"),
        (["--optim", "dog", "--learning_rate=-1e-3"],
         "optim='dog': Invalid lr: -0.001; allowed: a finite number >= 0 "
         "(from learning_rate=-0.001)"),
        (["--optim", "dadapt_adam", "--adam_beta2", "1.5"],
         "optim='dadapt_adam': Invalid betas[1]: 1.5; allowed: a number in [0.0, 1.0) "
         "(from adam_beta1=0.9, adam_beta2=1.5)"),
        (["--optim", "hyper_sgd", "--weight_decay=-0.1"],
         "optim='hyper_sgd': Invalid weight_decay: -0.1; allowed: a finite number >= 0 "
         "(from weight_decay=-0.1)"),
        (["--optim", "adopt", "--optim_args", "d0=1e-5"],
         "optim_args: Unknown hyperparameter 'd0' for optimizer 'adopt'; valid: "),
        (["--optim", "adopt", "--max_consecutive_skipped_steps=-1"],
         "max_consecutive_skipped_steps must be >= 0 (0: never stop), got -1"),
    ],
)  # fmt: skip
def test_bad_optimizer_values_fail_while_parsing_with_one_line(tmp_path, argv, message):
    from hf_tuningfree.hf.errors import OptimizerArgumentError

    with pytest.raises(OptimizerArgumentError) as info:
        _parse(tmp_path, *argv)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text
