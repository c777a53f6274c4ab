"""The optimizer registry: lookup, overrides, typed parsing, registration, import footprint."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from hf_tuningfree.optim import (
    ADOPT,
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_optimizer_spec,
    parse_hyperparameter,
    register_optimizer,
    registry_table,
)
from hf_tuningfree.optim import registry as registry_module


def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adam_x'.*adopt"):
        create_optimizer("adam_x", _params())


def test_overrides_are_applied_and_registry_defaults_kept():
    opt = create_optimizer("adopt", _params(), weight_decay=0.1, beta2=0.999)
    group = opt.param_groups[0]
    assert isinstance(opt, ADOPT)
    assert group["lr"] == get_optimizer_spec("adopt").lr == 1e-3
    assert group["weight_decay"] == 0.1
    assert group["betas"] == (0.9, 0.999)


def test_unknown_override_names_the_key_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown hyperparameter 'd0'.*'betas'"):
        create_optimizer("adopt", _params(), d0=1e-6)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"lr": "1e-3"}, "'lr' of optimizer 'adopt' must be float"),
        ({"maximize": 1}, "'maximize' of optimizer 'adopt' must be bool"),
        (
            {"betas": (0.9, 0.99, 0.9)},
            r"'betas' of optimizer 'adopt' must be tuple\[float, float\]",
        ),
        ({"clip_exponent": "off"}, "'clip_exponent'"),
    ],
)
def test_ill_typed_override_names_the_key(override, match):
    with pytest.raises(TypeError, match=match):
        create_optimizer("adopt", _params(), **override)


def test_beta_alias_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="beta3"):
        create_optimizer("adopt", _params(), beta3=0.9)


def _constructor_arguments(cls) -> list[str]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    signature = inspect.signature(cls.__init__).parameters
    return [k for k, p in signature.items() if k not in ("self", "params") and p.kind not in kinds]


def _as_text(value) -> str:
    """How ``optim_args`` or a command line writes a value."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("name", available_optimizers())
def test_every_constructor_argument_is_reachable_by_name(name):
    """Each argument of the class's constructor is accepted by ``create_optimizer(name, ...,
    key=value)`` and parsed from text by ``parse_hyperparameter`` (what the Trainer's
    ``optim_args`` uses) to the same value, none mistaken for an alias (issue 18.4: Prodigy's
    ``beta3`` was read as the third entry of ``betas``)."""
    spec = get_optimizer_spec(name)
    hyperparameters = spec.hyperparameters()
    names = _constructor_arguments(spec.cls)
    assert set(names) <= set(hyperparameters)
    for key in names:
        value = hyperparameters[key]
        opt = create_optimizer(name, _params(), **{key: value})
        assert type(opt) is spec.cls, key
        assert parse_hyperparameter(name, key, _as_text(value)) == value, key


def test_prodigy_beta3_is_its_own_argument():
    opt = create_optimizer("prodigy", _params(), beta3=0.99)
    assert opt.param_groups[0]["beta3"] == 0.99
    assert opt.param_groups[0]["betas"] == get_optimizer_spec("prodigy").hyperparameters()["betas"]
    assert parse_hyperparameter("prodigy", "beta3", "0.99") == 0.99
    # betaN stays an alias where the constructor has no such argument
    assert create_optimizer("adopt", _params(), beta1=0.8).param_groups[0]["betas"][0] == 0.8


def test_lists_are_accepted_for_tuples():
    opt = create_optimizer("adopt", _params(), betas=[0.8, 0.99])
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("lr", "3e-4", 3e-4),
        ("beta2", "0.999", 0.999),
        ("betas", "(0.8,0.95)", (0.8, 0.95)),
        ("clip_exponent", "None", None),
        ("clip_exponent", "0.5", 0.5),
        ("maximize", "true", True),
        ("decoupled_weight_decay", "0", False),
        ("implementation", "foreach", "foreach"),
    ],
)
def test_parse_hyperparameter_types_text_from_the_signature(key, text, expected):
    assert parse_hyperparameter("adopt", key, text) == expected


def test_parse_hyperparameter_errors_name_key_and_type():
    with pytest.raises(TypeError, match="'lr' of optimizer 'adopt' must be float, got 'fast'"):
        parse_hyperparameter("adopt", "lr", "fast")
    with pytest.raises(ValueError, match="Unknown hyperparameter 'gamma'"):
        parse_hyperparameter("adopt", "gamma", "1")


