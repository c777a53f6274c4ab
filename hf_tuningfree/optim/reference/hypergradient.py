"""Hypergradient descent with towers of hyperoptimizers, the paper's way: by autograd.

Chandra, Xie, Ragan-Kelley & Meijer, "Gradient Descent: The Ultimate Optimizer", NeurIPS 2022
(arXiv:1909.13371), Section 2 (the hypergradient ``dL_t/dh = <g_t, dx_t/dh>`` obtained by
backpropagating through the last update, the optimizer state detached) and Section 3 (towers:
each level's step size is a hyperparameter of the level below, updated top-down), building on
Baydin et al., "Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018.

As the authors' implementation, every level's hyperparameters are tensors in the autograd graph:
``x_t = x_{t-1}.detach() - u(theta_0)`` and ``theta_{j-1} = theta_{j-1}.detach() - kappa_j(theta_j)
D_j``; a step's hypergradients of every level come from one ``autograd.grad``. The loss is known
here only through its gradient ``g_t`` at ``x_t`` (the common calling convention), and
``dL_t/d theta = <g_t, dx_t/d theta>``, so the differentiated scalar is ``<g_t, x_t>`` with
``g_t`` a constant: the same chain rule the paper's ``backward`` runs. Element values are fp64
torch tensors (one per parameter tensor); nothing is shared with the implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .problems import Gradient, Layout

F64 = torch.float64
#: The learnable hyperparameters of each base optimizer, step size first.
LEARNABLE = {
    "sgd": ("lr", "momentum"),
    "adam": ("lr", "beta1", "beta2"),
    "adagrad": ("lr",),
    "rmsprop": ("lr", "decay"),
}


def natural(name: str, raw: Any, lr_parametrization: str = "log") -> Any:
    """The value a raw (learned) variable stands for: momentum, betas and RMSProp's decay through
    ``(tanh(z) + 1) / 2`` (the authors' scaled sigmoid); step sizes through ``exp`` ("log"),
    ``square`` (the authors' RMSProp) or unchanged ("identity")."""
    if name == "lr":
        return {"log": torch.exp, "square": torch.square, "identity": lambda r: r}[
            lr_parametrization
        ](raw)
    return (torch.tanh(raw) + 1) / 2


def raw(name: str, value: float, lr_parametrization: str = "log") -> float:
    """The inverse of :func:`natural`."""
    if name == "lr":
        return {"log": math.log, "square": math.sqrt, "identity": float}[lr_parametrization](value)
    return math.atanh(2 * value - 1)


def initial_state(kind: str, p: torch.Tensor, group: dict[str, Any] | None = None) -> dict:
    """The base optimizer's per-tensor state before its first update (AdaGrad's sum starts at
    the group's ``initial_accumulator_value``, default 0)."""
    z = torch.zeros_like(p)
    if kind == "adagrad":
        return {"sum": z + (group or {}).get("initial_accumulator_value", 0.0)}
    return {
        "sgd": {"buf": z},
        "adam": {"m": z, "v": z.clone(), "k": 0},
        "rmsprop": {"v": z},
    }[kind]


def update(
    kind: str, x: torch.Tensor, g: torch.Tensor, state: dict, hp: dict[str, Any], group: dict
) -> tuple[torch.Tensor, dict]:
    """One update of the base optimizer, differentiable in the hyperparameters ``hp`` (natural
    values: ``lr`` and, by kind, ``momentum`` / ``beta1``, ``beta2`` / ``decay``); ``state``
    (detached) holds the per-tensor state before the update; ``group``: ``weight_decay``,
    ``eps`` (not SGD), ``decoupled_weight_decay`` (Adam, default True). Returns the new
    parameter and the new state (detached)::

        SGD:     buf = mu buf + (g + wd x);             x -= lr buf
        Adam:    m, v moments of g (+ wd x, coupled); x -= lr mhat / (sqrt(vhat) + eps)
                 (+ lr wd x, decoupled), bias corrections 1 - beta^k
        AdaGrad: sum += (g + wd x)^2;                  x -= lr (g + wd x) / (sqrt(sum) + eps)
        RMSProp: v = rho v + (1 - rho) (g + wd x)^2;   x -= lr (g + wd x) / (sqrt(v) + eps)
    """
    lr = hp["lr"]
    wd = group["weight_decay"]
    if kind == "sgd":
        gg = g + wd * x
        buf = hp["momentum"] * state["buf"] + gg
        return x - lr * buf, {"buf": buf.detach()}
    if kind == "adam":
        b1, b2 = hp["beta1"], hp["beta2"]
        decoupled = group.get("decoupled_weight_decay", True)
        k = state["k"] + 1
        gg = g if decoupled else g + wd * x
        m = b1 * state["m"] + (1 - b1) * gg
        v = b2 * state["v"] + (1 - b2) * gg * gg
        d = (m / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + group["eps"])
        x_new = x - lr * wd * x - lr * d if decoupled else x - lr * d
        return x_new, {"m": m.detach(), "v": v.detach(), "k": k}
    if kind == "adagrad":
        gg = g + wd * x
        s = state["sum"] + gg * gg
        return x - lr * gg / (torch.sqrt(s) + group["eps"]), {"sum": s.detach()}
    if kind == "rmsprop":
        gg = g + wd * x
        v = hp["decay"] * state["v"] + (1 - hp["decay"]) * gg * gg
        return x - lr * gg / (torch.sqrt(v) + group["eps"]), {"v": v.detach()}
    raise ValueError(f"Invalid kind: {kind!r}; allowed: {sorted(LEARNABLE)}")


def _names(learn: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(learn, str):
        return tuple(n for n in learn.replace(",", "+").split("+") if n)
    return tuple(learn)


def _per_level(value: Any, height: int) -> list:
    values = [value] if isinstance(value, (str, int, float)) else list(value)
    return values * height if len(values) == 1 else values


def _layout(params: dict[tuple[int, int], torch.Tensor], init: Layout) -> Layout:
    return [
        [params[(gi, pi)].detach().tolist() for pi in range(len(grp))]
        for gi, grp in enumerate(init)
    ]


def tower(
    kind: str,
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    *,
    initial: dict[str, float],
    learn: str | Sequence[str] = "lr",
    height: int = 1,
    hyper_optimizer: str | Sequence[str] = "sgd",
    hyper_lr: float | Sequence[float] = 1e-3,
    hyper_betas: tuple[float, float] = (0.9, 0.99),
    hyper_eps: float = 1e-16,
    lr_parametrization: str = "log",
    schedule: Any = None,
    per_tensor: bool = False,
) -> tuple[Layout, list[dict[str, Any]]]:
    """The base optimizer ``kind`` with a tower of ``height`` hyperoptimizers (level ``j`` SGD
    or Adam, ``hyper_optimizer[j-1]``, step size ``hyper_lr[j-1]``: fixed at the top, learned by
    the level above below it), learning the hyperparameters ``learn`` from their ``initial``
    natural values (the others stay at ``initial``).

    Per step ``t``, top-down over the levels (the paper's order): level ``j`` updates its
    variables from their hypergradient, ``D_j`` the gradient (SGD) or ``mhat / (sqrt(vhat) +
    eps)`` (Adam, its bias corrections counting from its first hypergradient, step ``j``); then
    the base update with the new hyperparameters. ``groups[i]["lr"] / initial["lr"]`` is group
    i's multiplier of the learned step size (``schedule(t)`` multiplies it too, default 1);
    groups also carry ``weight_decay``, ``eps``, ``decoupled_weight_decay``,
    ``initial_accumulator_value`` as :func:`update` reads them. A tensor without a gradient at
    step ``t`` is not updated and has no term in that step's hypergradient.

    With ``per_tensor`` every parameter tensor has a tower of its own (its own learned values
    at every level below the top, its own hyperoptimizer moments): tensor ``(i, k)``'s
    hypergradients are ``<g_t, dx_t/d theta>`` over that tensor's elements only, its step size
    starts at ``groups[i]["lr"]`` and only ``schedule`` multiplies it.

    Returns the parameters and, per step, ``{"level{j}/{name}": natural value}`` after the step
    (``level{height}/lr``: the top's fixed step size); with ``per_tensor`` each learned entry is
    the list of the tensors' values, in group order.
    """
    names = _names(learn)
    hopts = _per_level(hyper_optimizer, height)
    hyper_lrs = _per_level(hyper_lr, height)
    b1, b2 = hyper_betas
    keys = [(gi, pi) for gi, grp in enumerate(init) for pi in range(len(grp))]
    params = {(gi, pi): torch.tensor(init[gi][pi], dtype=F64) for gi, pi in keys}
    state = {key: initial_state(kind, p, groups[key[0]]) for key, p in params.items()}
    start = dict(initial)
    if "betas" in initial:  # Adam's two betas, learnable one by one
        start["beta1"], start["beta2"] = initial["betas"]
    # the towers: one for the model, or one per tensor ("owner" of the learned values)
    owners: list[Any] = list(keys) if per_tensor else [None]

    def owner_of(key: tuple[int, int]) -> Any:
        return key if per_tensor else None

    def first_values(owner: Any) -> list[dict[str, torch.Tensor]]:
        begin = dict(start)
        if owner is not None:
            begin["lr"] = groups[owner[0]]["lr"]
        levels = [{n: torch.tensor(raw(n, begin[n], lr_parametrization), dtype=F64) for n in names}]
        for j in range(1, height):
            top = raw("lr", hyper_lrs[j - 1], lr_parametrization)
            levels.append({"lr": torch.tensor(top, dtype=F64)})
        return levels

    thetas = {o: first_values(o) for o in owners}
    # Adam moments per owner, level and entry
    hstate = {o: [{n: (0.0, 0.0) for n in th} for th in thetas[o]] for o in owners}
    fixed = {k: start[k] for k in ("momentum", "decay", "beta1", "beta2") if k in start}
    history = []
    for t in range(steps):
        if t == 0:
            for o in owners:
                for th in thetas[o]:
                    for n in th:
                        th[n].requires_grad_(True)
        grads = gradient(t, _layout(params, init))
        g = {
            (gi, pi): torch.tensor(v, dtype=F64)
            for gi, grp in enumerate(grads)
            for pi, v in enumerate(grp)
            if v is not None
        }
        # dL_t/d theta = <g_t, dx_t/d theta>: differentiate <g_t, x_t> with g_t a constant
        linear = sum(((g[key] * params[key]).sum() for key in g), torch.zeros((), dtype=F64))
        inputs = [th[n] for o in owners for th in thetas[o] for n in th]
        if linear.requires_grad:
            hgrads = torch.autograd.grad(linear, inputs, allow_unused=True)
        else:
            hgrads = (None,) * len(inputs)
        hgrads = [torch.zeros((), dtype=F64) if h is None else h.detach() for h in hgrads]
        flat = iter(hgrads)
        hyper = {o: [{n: next(flat) for n in th} for th in thetas[o]] for o in owners}
        for o in owners:
            h = hyper[o]
            new: list = [None] * (height + 1)
            for j in range(height, 0, -1):  # top-down
                kappa = (
                    hyper_lrs[j - 1]
                    if j == height
                    else natural("lr", new[j]["lr"], lr_parametrization)
                )
                new[j - 1] = {}
                for n, value in thetas[o][j - 1].items():
                    if t >= j:  # level j has a hypergradient from step j + 1 on
                        if hopts[j - 1] == "adam":
                            m, v = hstate[o][j - 1][n]
                            m = b1 * m + (1 - b1) * h[j - 1][n]
                            v = b2 * v + (1 - b2) * h[j - 1][n] ** 2
                            hstate[o][j - 1][n] = (m, v)
                            k = t - j + 1
                            d = (m / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + hyper_eps)
                        else:
                            d = h[j - 1][n]
                    else:
                        d = torch.zeros((), dtype=F64)
                    new[j - 1][n] = value.detach() - kappa * d
                    if not new[j - 1][n].requires_grad:  # the top level: kappa_H is a constant
                        new[j - 1][n].requires_grad_(True)
            if height > 0:
                thetas[o] = new[:height]
        multiplier = 1.0 if schedule is None else schedule(t)
        for key in params:
            if key not in g:
                params[key] = params[key].detach()
                continue
            group = groups[key[0]]
            hp = dict(fixed)
            level0 = thetas[owner_of(key)][0]
            hp.update({n: natural(n, level0[n], lr_parametrization) for n in names})
            if "lr" not in names:
                hp["lr"] = initial["lr"]
            share = 1.0 if per_tensor else group["lr"] / initial["lr"]
            hp_key = {**hp, "lr": hp["lr"] * (share * multiplier)}
            params[key], state[key] = update(
                kind, params[key].detach(), g[key], state[key], hp_key, group
            )
        values: dict[str, Any] = {}
        for j in range(height if height > 0 else 1):
            for n in thetas[owners[0]][j]:
                entries = [
                    natural(n, thetas[o][j][n].detach(), lr_parametrization).item() for o in owners
                ]
                values[f"level{j}/{n}"] = entries if per_tensor else entries[0]
        if height > 0:  # the top hyperoptimizer's step size, fixed
            values[f"level{height}/lr"] = float(hyper_lrs[height - 1])
        history.append(values)
    return _layout(params, init), history


def _base(kind: str, initial_keys: tuple[str, ...]) -> Any:
    def run(
        init: Layout,
        gradient: Gradient,
        steps: int,
        groups: Sequence[dict[str, Any]],
        **model_wide: Any,
    ) -> tuple[Layout, list[dict[str, float]]]:
        initial = {k: model_wide.pop(k) for k in initial_keys if k in model_wide}
        return tower(kind, init, gradient, steps, groups, initial=initial, **model_wide)

    run.__name__ = run.__qualname__ = f"hyper_{kind}"
    run.__doc__ = (
        f"Hypergradient {kind}: :func:`tower` with ``kind={kind!r}``; the model-wide initial "
        f"values {', '.join(initial_keys)} are the optimizer's constructor arguments (``lr``, "
        "and the learnable ones), every other keyword is :func:`tower`'s."
    )
    return run


hyper_sgd = _base("sgd", ("lr", "momentum"))
hyper_adam = _base("adam", ("lr", "betas"))
hyper_adagrad = _base("adagrad", ("lr",))
hyper_rmsprop = _base("rmsprop", ("lr", "decay"))
