"""The optimizer section of the model card the Trainer writes (``create_model_card``)."""

from __future__ import annotations

import re
from typing import Any

from hf_tuningfree.optim.registry import get_optimizer_spec

_SKIP_KEYS = {"params", "param_names", "initial_lr"}


def _hyperparameters(optimizer: Any) -> dict[str, Any]:
    if optimizer is None or not getattr(optimizer, "param_groups", None):
        return {}
    group = optimizer.param_groups[0]
    out = {k: v for k, v in group.items() if k not in _SKIP_KEYS and not isinstance(v, dict)}
    if "initial_lr" in group:  # the configured value, not what the schedule left at the end
        out["lr"] = group["initial_lr"]
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def rewrite_optimizer_line(text: str, name: str, optimizer: Any) -> str:
    """Replace the stock card's ``- optimizer: Use <name> with betas=(adam_beta1, ...)`` line,
    which quotes AdamW's arguments, with the optimizer actually used."""
    cls = type(optimizer).__name__ if optimizer is not None else name
    hp = ", ".join(f"{k}={_fmt(v)}" for k, v in _hyperparameters(optimizer).items() if k != "lr")
    line = f"- optimizer: {cls} (hf_tuningfree `optim={name}`) with {hp}"
    return re.sub(r"^- optimizer: .*$", lambda _m: line, text, count=1, flags=re.MULTILINE)


def optimizer_card_section(name: str, optimizer: Any, *, averaged: bool = False) -> str:
    """Markdown: what the optimizer is, its hyperparameters, its final adapted values, the paper."""
    spec = get_optimizer_spec(name)
    lines = [
        "## Optimizer",
        "",
        f'Trained with **{spec.cls.__name__}** (`optim="{name}"`, hf_tuningfree): '
        f"{spec.description}.",
    ]
    if spec.lr_is_multiplier:
        lines.append(
            "Its learning rate is a multiplier of the step size the optimizer estimates itself; "
            "it was not tuned."
        )
    if averaged:
        lines.append(
            "The saved weights are the polynomial-decay average of the iterates "
            "(Ivgi et al., 2023)."
        )
    hp = _hyperparameters(optimizer)
    if hp:
        lines += ["", "| hyperparameter | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in hp.items()]
    stats = optimizer.stats() if hasattr(optimizer, "stats") else {}
    if stats:
        lines += ["", "Final adapted values (`optimizer.stats()`):", ""]
        lines += ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(float(v))} |" for k, v in stats.items()]
    lines += ["", f"Paper: {spec.paper}.", ""]
    return "\n".join(lines)
