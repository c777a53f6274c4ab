"""One run of a comparison: train with the Trainer, evaluate, score multiple choice."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_tuningfree.compare.spec import RunSpec, TaskSpec
from hf_tuningfree.compare.tasks import build_task

_LOGGED = ("step", "loss", "eval_loss", "learning_rate")


def _history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The Trainer's log history reduced to what the report needs (losses, the scheduled
    learning rate, the optimizer's ``optim/...`` statistics)."""
    return [
        {k: float(v) for k, v in h.items() if k in _LOGGED or k.startswith("optim/")}
        for h in log_history
        if "loss" in h or "eval_loss" in h
    ]


def _state_measures(optimizer: Any, averager: Any) -> dict[str, float]:
    """The optimizer's state, each storage once (:func:`hf_tuningfree.optim.state_bytes`, which
    counts torch's optimizers too): MiB in all (the iterate average's copy included, when the run
    keeps one) and per-parameter bytes per trainable element."""
    from hf_tuningfree.optim import state_bytes

    counted = state_bytes(optimizer)
    average = getattr(averager, "_avg", None) or {}
    avg_bytes = sum(t.untyped_storage().nbytes() for t in average.values())
    per_element = (counted.per_parameter + avg_bytes) / max(counted.elements, 1)
    return {
        "optimizer_state_mb": (counted.total + avg_bytes) / 2**20,
        "optimizer_state_bytes_per_param": per_element,
    }


def train_and_score(task: TaskSpec, run: RunSpec, output_dir: Path) -> dict[str, Any]:
    from hf_tuningfree.hf import TuningFreeTrainer, TuningFreeTrainingArguments
    from hf_tuningfree.hf.lora import trainable_parameters
    from hf_tuningfree.hf.trainer import unwrap_optimizer

    torch.set_num_threads(1)
    variant = run.variant  # registry name and a variant's hyperparameters (lr among them)
    overrides = variant.kwargs()
    lr_value = run.lr if run.lr is not None else overrides.pop("lr", None)
    built = build_task(task, output_dir / "cache")
    model = built.make_model(run.seed)
    trainable, total = trainable_parameters(model)
    use_cpu = not torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="hf_tuningfree_run_") as tmp:
        # lr None: not set, so the optimizer's recommendation applies (an explicit value, even
        # the stock 5e-5, would be kept as given)
        lr = {"learning_rate": lr_value} if lr_value is not None else {}
        args = TuningFreeTrainingArguments(
            tmp,
            optim=variant.name,
            optim_args=",".join(f"{k}={v}" for k, v in overrides.items()) or None,
            **lr,
            max_steps=task.max_steps,
            per_device_train_batch_size=task.batch_size,
            per_device_eval_batch_size=task.batch_size,
            eval_strategy="steps",
            eval_steps=task.eval_every,
            logging_steps=task.logging_every,
            save_strategy="no",
            report_to=[],
            seed=run.seed,
            data_seed=run.seed,
            use_cpu=use_cpu,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = TuningFreeTrainer(
            model=model,
            args=args,
            train_dataset=built.train_dataset,
            eval_dataset=built.eval_dataset,
            data_collator=built.data_collator,
        )
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
        final = trainer.evaluate()
        history = _history(trainer.state.log_history)
        losses = [h["loss"] for h in history if "loss" in h] + [final["eval_loss"]]
        diverged = any(not math.isfinite(x) for x in losses)
        result: dict[str, Any] = {
            "status": "diverged" if diverged else "ok",
            "optimizer_class": type(unwrap_optimizer(trainer.optimizer)).__name__,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", "")),
            "final_eval_loss": float(final["eval_loss"]),
            "perplexity": float(math.exp(final["eval_loss"]))
            if math.isfinite(final["eval_loss"]) and final["eval_loss"] < 700
            else float("inf"),
            "train_seconds": train_seconds,
            **_state_measures(unwrap_optimizer(trainer.optimizer), trainer.averager),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "averaged": trainer.averager is not None,
            "log_history": history,
        }
        group = unwrap_optimizer(trainer.optimizer).param_groups[0]  # what the run used
        result["hyperparameters"] = {
            k: v for k, v in group.items() if isinstance(v, (bool, int, float, str, type(None)))
        }  # the lr before the schedule scaled it:
        result["hyperparameters"]["lr"] = group.get("initial_lr", group["lr"])
        stats = getattr(unwrap_optimizer(trainer.optimizer), "stats", None)
        result["final_stats"] = stats() if stats else {}
        if built.mc_test is not None and not diverged:
            from hf_tuningfree.eval import score_mmlu

            with trainer.averaged_weights():
                mc = score_mmlu(
                    trainer.model,
                    built.mc_test,
                    tokenizer=built.tokenizer,
                    fewshot=built.mc_dev,
                    shots=task.mc_shots,
                    batch_size=16,
                    progress=False,
                )
            result["mc_accuracy"] = mc.accuracy
            result["mc_macro_accuracy"] = mc.macro_accuracy
            result["mc_questions"] = mc.count
    return result
