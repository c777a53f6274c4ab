"""D-Adaptation (SGD, Adam, AdaGrad) and Prodigy, per element in plain Python floats.

Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023
(arXiv:2301.07733): the dual-averaging algorithm with coordinate-wise AdaGrad weights
(``adagrad``) and the paper's "SGD with D-Adaptation" and "Adam with D-Adaptation" algorithms
(``sgd``, ``adam``), in the form of the authors' ``dadaptation`` package. Mishchenko & Defazio,
"Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024 (arXiv:2306.06101), the
paper's Adam-like algorithm (``prodigy``), with the authors' ``d_coef`` and ``safeguard_warmup``
(``prodigyopt``).

Common to all four (the estimates are model-wide: every sum runs over every group):

* ``d`` starts at ``d0``, never decreases, and grows at most by ``growth_rate`` per step:
  ``d = max(d, min(d_hat, growth_rate d))`` (Prodigy: ``min(d_max, growth_rate d)``).
* ``||s||`` runs over every tensor that has had a gradient (a tensor never seen has ``s = 0``);
  a tensor without a gradient this step keeps its iterate and its state.
* The fast start (this project's, ``d0_rel > 0``): after the first step ``d`` (Prodigy: also
  ``d_max``) is raised to ``d0_rel`` times the weights' scale: the RMS of the initial weights
  of the tensors with a gradient at step 0 in the groups with ``lr > 0`` (all groups when every
  ``lr`` is 0); SGD, whose ``d`` is an L2 distance, uses their L2 norm instead.
* ``slice_p = k`` (this project's memory option after prodigy PR #22; SGD, Adam, Prodigy; 1:
  every element): what serves only the estimate of ``d`` (``s`` and the sums ``N`` of SGD,
  ``r`` of Adam and Prodigy, Prodigy's ``x0``) runs over the elements ``0, k, 2k, ...`` of each
  flattened tensor, ``s`` holding ``ceil(n / k)`` of them; ``x`` (``z``, ``m``, ``v``) and SGD's
  gradient bound run over every element. SGD scales both its sums by ``k`` (estimates of the
  full sums: ``2 N / ||s||_2`` mixes degrees); the Adam forms' ``r / ||s||_1`` is unchanged by a
  common scale and takes the plain sums.

Model-wide arguments take the optimizers' names (``d0``, ``d0_rel``, ``growth_rate``,
``gradient_bound``, ``betas``, ``use_bias_correction``, ``safeguard_warmup``, ``d_coef``,
``slice_p``); per-group ones come in ``groups``. Each function returns ``(params, ds)``, ``ds``
the ``d`` after every step; ``sgd_with_s``, ``adam_with_s`` and ``prodigy_with_s`` return
``(params, ds, s)``, ``s`` after the last step in ``init``'s layout (the kept elements of each
tensor with ``slice_p``): the state ``s`` of the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from .problems import Gradient, Grads, Layout, copy_layout


def _zeros(init: Layout, slice_p: int = 1) -> Layout:
    """Zeros in ``init``'s layout; with ``slice_p = k``, ``ceil(n / k)`` per tensor."""
    return [[[0.0] * -(-len(p) // slice_p) for p in grp] for grp in init]


def _unseen(init: Layout) -> list[list[bool]]:
    return [[False] * len(grp) for grp in init]


def _gradient_elements(grads: Grads, seen: list[list[bool]], gi: int) -> Iterator[tuple]:
    """(pi, e, g) for every element of the tensors of group gi that have a gradient this step;
    marks those tensors as seen (from then on their s counts in ||s||)."""
    for pi, g_list in enumerate(grads[gi]):
        if g_list is None:
            continue
        seen[gi][pi] = True
        for e, g in enumerate(g_list):
            yield pi, e, g


def _sum_over_seen(s: Layout, seen: list[list[bool]], f: Any) -> float:
    return sum(
        f(u) for gi, grp in enumerate(s) for pi, p in enumerate(grp) if seen[gi][pi] for u in p
    )


def fast_start(
    init: Layout, first_grads: Grads, groups: Sequence[dict[str, Any]], rel: float, kind: str
) -> float:
    """``rel`` times the initial weights' RMS (``kind="rms"``) or L2 norm (``"norm"``), over the
    tensors with a gradient at the first step in the groups with ``lr > 0`` (every group when
    all ``lr`` are 0)."""
    live = [gi for gi, hp in enumerate(groups) if hp["lr"] > 0] or list(range(len(groups)))
    values = [
        v
        for gi in live
        for pi, p in enumerate(init[gi])
        if first_grads[gi][pi] is not None
        for v in p
    ]
    sq = sum(v * v for v in values)
    if kind == "norm":
        return rel * math.sqrt(sq)
    return rel * math.sqrt(sq / len(values)) if values else 0.0


def _adam_bias_correction(k: int, betas: tuple[float, float], on: bool) -> float:
    b1, b2 = betas
    return math.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)) if on else 1.0


def sgd_with_s(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    *,
    d0: float,
    growth_rate: float = math.inf,
    gradient_bound: str = "max",
    d0_rel: float = 0.0,
    slice_p: int = 1,
) -> tuple[Layout, list[float], Layout]:
    """D-Adapted SGD (Defazio & Mishchenko 2023, "SGD with D-Adaptation"; the bound ``G_k`` as
    in the authors' code). Per group: ``lr``, ``momentum``, ``weight_decay``,
    ``decoupled_weight_decay``. Per step k::

        G_k^2   = max(G_{k-1}^2, ||g_k||^2)     (gradient_bound="max"; "first": ||g_0||^2 only;
                                                 over groups with lr > 0, raw gradients)
        lambda  = d_k lr / G_k
        N      += lambda <g, s>                 s += lambda g
        z       = z - lambda g (- lambda wd z, decoupled)
        x       = beta x + (1 - beta) z         (momentum beta; beta = 0: x = z)
        d_hat   = 2 N / ||s||_2

    With ``slice_p``: ``N += slice_p lambda <g, s>`` and ``s += lambda g`` on the kept
    elements, ``||s||_2^2 = slice_p`` times the sum of the kept ``s^2``.
    """
    k = slice_p
    x = copy_layout(init)
    z = copy_layout(init)
    s = _zeros(init, k)
    seen = _unseen(init)
    d, numerator, bound_sq, ds = d0, 0.0, 0.0, []
    for t in range(steps):
        grads = gradient(t, x)
        g_sq = sum(
            v * v
            for gi, hp in enumerate(groups)
            if hp["lr"] > 0
            for g in grads[gi]
            if g is not None
            for v in g
        )
        if gradient_bound == "max" or bound_sq == 0.0:
            bound_sq = max(bound_sq, g_sq)
        for gi, hp in enumerate(groups):
            lam = d * hp["lr"] / math.sqrt(bound_sq)
            wd, mom = hp["weight_decay"], hp["momentum"]
            for pi, e, g in _gradient_elements(grads, seen, gi):
                xe = x[gi][pi][e]
                if not hp["decoupled_weight_decay"]:
                    g = g + wd * xe
                if e % k == 0:
                    numerator += k * lam * g * s[gi][pi][e // k]
                    s[gi][pi][e // k] += lam * g
                dwd = wd if hp["decoupled_weight_decay"] else 0.0
                if mom == 0.0:
                    x[gi][pi][e] = xe - lam * dwd * xe - lam * g
                else:
                    ze = z[gi][pi][e]
                    z[gi][pi][e] = ze - lam * dwd * ze - lam * g
                    x[gi][pi][e] = mom * xe + (1 - mom) * z[gi][pi][e]
        s_sq = k * _sum_over_seen(s, seen, lambda u: u * u)
        if s_sq > 0:
            d_hat = 2 * numerator / math.sqrt(s_sq)
            d = max(d, min(d_hat, growth_rate * d))
        if t == 0:
            d = max(d, fast_start(init, grads, groups, d0_rel, "norm"))
        ds.append(d)
    return x, ds, s


def sgd(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    **model_wide: Any,
) -> tuple[Layout, list[float]]:
    """:func:`sgd_with_s` in the common convention: ``(params, ds)``."""
    x, ds, _ = sgd_with_s(init, gradient, steps, groups, **model_wide)
    return x, ds


def adam_with_s(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    *,
    d0: float,
    growth_rate: float = math.inf,
    betas: tuple[float, float] = (0.9, 0.999),
    use_bias_correction: bool = False,
    d0_rel: float = 0.0,
    slice_p: int = 1,
) -> tuple[Layout, list[float], Layout]:
    """D-Adapted Adam in its published form (Defazio & Mishchenko 2023, "Adam with
    D-Adaptation"). Per group:
    ``lr``, ``eps``, ``weight_decay``, ``decoupled_weight_decay``. With ``b3 = sqrt(b2)`` and
    ``bc = sqrt(1 - b2^(k+1)) / (1 - b1^(k+1))`` (1 without bias correction)::

        dlr   = d lr bc
        r     = b3 r + (1 - b3) dlr <g, s / (sqrt(v) + eps)>     (v, s before this step)
        m     = b1 m + (1 - b1) dlr g,   v = b2 v + (1 - b2) g^2
        s     = b3 s + (1 - b3) dlr g
        x     = x (- dlr wd x, decoupled) - m / (sqrt(v) + eps)
        d_hat = r / ((1 - b3) ||s||_1)

    With ``slice_p``: r's term and ``s`` on the kept elements, ``||s||_1`` over them.
    """
    b1, b2 = betas
    b3 = math.sqrt(b2)
    k = slice_p
    x = copy_layout(init)
    m, v, s = _zeros(init), _zeros(init), _zeros(init, k)
    seen = _unseen(init)
    d, r, ds = d0, 0.0, []
    for t in range(steps):
        grads = gradient(t, x)
        bc = _adam_bias_correction(t, betas, use_bias_correction)
        acc = 0.0
        for gi, hp in enumerate(groups):
            dlr = d * hp["lr"] * bc
            wd, eps = hp["weight_decay"], hp["eps"]
            for pi, e, g in _gradient_elements(grads, seen, gi):
                xe = x[gi][pi][e]
                if not hp["decoupled_weight_decay"]:
                    g = g + wd * xe
                if e % k == 0:
                    j = e // k
                    acc += dlr * g * s[gi][pi][j] / (math.sqrt(v[gi][pi][e]) + eps)
                    s[gi][pi][j] = b3 * s[gi][pi][j] + (1 - b3) * dlr * g
                m[gi][pi][e] = b1 * m[gi][pi][e] + (1 - b1) * dlr * g
                v[gi][pi][e] = b2 * v[gi][pi][e] + (1 - b2) * g * g
                if hp["decoupled_weight_decay"]:
                    xe = xe - dlr * wd * xe
                x[gi][pi][e] = xe - m[gi][pi][e] / (math.sqrt(v[gi][pi][e]) + eps)
        r = b3 * r + (1 - b3) * acc
        l1 = _sum_over_seen(s, seen, abs)
        if l1 > 0:
            d = max(d, min(r / ((1 - b3) * l1), growth_rate * d))
        if t == 0:
            d = max(d, fast_start(init, grads, groups, d0_rel, "rms"))
        ds.append(d)
    return x, ds, s


def adam(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    **model_wide: Any,
) -> tuple[Layout, list[float]]:
    """:func:`adam_with_s` in the common convention: ``(params, ds)``."""
    x, ds, _ = adam_with_s(init, gradient, steps, groups, **model_wide)
    return x, ds


def adagrad(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    *,
    d0: float,
    growth_rate: float = math.inf,
    d0_rel: float = 0.0,
) -> tuple[Layout, list[float]]:
    """D-Adapted AdaGrad, dual averaging (Defazio & Mishchenko 2023, the coordinate-wise
    AdaGrad-style D-Adaptation). Per group: ``lr``, ``eps``,
    ``momentum``, ``weight_decay`` (coupled: x is recomputed from x0 every step),
    ``initial_accumulator_value``::

        g     = g + wd x,   alpha += g^2,   w = sqrt(alpha) + eps
        s    += d lr g,     z = x0 - s / w,  x = z (momentum beta: beta x + (1 - beta) z)
        d_hat = (sum s^2 / w - sum_k (d_k lr)^2 g_k^2 / w_k) / ||s||_1
    """
    x0 = copy_layout(init)
    x = copy_layout(init)
    s = _zeros(init)
    alpha = [
        [[hp["initial_accumulator_value"]] * len(p) for p in grp]
        for grp, hp in zip(init, groups, strict=True)
    ]
    seen = _unseen(init)
    d, gsq_weighted, ds = d0, 0.0, []
    for k in range(steps):
        grads = gradient(k, x)
        for gi, hp in enumerate(groups):
            dlr = d * hp["lr"]
            wd, eps, mom = hp["weight_decay"], hp["eps"], hp["momentum"]
            for pi, e, g in _gradient_elements(grads, seen, gi):
                xe = x[gi][pi][e]
                g = g + wd * xe
                alpha[gi][pi][e] += g * g
                w = math.sqrt(alpha[gi][pi][e]) + eps
                gsq_weighted += dlr * dlr * g * g / w
                s[gi][pi][e] += dlr * g
                z = x0[gi][pi][e] - s[gi][pi][e] / w
                x[gi][pi][e] = z if mom == 0 else mom * xe + (1 - mom) * z
        sksq = 0.0
        l1 = 0.0
        for gi, hp in enumerate(groups):
            for pi, p in enumerate(s[gi]):
                if seen[gi][pi]:
                    for e, u in enumerate(p):
                        sksq += u * u / (math.sqrt(alpha[gi][pi][e]) + hp["eps"])
                        l1 += abs(u)
        if l1 > 0:
            d = max(d, min((sksq - gsq_weighted) / l1, growth_rate * d))
        if k == 0:
            d = max(d, fast_start(init, grads, groups, d0_rel, "rms"))
        ds.append(d)
    return x, ds


def prodigy_with_s(
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
    d_coef: float = 1.0,
    d0_rel: float = 0.0,
    slice_p: int = 1,
) -> tuple[Layout, list[float], Layout]:
    """Prodigy, Adam form (Mishchenko & Defazio 2024, the Adam-like algorithm). Per group:
    ``lr``, ``eps``, ``weight_decay``, ``decoupled_weight_decay``. With ``b3 = sqrt(b2)``,
    ``bc`` as in :func:`adam` and ``dlr = d lr bc``::

        r     = b3 r + (d / d0) dlr <g, x0 - x>
        m     = b1 m + (1 - b1) d g,   v = b2 v + (1 - b2) d^2 g^2
        s     = b3 s + (d / d0) dlr g            (safeguard_warmup: (d / d0) d g, lr > 0 groups)
        x     = x (- dlr wd x, decoupled) - dlr m / (sqrt(v) + d eps)
        d_max = max(d_max, d_coef r / ||s||_1),   d = max(d, min(d_max, growth_rate d))

    With ``slice_p``: r's term and ``s`` on the kept elements (``x0`` is read there only),
    ``||s||_1`` over them.
    """
    b1, b2 = betas
    b3 = math.sqrt(b2)
    k = slice_p
    x0 = copy_layout(init)
    x = copy_layout(init)
    m, v, s = _zeros(init), _zeros(init), _zeros(init, k)
    seen = _unseen(init)
    d, d_max, r, ds = d0, d0, 0.0, []
    for t in range(steps):
        grads = gradient(t, x)
        bc = _adam_bias_correction(t, betas, use_bias_correction)
        acc = 0.0
        for gi, hp in enumerate(groups):
            dlr = d * hp["lr"] * bc
            wd, eps = hp["weight_decay"], hp["eps"]
            s_w = (d / d0) * d * (hp["lr"] > 0) if safeguard_warmup else (d / d0) * dlr
            for pi, e, g in _gradient_elements(grads, seen, gi):
                xe = x[gi][pi][e]
                if not hp["decoupled_weight_decay"]:
                    g = g + wd * xe
                if e % k == 0:
                    j = e // k
                    acc += (d / d0) * dlr * g * (x0[gi][pi][e] - xe)
                    s[gi][pi][j] = b3 * s[gi][pi][j] + s_w * g
                m[gi][pi][e] = b1 * m[gi][pi][e] + (1 - b1) * d * g
                v[gi][pi][e] = b2 * v[gi][pi][e] + (1 - b2) * d * d * g * g
                if hp["decoupled_weight_decay"]:
                    xe = xe - dlr * wd * xe
                x[gi][pi][e] = xe - dlr * m[gi][pi][e] / (math.sqrt(v[gi][pi][e]) + d * eps)
        r = b3 * r + acc
        l1 = _sum_over_seen(s, seen, abs)
        if l1 > 0:
            d_max = max(d_max, d_coef * r / l1)
            d = max(d, min(d_max, growth_rate * d))
        if t == 0:
            start = fast_start(init, grads, groups, d0_rel, "rms")
            d, d_max = max(d, start), max(d_max, start)
        ds.append(d)
    return x, ds, s


def prodigy(
    init: Layout,
    gradient: Gradient,
    steps: int,
    groups: Sequence[dict[str, Any]],
    **model_wide: Any,
) -> tuple[Layout, list[float]]:
    """:func:`prodigy_with_s` in the common convention: ``(params, ds)``."""
    x, ds, _ = prodigy_with_s(init, gradient, steps, groups, **model_wide)
    return x, ds
