"""Schedule-free Prodigy, per element in plain Python floats, keeping the three sequences.

Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled", NeurIPS 2024
(arXiv:2405.15682), Algorithm 1 (schedule-free AdamW: ``y`` where the gradient is taken, ``z``
the base iterate, ``x`` the weighted average, weights ``lr_max^2`` as in the authors' warm-up
weighting), with Prodigy's estimate of ``d`` (Mishchenko & Defazio, ICML 2024) computed at ``y``
as the authors' ``prodigy-plus-schedule-free`` and ``schedulefree``'s Prodigy variants do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .dadapt import _sum_over_seen, _unseen, _zeros, fast_start
from .problems import Gradient, Layout, copy_layout


def prodigy_sf_sequences(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    *,
    d0: float,
    growth_rate: float = math.inf,
    betas: tuple[float, float] = (0.9, 0.999),
    use_bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d_coef: float = 0.5,
    d0_rel: float = 0.0,
    warmup_steps: int = 0,
    r: float = 2.0,
    slice_p: int = 1,
) -> tuple[Layout, Layout, list[float]]:
    """Returns ``(x, y, ds)``: the average, the point where gradients are taken, ``d`` per step.
    Defaults as the optimizer's (``r = 2``, ``d_coef = 0.5``; the authors' are 0 and 1).

    Per group: ``lr``, ``eps``, ``weight_decay``, ``decoupled_weight_decay``. Per element, with
    ``bc = sqrt(1 - b2^(k+1))`` (1 without bias correction) times the linear warm-up
    ``min(1, (k+1) / warmup_steps)`` (when ``warmup_steps > 0``), ``b3 = sqrt(b2)``::

        gamma = d lr bc;  g at y (+ wd y, coupled)
        v = b2 v + (1 - b2) g^2;   u = g / (sqrt(v) + eps) (+ wd y, decoupled)
        num = b3 num + (d / d0) gamma <g, x0 - z>;  s = b3 s + (d / d0) gamma g
                                                  (safeguard_warmup: (d / d0) d g, lr > 0 groups)
        z -= gamma u
        c = w_k / sum_{i <= k} w_i,  w_k = (k+1)^r lr_max^2  (lr_max: the largest d lr_1 bc
                               so far, lr_1 the largest group lr);  x = (1 - c) x + c z
        y = (1 - b1) z + b1 x
        d_max = max(d_max, d_coef num / ||s||_1),  d = max(d, min(d_max, growth_rate d))

    A tensor without a gradient keeps ``x``, ``y`` and ``z``. Fast start as in
    :mod:`.dadapt` (RMS of the initial weights). With ``slice_p = k``: the numerator's term and
    ``s`` on the kept elements (every ``k``-th of each tensor, ``x0`` read there only),
    ``||s||_1`` over them, as :func:`.dadapt.prodigy_with_s`."""
    b1, b2 = betas
    b3 = math.sqrt(b2)
    x0, x, y, z = (copy_layout(init) for _ in range(4))
    k_slice = slice_p
    v, s = _zeros(init), _zeros(init, k_slice)
    seen = _unseen(init)
    d, d_max, num, lr_max, weight_sum, ds = d0, d0, 0.0, 0.0, 0.0, []
    lr_ref = max(hp["lr"] for hp in groups)
    for k in range(steps):
        grads = gradient(k, y)
        bc = math.sqrt(1 - b2 ** (k + 1)) if use_bias_correction else 1.0
        if warmup_steps:
            bc *= min(1.0, (k + 1) / warmup_steps)
        lr_max = max(lr_max, d * lr_ref * bc)
        w = (k + 1) ** r * lr_max * lr_max
        weight_sum += w
        c = w / weight_sum
        acc = 0.0
        for gi, hp in enumerate(groups):
            gamma = d * hp["lr"] * bc
            wd, eps = hp["weight_decay"], hp["eps"]
            s_w = (d / d0) * d * (hp["lr"] > 0) if safeguard_warmup else (d / d0) * gamma
            for pi, g_list in enumerate(grads[gi]):
                if g_list is None:
                    continue  # no gradient: the tensor (x, y, z) is left alone
                seen[gi][pi] = True
                for e, g in enumerate(g_list):
                    ye = y[gi][pi][e]
                    if not hp["decoupled_weight_decay"]:
                        g = g + wd * ye
                    if e % k_slice == 0:
                        j = e // k_slice
                        acc += (d / d0) * gamma * g * (x0[gi][pi][e] - z[gi][pi][e])
                        s[gi][pi][j] = b3 * s[gi][pi][j] + s_w * g
                    v[gi][pi][e] = b2 * v[gi][pi][e] + (1 - b2) * g * g
                    u = g / (math.sqrt(v[gi][pi][e]) + eps)
                    if hp["decoupled_weight_decay"]:
                        u += wd * ye
                    z[gi][pi][e] -= gamma * u
                    x[gi][pi][e] = (1 - c) * x[gi][pi][e] + c * z[gi][pi][e]
                    y[gi][pi][e] = (1 - b1) * z[gi][pi][e] + b1 * x[gi][pi][e]
        num = b3 * num + acc
        l1 = _sum_over_seen(s, seen, abs)
        if l1 > 0:
            d_max = max(d_max, d_coef * num / l1)
            d = max(d, min(d_max, growth_rate * d))
        if k == 0:
            start = fast_start(init, grads, groups, d0_rel, "rms")
            d, d_max = max(d, start), max(d_max, start)
        ds.append(d)
    return x, y, ds


def prodigy_sf(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    **model_wide: Any,
) -> tuple[Layout, list[float]]:
    """:func:`prodigy_sf_sequences` in the common convention: the parameters are ``y`` (what
    the optimizer holds in train mode), the trace ``d``."""
    _, y, ds = prodigy_sf_sequences(init, gradient, steps, groups, **model_wide)
    return y, ds
