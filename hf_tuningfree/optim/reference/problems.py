"""Test problems for the references: a separable noisy quadratic and fixed noise streams.

Both produce the references' layout (``[group][tensor] -> list[float]``) and a ``gradient(t, x)``
oracle in the calling convention of :mod:`hf_tuningfree.optim.reference`. The random numbers come
from a seeded ``torch.Generator`` (fp64), so a problem is the same on every machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]
Layout = list[list[list[float]]]
Grads = list[list["list[float] | None"]]
#: ``missing(t, group, tensor) -> True`` when that tensor has no gradient at step ``t``.
Missing = Callable[[int, int, int], bool]
#: ``gradient(t, x) -> [group][tensor] -> list[float] | None``
Gradient = Callable[[int, Layout], Grads]


def copy_layout(values: Layout) -> Layout:
    """A copy of ``[group][tensor] -> list[float]`` (the references never write their input)."""
    return [[list(p) for p in grp] for grp in values]


def every_third_step(t: int, group: int, tensor: int) -> bool:
    """Tensor 1 of every group has no gradient on steps 1, 4, 7, ..."""
    return tensor == 1 and t % 3 == 1


def _draw(gen: torch.Generator, shape: Shape, scale: float = 1.0) -> list[float]:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).flatten().tolist()


@dataclass
class NoisyQuadratic:
    """``f_t(x) = sum_e c_e (x_e - target_e)^2 + <noise_t, x>``: per element the gradient
    ``2 c_e (x_e - target_e) + noise_{t,e}``, taken at the caller's own iterate, so ``d`` of the
    D-Adaptation family grows as the iterates approach ``target`` (Defazio & Mishchenko's
    estimates need a real distance to the solution to grow)."""

    shapes: list[list[Shape]]
    init: Layout
    curv: Layout
    target: Layout
    #: ``noise[t][group][tensor]``: a list of floats, or None (no gradient at step t)
    noise: list[Grads]

    @property
    def steps(self) -> int:
        return len(self.noise)

    def gradient(self, t: int, x: Layout) -> Grads:
        """The gradient oracle at step ``t`` and iterate ``x``."""
        out: Grads = []
        for gi, grp in enumerate(x):
            row: list[list[float] | None] = []
            for pi, xp in enumerate(grp):
                n = self.noise[t][gi][pi]
                if n is None:
                    row.append(None)
                    continue
                c, tg = self.curv[gi][pi], self.target[gi][pi]
                row.append([2.0 * c[e] * (xp[e] - tg[e]) + n[e] for e in range(len(xp))])
            out.append(row)
        return out


def noisy_quadratic(
    shapes: Sequence[Sequence[Shape]],
    steps: int,
    seed: int = 0,
    missing: Missing = every_third_step,
    noise_scale: float = 0.3,
    target_scale: float = 3.0,
) -> NoisyQuadratic:
    """Initial weights ~ N(0, 1), curvatures ``|N(0, 1)| + 0.5``, targets ~ N(0, target_scale^2),
    per-step noise ~ N(0, noise_scale^2); drawn in that order from one generator."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [[tuple(s) for s in grp] for grp in shapes]
    init = [[_draw(gen, s) for s in grp] for grp in shapes]
    curv = [[[abs(v) + 0.5 for v in _draw(gen, s)] for s in grp] for grp in shapes]
    target = [[_draw(gen, s, target_scale) for s in grp] for grp in shapes]
    noise = [
        [
            [None if missing(t, gi, pi) else _draw(gen, s, noise_scale) for pi, s in enumerate(grp)]
            for gi, grp in enumerate(shapes)
        ]
        for t in range(steps)
    ]
    return NoisyQuadratic(shapes, init, curv, target, noise)


@dataclass
class GradientStream:
    """A fixed gradient stream: ``gradient(t, x)`` ignores ``x`` and returns ``grads[t]``."""

    shapes: list[list[Shape]]
    init: Layout
    grads: list[Grads]

    @property
    def steps(self) -> int:
        return len(self.grads)

    def gradient(self, t: int, x: Layout) -> Grads:
        return self.grads[t]


def gradient_stream(
    shapes: Sequence[Sequence[Shape]],
    steps: int,
    seed: int = 0,
    missing: Missing = every_third_step,
    scale: Callable[[int], float] = lambda t: 10.0 if t % 7 == 0 else 1.0,
) -> GradientStream:
    """Initial weights ~ N(0, 1), then per step and tensor a gradient ~ N(0, scale(t)^2) or None
    (``missing``); the default scale makes every seventh step ten times larger (it reaches
    ADOPT's clip and DoG's growing distance)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [[tuple(s) for s in grp] for grp in shapes]
    init = [[_draw(gen, s) for s in grp] for grp in shapes]
    grads = [
        [
            [None if missing(t, gi, pi) else _draw(gen, s, scale(t)) for pi, s in enumerate(grp)]
            for gi, grp in enumerate(shapes)
        ]
        for t in range(steps)
    ]
    return GradientStream(shapes, init, grads)
