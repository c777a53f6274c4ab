"""DeepSpeed ZeRO wiring (issue 15.3): the Trainer routes detect ZeRO stage >= 1 and give the
registry optimizers ``global_reduce="world"``, so each rank's partition contributes to one
model-wide ``d`` / distance / hypergradient.

DeepSpeed itself is not installed here (``TrainingArguments(deepspeed=...)`` requires the package
at construction), so the arguments are built without it and ``args.deepspeed`` is set afterwards:
the value the Trainer and ``create_optimizer`` read. What ZeRO does to the optimizer is simulated
on gloo: the model's parameters flattened into one vector and split between 2 ranks at an odd
point (as ZeRO partitions a flat buffer, padding aside), each rank stepping its half as its own
tensor; the halves together must equal one process stepping the whole vector.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from dist_helpers import process_group, spawn_and_collect

from hf_tuningfree.hf import TuningFreeTrainingArguments
from hf_tuningfree.hf.errors import OptimizerArgumentError
from hf_tuningfree.hf.recommend import (
    ACCELERATE_DEEPSPEED_ENV,
    deepspeed_zero_stage,
    optimizer_cls_and_kwargs,
    registry_optimizer_cls_and_kwargs,
)
from hf_tuningfree.optim.registry import available_optimizers, get_optimizer_spec

ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for name in ACCELERATE_DEEPSPEED_ENV:
        monkeypatch.delenv(name, raising=False)


def _args(optim: str, deepspeed=None, **kw) -> TuningFreeTrainingArguments:
    args = TuningFreeTrainingArguments("/tmp/hf_tuningfree_ds", optim=optim, use_cpu=True, **kw)
    args.deepspeed = deepspeed  # what --deepspeed leaves on the arguments
    return args


# ------------------------------------------------------------------------ the stage
def test_the_stage_comes_from_the_config_dict_or_file(tmp_path):
    assert deepspeed_zero_stage(_args("prodigy")) is None
    assert deepspeed_zero_stage(_args("prodigy", ZERO2)) == 2
    assert deepspeed_zero_stage(_args("prodigy", {"bf16": {"enabled": True}})) == 0
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert deepspeed_zero_stage(_args("prodigy", str(path))) == 3


def test_the_stage_comes_from_accelerates_launcher(monkeypatch, tmp_path):
    args = _args("dog")  # built first: with the variables set it would need deepspeed itself
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert deepspeed_zero_stage(args) == 2  # accelerate's DeepSpeedPlugin default
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    assert deepspeed_zero_stage(args) == 1
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    assert deepspeed_zero_stage(args) == 0  # the file wins over the stage variable
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert deepspeed_zero_stage(args) is None


def test_a_stage_that_is_not_0_to_3_is_one_clear_error():
    with pytest.raises(OptimizerArgumentError) as info:
        deepspeed_zero_stage(_args("prodigy", {"zero_optimization": {"stage": "auto"}}))
    assert str(info.value).startswith(
        "DeepSpeed zero_optimization.stage 'auto' (from the DeepSpeed config) is not 0, 1, 2 or 3"
    )


# ------------------------------------------------------------------------ what the optimizer gets
@pytest.mark.parametrize("name", available_optimizers())
def test_zero_stage_1_and_up_give_every_optimizer_world_sums(name):
    has_reduce = "global_reduce" in get_optimizer_spec(name).hyperparameters()
    for stage in (1, 2, 3):
        _, kwargs = optimizer_cls_and_kwargs(_args(name, {"zero_optimization": {"stage": stage}}))
        assert kwargs.get("global_reduce") == ("world" if has_reduce else None), (name, stage)
    _, kwargs = optimizer_cls_and_kwargs(_args(name, {"zero_optimization": {"stage": 0}}))
    assert kwargs.get("global_reduce", "auto") == "auto"
    _, kwargs = optimizer_cls_and_kwargs(_args(name))
    assert kwargs.get("global_reduce", "auto") == "auto"


def test_an_explicit_global_reduce_is_kept():
    args = _args("prodigy", ZERO2, optim_args="global_reduce=none")
    _, kwargs = registry_optimizer_cls_and_kwargs(args)
    assert kwargs["global_reduce"] == "none"


def test_layerwise_dog_under_zero_says_its_layers_are_partitions(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        registry_optimizer_cls_and_kwargs(_args("ldog", ZERO2))
    assert "ldog under DeepSpeed ZeRO stage 2: its statistics are per tensor" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_tuningfree"):
        registry_optimizer_cls_and_kwargs(_args("dog", ZERO2))
    assert "DeepSpeed" not in caplog.text


# ------------------------------------------------------------------------ a partitioned run
#: Optimizers whose statistics are model-wide sums (the ones ZeRO's partitioning affects); the
#: elementwise ADOPT needs no collective and the layer-wise L-DoG is warned about above.
PARTITIONED = ("dadapt_adam", "prodigy", "dadapt_sgd", "dog", "hyper_adam", "hyper_sgd")
N, SPLIT, STEPS = 37, 20, 30


def _flat_problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, generator=g, dtype=torch.float64), torch.randn(
        N, generator=g, dtype=torch.float64
    )


def _grad(x: torch.Tensor, target: torch.Tensor, step: int) -> torch.Tensor:
    """The gradient of a fixed quartic-plus-quadratic loss of the whole flat vector, plus a
    step-dependent drift (a stochastic-gradient stand-in), computed in full on every rank."""
    return 0.5 * (x - target) + 0.1 * (x - target) ** 3 + 0.01 * (step + 1) * target.sin()


def _kwargs(name: str, stage: int | None) -> dict:
    _, kwargs = optimizer_cls_and_kwargs(
        _args(name, None if stage is None else {"zero_optimization": {"stage": stage}})
    )
    return kwargs


def _assemble(mine: torch.Tensor, part: slice) -> torch.Tensor:
    """The whole flat vector from the ranks' partitions (itself in one process)."""
    full = torch.zeros(N, dtype=mine.dtype)
    full[part] = mine.detach()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(full)  # the other rank's entries are 0 here
    return full


def _run(name: str, x: torch.Tensor, target: torch.Tensor, part: slice, kwargs: dict):
    from hf_tuningfree.optim import create_optimizer

    mine = torch.nn.Parameter(x[part].clone())
    opt = create_optimizer(name, [mine], **kwargs)
    for step in range(STEPS):
        mine.grad = _grad(_assemble(mine, part), target, step)[part].clone()
        opt.step()
    return _assemble(mine, part)


def _zero_worker(rank: int, world: int, port: int, out: str) -> None:
    with process_group(rank, world, port):
        x, target = _flat_problem()
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        results = {name: _run(name, x, target, part, _kwargs(name, 2)) for name in PARTITIONED}
        if rank == 0:
            torch.save(results, out)


def test_two_ranks_each_stepping_half_a_flat_parameter_equal_one_process():
    x, target = _flat_problem()
    single = {
        name: _run(name, x, target, slice(0, N), _kwargs(name, stage=None)) for name in PARTITIONED
    }
    parted = spawn_and_collect(_zero_worker)
    for name in PARTITIONED:
        moved = (single[name] - x).abs().max().item()
        assert moved > 1e-4, f"{name} did not move ({moved:.2e}): the comparison would be empty"
        err = (parted[name] - single[name]).abs().max().item()
        # the same sums, added in another order (two partial sums, then gloo's): fp64 rounding
        assert err <= 1e-12 * max(1.0, single[name].abs().max().item()), (name, err)
