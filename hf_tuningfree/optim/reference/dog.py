"""DoG, L-DoG and T-DoG, per element in plain Python floats.

Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule",
ICML 2023 (arXiv:2302.12022): DoG (Algorithm 1: ``eta_t = rbar_t / sqrt(sum_i ||g_i||^2)``),
L-DoG (the paper's layer-wise version: the same per tensor) and T-DoG (the "tamed" step of the
paper's high-probability analysis, divided by ``8^4 theta log_+^2``).

Per group (every function): ``lr`` (a multiplier of the step), ``reps_rel``, ``weight_decay``
(coupled: the step uses ``g + wd x``, which is also the gradient entering ``G``), ``eps``, and
optionally ``slice_p`` (default 1).

This project's memory options (every function; the ideas of prodigy PRs #23 and #22):

* ``implicit_zero_x0`` (keyword, default True): a tensor that is all zero at its first gradient
  keeps no ``x_0``; its distance is ``||x||``, the same number, and it is never subsampled.
* ``slice_p = k`` (per group): a tensor of ``n`` elements keeps ``x_0`` for the elements ``0, k,
  2k, ...`` of its flattened form (``m = ceil(n / k)`` of them), and its squared distance is the
  estimate ``(n / m) sum_kept (x - x_0)^2`` (DoG and T-DoG: summed over tensors first). Norms of
  ``x`` and ``g`` (``r_eps``, ``G``) stay exact. L-DoG's ``zero_init_scale`` takes the sum of
  squares of an older tensor's ``x_0`` from its kept elements, scaled alike (that of a tensor
  whose ``x_0`` is taken at this step, exactly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .problems import Gradient, Layout, copy_layout


def _sq(v: list[float]) -> float:
    return sum(e * e for e in v)


def _dog(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    mode: str,
    delta: float = 0.1,
    zero_init_scale: bool = False,
    implicit_zero_x0: bool = True,
) -> tuple[Layout, list]:
    x = copy_layout(init)
    x0: dict[tuple[int, int], list[float]] = {}
    implicit: set[tuple[int, int]] = set()  # all zero at their first gradient: no x0 kept

    def dist_sq(key: tuple[int, int], values: list[float]) -> float:
        """``||values - x_0||^2`` of tensor ``key``, estimated from the kept elements."""
        k = 1 if key in implicit else groups[key[0]].get("slice_p", 1)
        n, start = len(values), x0[key]
        kept = sum((values[j] - start[j]) ** 2 for j in range(0, n, k))
        return n / -(-n // k) * kept if n else 0.0

    rbar = G = None
    lbar = l0 = 0.0
    per: dict[tuple[int, int], dict[str, float]] = {}  # L-DoG: (g, i) -> {"rbar", "G"}
    etas: list = []
    for t_applied in range(steps):
        step_grads = gradient(t_applied, x)
        live = [
            (gi, pi) for gi, gs in enumerate(step_grads) for pi, g in enumerate(gs) if g is not None
        ]
        if rbar is None and mode != "ldog":
            norm0 = math.sqrt(sum(_sq(x[gi][pi]) for gi, pi in live))
            rbar = groups[0]["reps_rel"] * (1.0 + norm0)
            G = 0.0
        new = [key for key in live if key not in x0]
        for key in new:
            x0[key] = list(x[key[0]][key[1]])
            if implicit_zero_x0 and all(v == 0 for v in x0[key]):
                implicit.add(key)
        for key in new:
            if mode == "ldog":
                gi, pi = key
                norm = math.sqrt(_sq(x[gi][pi]))
                if zero_init_scale and norm == 0:
                    total = sum(
                        _sq(x0[q]) if q in new else dist_sq(q, [0.0] * len(x0[q])) for q in live
                    )
                    norm = math.sqrt(len(x0[key]) * total / sum(len(x0[q]) for q in live))
                per[key] = {"rbar": groups[gi]["reps_rel"] * (1.0 + norm), "G": 0.0}
        geff = {}
        for gi, pi in live:
            wd = groups[gi]["weight_decay"]
            geff[(gi, pi)] = [
                g + wd * xe for g, xe in zip(step_grads[gi][pi], x[gi][pi], strict=True)
            ]
        if mode == "ldog":
            step_etas = {}
            for key in live:
                gi, pi = key
                d = math.sqrt(dist_sq(key, x[gi][pi]))
                st = per[key]
                st["rbar"] = max(st["rbar"], d)
                st["G"] += _sq(geff[key])
                step_etas[key] = st["rbar"] / math.sqrt(st["G"] + groups[gi]["eps"])
            etas.append(step_etas)
        else:
            assert rbar is not None and G is not None
            d = math.sqrt(sum(dist_sq(key, x[key[0]][key[1]]) for key in x0))
            rbar = max(rbar, d)
            g2 = sum(_sq(v) for v in geff.values())
            G += g2
            eps = groups[0]["eps"]
            if mode == "dog":
                eta = rbar / math.sqrt(G + eps)
            else:
                gnorm = math.sqrt(g2)
                lbar = max(lbar, gnorm)
                if l0 == 0.0:
                    l0 = gnorm
                t = t_applied
                theta = math.log(60.0 * math.log(6.0 * (t + 1)) / delta)
                log_plus = 1.0 + math.log(1.0 + t * lbar**2 / l0**2)
                factor = 8.0**4 * theta * log_plus**2
                eta = rbar / (factor * math.sqrt(G + 16.0 * lbar**2 + eps))
            step_etas = {key: eta for key in live}
            etas.append(eta)
        for key in live:
            gi, pi = key
            lr = groups[gi]["lr"]
            x[gi][pi] = [
                xe - lr * step_etas[key] * ge for xe, ge in zip(x[gi][pi], geff[key], strict=True)
            ]
    return x, etas


def dog(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    *,
    implicit_zero_x0: bool = True,
) -> tuple[Layout, list[float]]:
    """DoG, one step size for the whole model::

        rbar_t = max(rbar_{t-1}, ||x_t - x_0||)       (rbar_{-1} = reps_rel (1 + ||x_0||))
        G_t    = G_{t-1} + ||g_t||^2,   eta_t = rbar_t / sqrt(G_t + eps)
        x_{t+1} = x_t - lr eta_t g_t

    Norms over every tensor of every group; ``||x_t - x_0||`` over every tensor that has an
    ``x_0`` (taken at its first gradient), ``||x_0||`` over the tensors with a gradient at the
    first step (with ``slice_p``, the sum of the tensors' estimates). ``reps_rel`` and ``eps``
    are the first group's. Trace: ``eta_t``.
    """
    return _dog(init, gradient, steps, groups, "dog", implicit_zero_x0=implicit_zero_x0)


def ldog(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    *,
    zero_init_scale: bool = False,
    implicit_zero_x0: bool = True,
) -> tuple[Layout, list[dict[tuple[int, int], float]]]:
    """L-DoG: DoG per tensor (``rbar``, ``G``, ``eta`` of each tensor from its own norms and its
    group's ``reps_rel``, ``eps``), each tensor starting at its first gradient.
    ``zero_init_scale``: a tensor whose ``x_0`` is all zero takes ``sqrt(n) RMS`` of the ``x_0``
    of every tensor with a gradient at that step in place of ``||x_0||`` (this project's option
    for LoRA's zero-initialised B; with ``slice_p``, see the module). Trace: ``{(group, tensor):
    eta}`` of the tensors stepped."""
    return _dog(
        init,
        gradient,
        steps,
        groups,
        "ldog",
        zero_init_scale=zero_init_scale,
        implicit_zero_x0=implicit_zero_x0,
    )


def tdog(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    *,
    delta: float = 0.1,
    implicit_zero_x0: bool = True,
) -> tuple[Layout, list[float]]:
    """T-DoG: DoG's ``rbar`` divided by the taming factor::

        eta_t = rbar_t / (8^4 theta log_+^2(1 + t lbar_t^2 / l_0^2) sqrt(G_t + 16 lbar_t^2 + eps))
        theta = log(60 log(6 (t + 1)) / delta),  log_+(z) = 1 + log z,
        lbar_t = max_i ||g_i||,  l_0 = ||g_0||

    Trace: ``eta_t``."""
    return _dog(
        init, gradient, steps, groups, "tdog", delta=delta, implicit_zero_x0=implicit_zero_x0
    )
