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
import re
from typing import Any

import torch
from transformers import TrainingArguments

from hf_tuningfree.hf.errors import OptimizerArgumentError, OptimizerArgumentTypeError
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

    Raises:
        OptimizerArgumentError: an entry that is not ``KEY=VALUE`` or an unknown key.
        OptimizerArgumentTypeError: a value of the wrong type (also a ``TypeError``).
    """
    if not text:
        return {}
    spec = get_optimizer_spec(name)
    out: dict[str, Any] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if item.count("=") != 1:
            raise OptimizerArgumentError(
                f"optim_args entry {item!r} is not KEY=VALUE; expected e.g. "
                f"'beta2=0.999,weight_decay=0.01' (valid keys for {name}: "
                f"{', '.join(sorted(spec.hyperparameters()))})"
            )
        key, value = item.split("=")
        try:
            out[key] = parse_hyperparameter(name, key, value)
        except TypeError as exc:
            raise OptimizerArgumentTypeError(f"optim_args: {exc}") from None
        except ValueError as exc:
            raise OptimizerArgumentError(f"optim_args: {exc}") from None
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


def _optimizer_kwargs(
    args: TrainingArguments, **overrides: Any
) -> tuple[OptimizerSpec, dict[str, Any], dict[str, str]]:
    """The validated keyword arguments for ``args.optim`` and, for each, the argument it came
    from (``learning_rate``, ``adam_beta2``, ``optim_args beta2=0.5``, ...)."""
    name = optim_name(args)
    spec = get_optimizer_spec(name)
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    origins = {"lr": f"learning_rate={args.learning_rate!r}"}
    adam = _adam_style_overrides(spec, args)
    kwargs.update(adam)
    if "betas" in adam:
        origins["betas"] = f"adam_beta1={args.adam_beta1!r}, adam_beta2={args.adam_beta2!r}"
    if "eps" in adam:
        origins["eps"] = f"adam_epsilon={args.adam_epsilon!r}"
    from_optim_args = parse_optim_args(name, args.optim_args)
    kwargs.update(from_optim_args)
    for key in from_optim_args:
        origins["betas" if key.startswith("beta") and key[4:].isdigit() else key] = (
            f"optim_args={args.optim_args!r}"
        )
    kwargs.update(overrides)
    for key in overrides:
        origins[key] = f"the override {key}={overrides[key]!r}"
    stage = deepspeed_zero_stage(args)
    if stage and "global_reduce" in spec.hyperparameters() and "global_reduce" not in kwargs:
        # ZeRO hands each rank's optimizer its partition only: model-wide sums must span ranks
        kwargs["global_reduce"] = "world"
        origins["global_reduce"] = f"DeepSpeed ZeRO stage {stage}"
    try:
        kwargs = spec.validate_overrides(kwargs)
    except TypeError as exc:
        raise OptimizerArgumentTypeError(str(exc)) from None
    except ValueError as exc:
        raise OptimizerArgumentError(str(exc)) from None
    return spec, {**spec.defaults, **kwargs}, origins


def optimizer_cls_and_kwargs(
    args: TrainingArguments, **overrides: Any
) -> tuple[type, dict[str, Any]]:
    """``(optimizer class, kwargs without params)`` for ``args.optim`` (a registry name).

    Precedence, lowest to highest: registry defaults, changed ``adam_*`` arguments, ``optim_args``,
    explicit ``overrides``; ``lr`` is ``args.learning_rate``. Per-group ``weight_decay`` comes from
    the Trainer's decay/no-decay grouping.
    """
    spec, kwargs, _ = _optimizer_kwargs(args, **overrides)
    return spec.cls, kwargs


_INVALID = re.compile(r"Invalid (\w+)")


def check_optimizer_arguments(args: TrainingArguments, **overrides: Any) -> None:
    """Build ``args.optim``'s optimizer on a one-element tensor, so that every check its
    constructor makes (ranges of ``lr``, ``betas``, ``eps``, ``weight_decay``, ...) runs now,
    when the arguments are built, not after the model and data are loaded. Costs well under a
    millisecond.

    Raises:
        OptimizerArgumentError: one line naming the argument the bad value came from and what the
            optimizer allows, e.g. ``optim='adopt': Invalid betas[1]: 1.5; allowed: a number in
            [0.0, 1.0) (from optim_args='beta2=1.5')``.
    """
    spec, kwargs, origins = _optimizer_kwargs(args, **overrides)
    origins.setdefault("weight_decay", f"weight_decay={args.weight_decay!r}")
    probe = torch.zeros(1, requires_grad=True)
    if "weight_decay" in spec.hyperparameters():
        # the Trainer sets weight_decay per group; as a keyword the constructor checks it
        kwargs = {**kwargs, "weight_decay": args.weight_decay}
    try:
        spec.cls([probe], **kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        found = _INVALID.search(message)
        origin = origins.get(found.group(1)) if found else None
        where = f" (from {origin})" if origin else ""
        raise OptimizerArgumentError(f"optim={spec.name!r}: {message}{where}") from None


def recommended_values(spec: OptimizerSpec) -> dict[str, Any]:
    """The TrainingArguments values the registry recommends for ``spec``."""
    rec = {"learning_rate": spec.lr}
    rec.update({k: v for k, v in spec.trainer_defaults.items() if k in RECOMMENDABLE})
    return rec


#: Attribute of a ``TrainingArguments`` object: ``{field: value}`` for the recommendable fields
#: the user did not set, with the value filled in for them (see
#: :class:`~hf_tuningfree.hf.training_args.TuningFreeTrainingArguments`). A field counts as unset
#: while it still holds that value, so a later ``args.learning_rate = ...`` is explicit.
UNSET_ATTRIBUTE = "_hf_tuningfree_unset"


#: Attribute of a ``TrainingArguments`` object: the optimizer whose recommendations were applied
#: (they are applied once, when the arguments are built or, on the stock route, when the Trainer
#: creates the optimizer).
RECOMMENDED_FOR_ATTRIBUTE = "_hf_tuningfree_recommended_for"

#: Whether arguments without a ``tuning_free_defaults`` field (stock ``TrainingArguments``, TRL's
#: configs) get the registry's recommendations; ``install(recommended_defaults=...)`` sets it.
STOCK_ARGUMENTS_GET_RECOMMENDATIONS = True


def wants_recommendations(args: TrainingArguments) -> bool:
    """``args.tuning_free_defaults``, or for classes without that field the install() setting."""
    value = getattr(args, "tuning_free_defaults", None)
    if value is None:
        return STOCK_ARGUMENTS_GET_RECOMMENDATIONS
    return bool(value)


def registry_optimizer_cls_and_kwargs(args: TrainingArguments) -> tuple[type, dict[str, Any]]:
    """What a Trainer needs for ``args.optim`` (a registry name), the one path every route
    takes: compatibility checks, the recommendations (once), the optimizer's own checks, then
    :func:`optimizer_cls_and_kwargs`."""
    check_compatible(args)
    name = optim_name(args)
    if wants_recommendations(args) and getattr(args, RECOMMENDED_FOR_ATTRIBUTE, None) != name:
        apply_recommended_defaults(args)
    check_optimizer_arguments(args)
    return optimizer_cls_and_kwargs(args)


def unset_fields(args: TrainingArguments) -> dict[str, Any] | None:
    """The recommendable fields of ``args`` that nobody set, with their current values; ``None``
    when ``args`` cannot tell (a stock ``TrainingArguments`` or TRL's ``SFTConfig``)."""
    filled = getattr(args, UNSET_ATTRIBUTE, None)
    if filled is None:
        return None
    out = {}
    for key, value in filled.items():
        current = getattr(args, key)
        if getattr(current, "value", current) == getattr(value, "value", value):
            out[key] = current
    return out


def mark_unset(args: TrainingArguments, values: dict[str, Any]) -> None:
    """Record ``values`` (``{field: value filled in}``) as not set by the user."""
    filled = dict(getattr(args, UNSET_ATTRIBUTE, None) or {})
    filled.update(values)
    object.__setattr__(args, UNSET_ATTRIBUTE, filled)


def mark_set(args: TrainingArguments, *names: str) -> None:
    """Record ``names`` as set by the user (they are never replaced by recommendations)."""
    filled = dict(getattr(args, UNSET_ATTRIBUTE, None) or {})
    for name in names:
        filled.pop(name, None)
    object.__setattr__(args, UNSET_ATTRIBUTE, filled)


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


def recommended_changes(args: TrainingArguments) -> tuple[dict[str, tuple[Any, Any]], bool]:
    """What :func:`apply_recommended_defaults` would change, ``{field: (old, new)}``, and whether
    the unset fields were known (True) or inferred from equality with the class defaults."""
    spec = get_optimizer_spec(optim_name(args))
    known = unset_fields(args)
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in recommended_values(spec).items():
        current = _plain(getattr(args, key))
        if known is not None:
            unset = key in known
        else:
            unset = current == _plain(stock_default(key, type(args)))
        if unset and current != value:
            changes[key] = (current, value)
    return changes, known is not None


def set_recommended(args: TrainingArguments, changes: dict[str, tuple[Any, Any]]) -> None:
    """Write the new values of ``changes`` (from :func:`recommended_changes`) into ``args``."""
    for key, (_, new) in changes.items():
        current = getattr(args, key)
        setattr(args, key, type(current)(new) if key == "lr_scheduler_type" else new)
    if getattr(args, UNSET_ATTRIBUTE, None) is not None:
        mark_unset(args, {key: getattr(args, key) for key in changes})


def describe_changes(name: str, changes: dict[str, tuple[Any, Any]], known: bool, cls: type) -> str:
    """The log line for ``changes``: exactly what was replaced, why, and how to keep it."""
    spec = get_optimizer_spec(name)
    what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
    why = "lr multiplies the adapted step" if spec.lr_is_multiplier else "recommended step size"
    if known:
        return (
            f"hf_tuningfree: optim={name}: not set, so the registry's recommendations are used: "
            f"{what} ({why}). Set any of them to keep your value, or tuning_free_defaults=False."
        )
    return (
        f"hf_tuningfree: optim={name}: the registry's recommendations replace {what} ({why}): "
        f"these values equal {cls.__name__}'s defaults, which it cannot tell from values you "
        "set. To keep them, use TuningFreeTrainingArguments (it knows what was set) or call "
        "hf_tuningfree.hf.install(recommended_defaults=False)."
    )


def apply_recommended_defaults(
    args: TrainingArguments, *, log: bool = True
) -> dict[str, tuple[Any, Any]]:
    """Replace the values nobody set with the registry's recommendations for ``args.optim``.

    ``learning_rate``, ``lr_scheduler_type``, ``warmup_steps`` and ``max_grad_norm`` count as
    "not set" when ``args`` records them so (:class:`TuningFreeTrainingArguments` does: its
    fields default to ``None`` and it remembers which ones were filled in); for other classes
    (stock ``TrainingArguments``, TRL's ``SFTConfig``) a value equal to the class default counts
    as not set, and the log line says so and how to keep it. A learning rate that is a multiplier
    but looks like an AdamW step size gets a warning.

    Returns ``{field: (old, new)}`` for what changed; ``log`` writes one line saying what and why.
    """
    name = optim_name(args)
    spec = get_optimizer_spec(name)
    changes, known = recommended_changes(args)
    set_recommended(args, changes)
    object.__setattr__(args, RECOMMENDED_FOR_ATTRIBUTE, name)
    if changes and log:
        logger.warning(describe_changes(name, changes, known, type(args)))
    if log:
        warn_multiplier(spec, args.learning_rate)
    return changes


def warn_multiplier(spec: OptimizerSpec, learning_rate: float) -> None:
    """Warn when ``learning_rate`` for an optimizer whose lr is a multiplier looks like an
    AdamW step size."""
    if spec.lr_is_multiplier and 0 < learning_rate < MULTIPLIER_SUSPICIOUS_BELOW:
        logger.warning(
            "hf_tuningfree: optim=%s with learning_rate=%g: for this optimizer learning_rate is a "
            "MULTIPLIER of the step size it estimates (recommended %g), not a step size; %g makes "
            "every step %.0fx smaller than the estimate. Use 1.0 unless you mean to shrink it.",
            spec.name,
            learning_rate,
            spec.lr,
            learning_rate,
            spec.lr / learning_rate,
        )


def _deepspeed_config(deepspeed: object) -> dict[str, Any] | None:
    """A DeepSpeed config given as a dict or a JSON file's path (``--deepspeed``), else None."""
    if not deepspeed:
        return None
    config = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)):
        with open(deepspeed, encoding="utf-8") as fh:
            config = json.load(fh)
    return config if isinstance(config, dict) else None


