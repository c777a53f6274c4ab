"""ADOPT, per element in plain Python floats.

Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa & Matsuo, "ADOPT:
Modified Adam Can Converge with Any beta_2 with the Optimal Rate", NeurIPS 2024
(arXiv:2411.02853), Algorithm 1, with the clipped normalisation of the authors' code
(``clip(g / max(sqrt(v), eps), step^clip_exponent)``, their eq. (11) variant) and the option of
decoupled weight decay (Loshchilov & Hutter, ICLR 2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .problems import Gradient, Layout, copy_layout


def adopt(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    *,
    beta1_switch: tuple[int, float] | None = None,
) -> tuple[Layout, list[None]]:
    """ADOPT. Per group: ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``decoupled_weight_decay``, ``clip_exponent`` (None: unclipped), ``maximize``.

    Per element, counting the element's own steps ``k`` (a tensor without a gradient is left
    alone and its count unchanged)::

        k = 0:  v = g^2                                  (Algorithm 1: v_0 = g_0^2, no step)
        k >= 1: u = g / max(sqrt(v), eps), clipped to [-k^c, k^c]
                m = b1 m + (1 - b1) u                    (normalised before the momentum)
                x = x - lr m
                v = b2 v + (1 - b2) g^2                  (after the step: v excludes this g)

    ``g`` is negated with ``maximize``; coupled weight decay adds ``wd x`` to ``g`` (every step),
    decoupled multiplies ``x`` by ``1 - lr wd`` before the step (steps k >= 1). No adapted scalar:
    the trace is None per step.

    ``beta1_switch = (t, b1)``: from step ``t`` on every group's ``b1`` is ``b1``. A group whose
    ``b1`` was 0 has kept no ``m`` (this project's memory option: ``m = u`` then, never read), so
    its ``m`` starts again at 0 at the switch."""
    params = copy_layout(init)
    state = [[[{"step": 0, "m": 0.0, "v": 0.0} for _ in p] for p in grp] for grp in init]
    beta1 = [hp["betas"][0] for hp in groups]
    for t in range(steps):
        if beta1_switch is not None and t == beta1_switch[0]:
            for gi, b1 in enumerate(beta1):
                if b1 == 0:
                    for st in (st for p in state[gi] for st in p):
                        st["m"] = 0.0
            beta1 = [beta1_switch[1]] * len(groups)
        step_grads = gradient(t, params)
        for gi, hp in enumerate(groups):
            b1, b2 = beta1[gi], hp["betas"][1]
            for pi, g_list in enumerate(step_grads[gi]):
                if g_list is None:
                    continue
                for e, g in enumerate(g_list):
                    st = state[gi][pi][e]
                    x = params[gi][pi][e]
                    if hp["maximize"]:
                        g = -g
                    if hp["weight_decay"] and not hp["decoupled_weight_decay"]:
                        g = g + hp["weight_decay"] * x
                    if st["step"] == 0:
                        st["v"] = g * g
                        st["step"] = 1
                        continue
                    if hp["weight_decay"] and hp["decoupled_weight_decay"]:
                        x = x - hp["lr"] * hp["weight_decay"] * x
                    u = g / max(math.sqrt(st["v"]), hp["eps"])
                    if hp["clip_exponent"] is not None:
                        c = st["step"] ** hp["clip_exponent"]
                        u = min(max(u, -c), c)
                    st["m"] = b1 * st["m"] + (1 - b1) * u
                    x = x - hp["lr"] * st["m"]
                    st["v"] = b2 * st["v"] + (1 - b2) * g * g
                    st["step"] += 1
                    params[gi][pi][e] = x
    return params, [None] * steps