def test_register_rejects_duplicates_and_bad_names(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    spec = OptimizerSpec("my_sgd", torch.optim.SGD, 0.1, "plain SGD for a test", "Robbins 1951")
    register_optimizer(spec)
    assert "my_sgd" in available_optimizers()
    assert "my_sgd" in available_optimizers(tuning_free_only=True)  # tuning_free defaults True
    baseline = OptimizerSpec("my_sgd_baseline", torch.optim.SGD, 0.1, "x", "y", tuning_free=False)
    register_optimizer(baseline)
    assert "my_sgd_baseline" in available_optimizers()
    assert "my_sgd_baseline" not in available_optimizers(tuning_free_only=True)
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(spec)
    with pytest.raises(ValueError, match="Invalid optimizer name"):
        register_optimizer(OptimizerSpec("My-SGD", torch.optim.SGD, 0.1, "x", "y"))
    with pytest.raises(TypeError, match="Optimizer subclass"):
        register_optimizer(OptimizerSpec("not_opt", dict, 0.1, "x", "y"))  # type: ignore[arg-type]
    opt = create_optimizer("my_sgd", _params(), momentum=0.9)
    assert opt.param_groups[0]["momentum"] == 0.9


def test_registry_table_lists_every_optimizer():
    table = registry_table()
    for name in available_optimizers():
        assert f"`{name}`" in table
    assert table.count("\n") == len(available_optimizers()) + 1


def test_optim_package_imports_with_torch_only():
    code = (
        "import sys\n"
        "for m in ('transformers', 'accelerate', 'datasets', 'peft', 'evaluate'):\n"
        "    sys.modules[m] = None\n"
        "import hf_tuningfree, hf_tuningfree.optim\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers','accelerate','datasets','peft','evaluate') and sys.modules[m]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_readme_table_is_the_registry_table():
    from script_loader import load_script

    tool = load_script("update_readme_table")
    text = tool.README.read_text(encoding="utf-8")
    assert tool.table_block(text) == registry_table(), (
        "run `python scripts/update_readme_table.py` to update README.md"
    )
    assert tool.main(["--check"]) == 0


def test_readme_tool_rewrites_only_the_marked_block_of_the_readme_it_is_given(tmp_path):
    from script_loader import load_script

    tool = load_script("update_readme_table")
    text = "intro\n<!-- registry-table:start x -->\nold\n<!-- registry-table:end -->\nrest\n"
    new = tool.replace_readme_table(text, "NEW")
    assert new == "intro\n<!-- registry-table:start x -->\nNEW\n<!-- registry-table:end -->\nrest\n"
    with pytest.raises(ValueError, match="registry-table"):
        tool.replace_readme_table("no markers", "NEW")
    readme = tmp_path / "README.md"
    readme.write_text(text, encoding="utf-8")
    assert tool.main(["--readme", str(readme), "--check"]) == 1
    assert readme.read_text(encoding="utf-8") == text  # --check writes nothing
    assert tool.main(["--readme", str(readme)]) == 0
    assert tool.table_block(readme.read_text(encoding="utf-8")) == registry_table()
    assert tool.main(["--readme", str(readme), "--check"]) == 0


# ---------------------------------------------------------------------- the recommended name
def test_tuningfree_is_the_recommended_entry_under_a_second_name():
    from hf_tuningfree.optim.registry import RECOMMENDED, RECOMMENDED_TARGET

    assert RECOMMENDED == "tuningfree"
    alias, target = get_optimizer_spec("tuningfree"), get_optimizer_spec(RECOMMENDED_TARGET)
    assert alias.alias_of == RECOMMENDED_TARGET and target.alias_of is None
    assert (alias.cls, alias.lr, dict(alias.defaults)) == (target.cls, target.lr, target.defaults)
    assert dict(alias.trainer_defaults) == dict(target.trainer_defaults)
    assert alias.hyperparameters() == target.hyperparameters()
    opt = create_optimizer("tuningfree", _params())
    ref = create_optimizer(RECOMMENDED_TARGET, _params())
    assert type(opt) is type(ref)
    assert opt.param_groups[0].keys() == ref.param_groups[0].keys()
    assert all(
        opt.param_groups[0][k] == ref.param_groups[0][k]
        for k in ref.param_groups[0]
        if k != "params"
    )


def test_tuningfree_is_marked_first_in_the_listing_and_left_out_of_compare_defaults():
    table = registry_table().splitlines()
    assert table[2].startswith("| `tuningfree` |") and "**recommended**" in table[2]
    assert sum("**recommended**" in row for row in table) == 1
    assert "tuningfree" in available_optimizers()
    assert "tuningfree" not in available_optimizers(tuning_free_only=True, aliases=False)
    assert available_optimizers(aliases=False) == [
        n for n in available_optimizers() if n != "tuningfree"
    ]


def test_an_alias_of_an_alias_is_refused(monkeypatch):
    from hf_tuningfree.optim.registry import register_alias

    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    with pytest.raises(ValueError, match="'tuningfree' is itself an alias"):
        register_alias("again", "tuningfree")
    spec = register_alias("tuningfree", "prodigy")  # re-pointing the name replaces it
    assert get_optimizer_spec("tuningfree").cls is get_optimizer_spec("prodigy").cls
    assert spec.alias_of == "prodigy"


def test_tuningfree_round_trips_through_the_trainer_arguments(tmp_path):
    import json

    from transformers import HfArgumentParser

    from hf_tuningfree import TuningFreeTrainingArguments
    from hf_tuningfree.hf import optimizer_cls_and_kwargs
    from hf_tuningfree.optim.registry import RECOMMENDED_TARGET

    target = get_optimizer_spec(RECOMMENDED_TARGET)
    parser = HfArgumentParser(TuningFreeTrainingArguments)
    argv = ["--output_dir", str(tmp_path), "--optim", "tuningfree", "--report_to", "none"]
    (args,) = parser.parse_args_into_dataclasses(argv)
    assert args.optim == "tuningfree"
    assert args.learning_rate == target.lr  # the target's recommendation, applied
    for key, value in target.trainer_defaults.items():
        if hasattr(args, key):
            assert getattr(args, key) == value, key
    cls, kwargs = optimizer_cls_and_kwargs(args)
    assert cls is target.cls
    again = TuningFreeTrainingArguments(**json.loads(args.to_json_string()))
    assert again.optim == "tuningfree"
    assert optimizer_cls_and_kwargs(again) == (cls, kwargs)


@pytest.mark.parametrize("name", available_optimizers())
def test_the_declared_step_size_key_is_in_stats(name):
    """``step_size_key`` names a positive, finite ``stats()`` entry after a few steps, and every
    optimizer that estimates its own step (``lr_is_multiplier``) declares one."""
    spec = get_optimizer_spec(name)
    if spec.step_size_key is None:
        assert not spec.lr_is_multiplier, "an optimizer that estimates its step must declare it"
        return
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = create_optimizer(name, [p])
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    value = opt.stats()[spec.step_size_key]
    assert 0 < value < float("inf")
