"""The scenario the C-path tests of ADOPT, the D-Adaptation family and the hypergradient
optimizers share: two param groups whose tensors are large enough to run threaded and small
enough to be odd (1 element, 3-d), gradients that go missing on some steps and a tensor whose
first gradient arrives late (step 5)."""

from __future__ import annotations

import torch

#: Two param groups; the first tensor of each spans several C blocks (threaded loops).
SHAPES = [[(40000,), (3, 4), (5,)], [(50, 700), (1,), (2, 2, 2)]]


def missing(step: int, group: int, index: int) -> bool:
    """Whether tensor ``index`` of ``group`` has no gradient at ``step``: tensor 1 of each group
    on every third step, tensor 2 of group 1 until step 5."""
    return (index == 1 and step % 3 == 1) or (group == 1 and index == 2 and step < 5)


def initial_weights(dtype: torch.dtype, seed: int = 4) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
        for shapes in SHAPES
    ]


def scaled_gradients(dtype: torch.dtype, steps: int, seed: int = 3) -> list:
    """Per step, group and tensor: a standard normal gradient (10x larger every seventh step)
    or None (see :func:`missing`)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        step = []
        for gi, shapes in enumerate(SHAPES):
            gs = []
            for pi, shape in enumerate(shapes):
                scale = 10.0 if t % 7 == 0 else 1.0
                g = torch.randn(shape, generator=gen, dtype=torch.float64).mul_(scale).to(dtype)
                gs.append(None if missing(t, gi, pi) else g)
            step.append(gs)
        out.append(step)
    return out


def feed(params: list[list[torch.Tensor]], step_grads: list) -> None:
    """Set every parameter's ``.grad`` to a copy of its gradient of this step (or None)."""
    for ps, gs in zip(params, step_grads, strict=True):
        for p, g in zip(ps, gs, strict=True):
            p.grad = None if g is None else g.clone()