def deepspeed_declares_optimizer(deepspeed: object) -> bool:
    """Whether a DeepSpeed config (dict or JSON path) declares its own optimizer."""
    config = _deepspeed_config(deepspeed)
    return config is not None and "optimizer" in config


#: Accelerate's launcher (``accelerate launch --use_deepspeed`` or a DeepSpeed ``accelerate
#: config``) passes its DeepSpeed settings to the processes in these variables; the Trainer then
#: builds its DeepSpeed plugin from them.
ACCELERATE_DEEPSPEED_ENV = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
)
#: Accelerate's ``DeepSpeedPlugin`` default when neither a config file nor a stage is given.
_ACCELERATE_DEFAULT_ZERO_STAGE = 2


def _stage(value: object, where: str) -> int:
    try:
        stage = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        stage = -1
    if stage not in (0, 1, 2, 3):
        raise OptimizerArgumentError(
            f"DeepSpeed zero_optimization.stage {value!r} (from {where}) is not 0, 1, 2 or 3; the "
            "registry optimizers need the stage to know whether each rank holds a partition"
        )
    return stage


def deepspeed_zero_stage(args: Any) -> int | None:
    """The DeepSpeed ZeRO stage of the run ``args`` describe, or None without DeepSpeed.

    Read from the Trainer's ``deepspeed`` argument (a config dict or JSON file; no
    ``zero_optimization`` section is stage 0) or, where that is not set, from Accelerate's
    launcher variables (:data:`ACCELERATE_DEEPSPEED_ENV`: the config file it names, else
    ``ACCELERATE_DEEPSPEED_ZERO_STAGE``, else Accelerate's default, 2).

    Under ZeRO stage >= 1 every rank's optimizer steps only its partition of the (flattened)
    parameters, so D-Adaptation's and Prodigy's numerator, DoG's distances and the
    hypergradient dot products must be summed over the ranks: the Trainer routes then pass
    ``global_reduce="world"`` (unless ``optim_args`` sets it). Stage 0 keeps whole parameters
    on every rank (data parallel): no collective is needed.

    Raises:
        OptimizerArgumentError: a stage that is not 0-3.
    """
    config = _deepspeed_config(getattr(args, "deepspeed", None))
    if config is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
        "1",
        "true",
        "yes",
    ):
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and config_file.lower() != "none":
            config = _deepspeed_config(config_file)
        else:
            stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
            where = "ACCELERATE_DEEPSPEED_ZERO_STAGE"
            return _stage(_ACCELERATE_DEFAULT_ZERO_STAGE if stage is None else stage, where)
    if config is None:
        return None
    zero = config.get("zero_optimization") or {}
    return _stage(zero.get("stage", 0), "the DeepSpeed config")


def check_compatible(args: TrainingArguments) -> None:
    """Errors for combinations that cannot work with a registry optimizer."""
    name = optim_name(args)
    if deepspeed_declares_optimizer(getattr(args, "deepspeed", None)):
        raise OptimizerArgumentError(
            f"optim={name!r} conflicts with the DeepSpeed config, which declares its own "
            "'optimizer' section: DeepSpeed would build that optimizer and ignore optim. Remove "
            "the 'optimizer' section (the Trainer then creates the registry optimizer and sets "
            "zero_allow_untested_optimizer) or drop optim."
        )
    parse_optim_args(name, args.optim_args)
    stage = deepspeed_zero_stage(args)
    if stage and getattr(get_optimizer_spec(name).cls, "_layerwise", False):
        logger.warning(
            "hf_tuningfree: optim=%s under DeepSpeed ZeRO stage %d: its statistics are per "
            "tensor, and ZeRO hands each rank one flat partition per param group, so its "
            "'layers' become partitions of the flattened model, not the model's layers. Use "
            "optim='dog' (model-wide statistics) for the same method without that dependence.",
            name,
            stage,
        )
