"""configs/: Accelerate configs read by Accelerate's own loader and launcher logic, one real
two-rank CPU launch, and the experiment YAMLs parsed into the scripts' argument dataclasses."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

from hf_tuningfree.data.resolve import offline_names
from hf_tuningfree.hf.script_args import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    field_names,
)
from hf_tuningfree.optim import available_optimizers, get_optimizer_spec

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
EXPERIMENTS = ROOT / "configs" / "experiments"

# file -> (distributed type, processes, mixed precision)
EXPECTED_ACCELERATE = {
    "cpu_single.yaml": (DistributedType.NO, 1, "no"),
    "cpu_ddp_2proc.yaml": (DistributedType.MULTI_GPU, 2, "no"),
    "gpu_single.yaml": (DistributedType.NO, 1, "bf16"),
    "multi_gpu_ddp.yaml": (DistributedType.MULTI_GPU, 2, "bf16"),
    "fsdp2_gpt2.yaml": (DistributedType.FSDP, 2, "bf16"),
    "fsdp2_llama.yaml": (DistributedType.FSDP, 2, "bf16"),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 2, "bf16"),
}


def _launch_args(path: Path):
    """What ``accelerate launch --config_file path script.py`` makes of the file."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "script.py"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def _launch_env(path: Path):
    """The launch arguments and the environment Accelerate's launcher would give the ranks (no
    process is started)."""
    args, defaults = _launch_args(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            return args, prepare_deepspeed_cmd_env(args)[1]
        return args, prepare_multi_gpu_env(args)


def test_every_accelerate_config_is_covered():
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == sorted(EXPECTED_ACCELERATE)


@pytest.mark.parametrize("name", sorted(EXPECTED_ACCELERATE))
def test_accelerate_config_loads_with_accelerates_loader(name: str):
    config = load_config_from_file(str(ACCELERATE / name))
    assert isinstance(config, ClusterConfig)
    distributed_type, processes, precision = EXPECTED_ACCELERATE[name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == processes
    assert config.mixed_precision == precision
    assert config.use_cpu == (name == "cpu_single.yaml")
    # Accelerate copies every fsdp_config / deepspeed_config key onto the launch arguments without
    # checking it: a misspelt key would be ignored silently, so each must be a launch option.
    options = {action.dest for action in launch_command_parser()._actions}
    nested = [*config.fsdp_config, *config.deepspeed_config]
    assert [key for key in nested if key not in options] == []
    args, _ = _launch_args(ACCELERATE / name)
    assert args.num_processes == processes
    assert args.use_fsdp == (distributed_type == DistributedType.FSDP)
    assert args.use_deepspeed == (distributed_type == DistributedType.DEEPSPEED)


@pytest.mark.parametrize(
    ("name", "layer_class", "builder"),
    [
        ("fsdp2_gpt2.yaml", "GPT2Block", "tiny_gpt2"),
        ("fsdp2_llama.yaml", "LlamaDecoderLayer", "tiny_llama"),
    ],
)
def test_fsdp2_config_wraps_each_decoder_layer(monkeypatch, name, layer_class, builder):
    import helpers
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    _, env = _launch_env(ACCELERATE / name)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == layer_class
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the environment, as in each rank
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == [layer_class]
    model = getattr(helpers, builder)(vocab_size=64)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [m for m in model.modules() if policy(m)]
    assert len(wrapped) == 2 and {type(m).__name__ for m in wrapped} == {layer_class}
    other = helpers.tiny_llama(64) if builder == "tiny_gpt2" else helpers.tiny_gpt2(64)
    with pytest.raises(
        ValueError, match=f"Could not find the transformer layer class {layer_class}"
    ):
        fsdp2_prepare_auto_wrap_policy(plugin, other)


def test_deepspeed_config_is_zero_stage_2_without_offload():
    _, env = _launch_env(ACCELERATE / "deepspeed_zero2.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "none"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_multi_gpu_ddp_config_launches_two_ranks_in_bf16():
    args, env = _launch_env(ACCELERATE / "multi_gpu_ddp.yaml")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert args.multi_gpu and args.nproc_per_node == "2"
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


RANK_SCRIPT = """
import sys
from pathlib import Path
import torch.distributed as dist
from accelerate import Accelerator
state = Accelerator().state  # AcceleratorState reads ACCELERATE_USE_CPU (PartialState does not)
rank, world = state.process_index, state.num_processes
record = f"{rank} {world} {state.distributed_type} {dist.get_backend()}"
Path(sys.argv[1], f"rank{rank}.txt").write_text(record)
"""


def test_cpu_ddp_2proc_config_starts_two_gloo_ranks(tmp_path: Path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    config = str(ACCELERATE / "cpu_ddp_2proc.yaml")
    result = subprocess.run(
        [*launch, "--config_file", config, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert records == [
        "0 2 DistributedType.MULTI_CPU gloo",
        "1 2 DistributedType.MULTI_CPU gloo",
    ]


# --- experiment YAMLs ---------------------------------------------------------------------------

TRAINING_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
#: The WikiText-2 experiments: one per optimizer family (ADOPT, D-Adaptation, Prodigy, DoG,
#: hypergradient descent) and the tuned baseline.
WIKITEXT_OPTIMIZERS = {"adopt", "dadapt_adam", "prodigy", "dog", "hyper_adam", "adamw_torch_fused"}
EXPERIMENT_FILES = sorted(EXPERIMENTS.glob("*.yaml"))


def _experiment(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f"{path.name} is not a YAML mapping"
    return data


def test_experiment_set_covers_every_optimizer_family_and_the_offline_defaults():
    names = [p.name for p in EXPERIMENT_FILES]
    wikitext = {_experiment(p)["optim"] for p in EXPERIMENT_FILES if "wikitext2" in p.name}
    assert wikitext == WIKITEXT_OPTIMIZERS
    assert {n for n in names if n.startswith("llama2_7b_lora")} >= {
        "llama2_7b_lora_mmlu_adamw.yaml"
    }
    assert {n for n in names if n.startswith("offline_")} == {
        "offline_gpt2_small_shakespeare.yaml",
        "offline_gpt2_tiny_pydoc.yaml",
        "offline_llama_tiny_lora_synthetic_mc.yaml",
        "offline_smollm2_lora_synthetic_mc.yaml",
    }


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.name)
def test_experiment_yaml_parses_into_the_scripts_arguments(path: Path):
    data = _experiment(path)
    unknown = set(data) - field_names() - TRAINING_FIELDS
    assert unknown == set(), f"{path.name}: keys no argument group declares: {sorted(unknown)}"
    optim = data["optim"]
    stock = {o.value for o in OptimizerNames}
    assert optim in stock or optim in available_optimizers(), f"{path.name}: unknown optim {optim}"
    # The stock TrainingArguments rejects registry names and bf16 on a CPU, so those two keys are
    # swapped for the parse; every other key goes through HfArgumentParser's type conversion.
    parseable = {**data, "optim": "adamw_torch", "bf16": False, "use_cpu": True}
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, TrainingArguments))
    model_args, data_args, lora_args, training_args = parser.parse_dict(parseable)
    assert model_args.model_name_or_path == data["model_name_or_path"]
    assert data_args.dataset_name == data["dataset_name"]
    assert training_args.output_dir == data["output_dir"]
    assert training_args.learning_rate == float(data["learning_rate"])
    if path.name.startswith("offline_"):
        assert data["model_name_or_path"] in offline_names("model")
        assert data["dataset_name"] in offline_names("dataset")
        assert data.get("bf16") is not True and data["use_cpu"] is True
    if "wikitext2" in path.name:
        assert (data["model_name_or_path"], data["dataset_name"]) == (
            "openai-community/gpt2",
            "wikitext",
        )
        assert data_args.dataset_config_name == "wikitext-2-raw-v1"
        assert data_args.block_size == 1024 and data["bf16"] is True
    if "lora" in path.name:
        assert set(lora_args.lora_target_modules) <= {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert lora_args.lora_r > 0 and data_args.train_split_name == "auxiliary_train"
    if path.name.startswith("llama2_7b_lora"):
        assert model_args.model_name_or_path == "meta-llama/Llama-2-7b-hf"
        assert model_args.dtype == "bfloat16" and data["bf16"] is True
        assert (lora_args.lora_r, lora_args.lora_alpha) == (16, 32)
        assert lora_args.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_experiment_multiplier_is_the_registry_default():
    """Where ``learning_rate`` is a multiplier of an estimated step (D-Adaptation, Prodigy, DoG),
    an experiment file runs the registry's measured default: a file that kept an older default
    (dadapt_adam's paper value 1.0 after the suite chose 0.5) would run a setting the README's
    tables no longer describe."""
    checked, wrong = [], []
    for path in EXPERIMENT_FILES:
        data = _experiment(path)
        if data["optim"] not in available_optimizers():
            continue
        spec = get_optimizer_spec(data["optim"])
        if spec.lr_is_multiplier:
            checked.append(path.name)
            if float(data["learning_rate"]) != spec.lr:
                wrong.append((path.name, data["learning_rate"], spec.lr))
    assert wrong == []
    expected = {"gpt2_wikitext2_dadapt_adam.yaml", "offline_gpt2_small_shakespeare.yaml"}
    assert expected <= set(checked)
