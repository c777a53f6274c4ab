"""Registry-driven optimizer construction for the Trainer: one place shared by every entry point.

``TuningFreeTrainingArguments``, ``TuningFreeTrainer``, the stock-Trainer handlers that
``install()`` registers, and the public factory in :mod:`hf_tuningfree.hf.factory` all build
optimizers through :func:`optimizer_cls_and_kwargs` and apply the registry's recommendations through
:func:`apply_recommended_defaults`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from transformers import TrainingArguments

from hf_tuningfree.optim.registry import (
    OptimizerSpec,
    available_optimizers,
    get_optimizer_spec,
    parse_hyperparameter,
)

logger = logging.getLogger("hf_tuningfree")

#: TrainingArguments fields a registry entry may recommend, and what each default means.
RECOMMENDABLE = ("learning_rate", "lr_scheduler_type", "warmup_steps", "max_grad_norm")

#: Below this, a learning rate that is a *multiplier* (D-Adaptation, Prodigy, DoG) is almost surely
#: a step size copied from an AdamW recipe.
MULTIPLIER_SUSPICIOUS_BELOW = 0.01


def stock_default(name: str, cls: type = TrainingArguments) -> Any:
    """The default of ``<cls>.<name>`` (what "the user set nothing" looks like): a subclass such
    as TRL's ``SFTConfig`` has its own defaults (learning_rate 2e-5)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)


def is_registry_optimizer(name: object) -> bool:
    value = getattr(name, "value", name)
    return isinstance(value, str) and value in available_optimizers()


def optim_name(args: TrainingArguments) -> str:
    return str(getattr(args.optim, "value", args.optim))


def parse_optim_args(name: str, text: str | None) -> dict[str, Any]:
    """``optim_args="beta2=0.999,d0=1e-5"`` typed with the registry's types for ``name``.

    Errors name the offending entry and the valid keys.
    """
    if not text:
        return {}
    spec = get_optimizer_spec(name)
    out: dict[str, Any] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if item.count("=") != 1:
            raise ValueError(
                f"optim_args entry {item!r} is not KEY=VALUE; expected e.g. "
                f"'beta2=0.999,weight_decay=0.01' (valid keys for {name}: "
                f"{', '.join(sorted(spec.hyperparameters()))})"
            )
        key, value = item.split("=")
        try:
            out[key] = parse_hyperparameter(name, key, value)
        except ValueError as exc:
            raise ValueError(f"optim_args: {exc}") from None
        except TypeError as exc:
            raise TypeError(f"optim_args: {exc}") from None
    return out


def _adam_style_overrides(spec: OptimizerSpec, args: TrainingArguments) -> dict[str, Any]:
    """``--adam_beta1/2`` and ``--adam_epsilon`` apply to optimizers with ``betas``/``eps``, but
    only when the user changed them: the stock values are AdamW's, not this optimizer's."""
    hp = spec.hyperparameters()
    out: dict[str, Any] = {}
    betas = hp.get("betas")
    if isinstance(betas, tuple) and len(betas) >= 2:
        cls = type(args)
        b1, b2 = args.adam_beta1, args.adam_beta2
        d1, d2 = stock_default("adam_beta1", cls), stock_default("adam_beta2", cls)
        if b1 != d1 or b2 != d2:
            new = list(betas)
            if b1 != d1:
                new[0] = b1
            if b2 != d2:
                new[1] = b2
            out["betas"] = tuple(new)
    if "eps" in hp and args.adam_epsilon != stock_default("adam_epsilon", type(args)):
        out["eps"] = args.adam_epsilon
    return out


def optimizer_cls_and_kwargs(
    args: TrainingArguments, **overrides: Any
) -> tuple[type, dict[str, Any]]:
    """``(optimizer class, kwargs without params)`` for ``args.optim`` (a registry name).

    Precedence, lowest to highest: registry defaults, changed ``adam_*`` arguments, ``optim_args``,
    explicit ``overrides``; ``lr`` is ``args.learning_rate``. Per-group ``weight_decay`` comes from
    the Trainer's decay/no-decay grouping.
    """
    name = optim_name(args)
    spec = get_optimizer_spec(name)
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    kwargs.update(_adam_style_overrides(spec, args))
    kwargs.update(parse_optim_args(name, args.optim_args))
    kwargs.update(overrides)
    kwargs = spec.validate_overrides(kwargs)
    return spec.cls, {**spec.defaults, **kwargs}


def recommended_values(spec: OptimizerSpec) -> dict[str, Any]:
    """The TrainingArguments values the registry recommends for ``spec``."""
    rec = {"learning_rate": spec.lr}
    rec.update({k: v for k, v in spec.trainer_defaults.items() if k in RECOMMENDABLE})
    return rec


def apply_recommended_defaults(args: TrainingArguments) -> dict[str, tuple[Any, Any]]:
    """Replace stock defaults the user did not change with the registry's recommendations.

    A field still at its stock value (``learning_rate`` 5e-5, ``lr_scheduler_type`` linear,
    ``warmup_steps`` 0, ``max_grad_norm`` 1.0) counts as "set by nobody". Explicit values always
    win; a learning rate that is a multiplier but looks like an AdamW step size gets a warning.
    Returns ``{field: (old, new)}`` for what changed and logs one line saying what and why.
    """
    name = optim_name(args)
    spec = get_optimizer_spec(name)
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in recommended_values(spec).items():
        current = getattr(args, key)
        current_plain = getattr(current, "value", current)
        default = stock_default(key, type(args))
        default_plain = getattr(default, "value", default)
        if current_plain == default_plain and current_plain != value:
            setattr(args, key, type(current)(value) if key == "lr_scheduler_type" else value)
            changes[key] = (current_plain, value)
    if changes:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        why = "lr multiplies the adapted step" if spec.lr_is_multiplier else "recommended step size"
        logger.warning(
            "hf_tuningfree: optim=%s: using the registry's recommendations where nothing was set: "
            "%s (%s; pass explicit values to override, or tuning_free_defaults=False).",
            name,
            what,
            why,
        )
    if spec.lr_is_multiplier and 0 < args.learning_rate < MULTIPLIER_SUSPICIOUS_BELOW:
        logger.warning(
            "hf_tuningfree: optim=%s with learning_rate=%g: for this optimizer learning_rate is a "
            "MULTIPLIER of the step size it estimates (recommended %g), not a step size; %g makes "
            "every step %.0fx smaller than the estimate. Use 1.0 unless you mean to shrink it.",
            name,
            args.learning_rate,
            spec.lr,
            args.learning_rate,
            spec.lr / args.learning_rate,
        )
    return changes


def deepspeed_declares_optimizer(deepspeed: object) -> bool:
    """Whether a DeepSpeed config (dict or JSON path) declares its own optimizer."""
    if not deepspeed:
        return False
    config = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)):
        with open(deepspeed, encoding="utf-8") as fh:
            config = json.load(fh)
    return isinstance(config, dict) and "optimizer" in config


def check_compatible(args: TrainingArguments) -> None:
    """Errors for combinations that cannot work with a registry optimizer."""
    name = optim_name(args)
    if deepspeed_declares_optimizer(getattr(args, "deepspeed", None)):
        raise ValueError(
            f"optim={name!r} conflicts with the DeepSpeed config, which declares its own "
            "'optimizer' section: DeepSpeed would build that optimizer and ignore optim. Remove "
            "the 'optimizer' section (the Trainer then creates the registry optimizer and sets "
            "zero_allow_untested_optimizer) or drop optim."
        )
    parse_optim_args(name, args.optim_args)
