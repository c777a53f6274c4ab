"""L-DoG: the DoG step computed for each tensor separately."""

from __future__ import annotations

import math

import torch
from torch.optim.optimizer import ParamsT

from ..base import (
    StepBatch,
    TuningFreeOptimizer,
    foreach_norms,
)
from ..validation import (
    check_bool,
)
from .core import DoG
from .kernels import (
    _median,
    _safe_div,
    _stored_x0,
    _x0_source,
)


class LDoG(DoG):
    r"""Layer-wise DoG (L-DoG, Ivgi, Hinder & Carmon, ICML 2023): DoG for each tensor on its own.

    For every parameter tensor :math:`k`:
    :math:`\eta^k_t = \bar r^k_t / \sqrt{G^k_t + \epsilon}` with
    :math:`\bar r^k_t = \max(r^k_\epsilon, \max_{i\le t}\|x^k_i - x^k_0\|)`,
    :math:`r^k_\epsilon = \texttt{reps\_rel}\,(1 + \|x^k_0\|)` and
    :math:`G^k_t = \sum_{i\le t}\|g^k_i\|^2`. Under FSDP a tensor's norms run over all its shards.
    The gradient norms are the base class's ``torch._foreach_norm`` results, the distances those
    stored by the previous update; the per-tensor scalars are computed as vectors over the
    tensors (one stack, a few vector ops, no per-tensor Python arithmetic), and the update is
    DoG's fused pass with one step size per tensor.

    Args: as :class:`DoG`; ``reps_rel`` and ``eps`` may differ between param groups.
    ``zero_init_scale`` (default True): a tensor whose initial weights are all zero (LoRA's B)
    takes :math:`\sqrt{n_k}\,\mathrm{RMS}(x_0)` in place of :math:`\|x^k_0\|`, the RMS over the
    initial weights of every tensor with a gradient at that step; False: the paper's ``1 + 0``.

    Per-parameter state: ``x0`` (absent for all-zero tensors with ``implicit_zero_x0``),
    ``dist_sq``, ``rbar`` and ``G`` (0-dim). ``stats()`` reports
    ``eta_min``, ``eta_median``, ``eta_max`` over tensors (without the ``lr`` multiplier),
    ``rbar_median``, ``rbar_max``, ``G_median`` and ``step``.
    """

    _layerwise = True
    _CONSTRUCTOR_ONLY = (*DoG._CONSTRUCTOR_ONLY, "zero_init_scale")
    _PICKLED_ATTRIBUTES = (*DoG._PICKLED_ATTRIBUTES, "_zero_init_scale")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        reps_rel: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        implementation: str = "auto",
        *,
        maximize: bool = False,
        zero_init_scale: bool = True,
        implicit_zero_x0: bool = True,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        self._zero_init_scale = check_bool("zero_init_scale", zero_init_scale)
        super().__init__(
            params,
            lr=lr,
            reps_rel=reps_rel,
            weight_decay=weight_decay,
            eps=eps,
            implementation=implementation,
            maximize=maximize,
            implicit_zero_x0=implicit_zero_x0,
            slice_p=slice_p,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _local_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        sdt = self._stat_dtype(batch)
        if batch.num_tensors == 0:
            return {}
        d2 = torch.stack(
            [d.to(batch.device, sdt) for gb in batch.groups for d in gb.state_list("dist_sq")]
        )
        out = {"g2": self._grad_sq(batch, sdt), "d2": d2}
        fresh = [f for gb in batch.groups for f in gb.fresh]
        if any(fresh):  # r_eps of the tensors at their first step: ||x_0||^2 per tensor
            params = [p for gb in batch.groups for p in gb.params]
            chosen = [p for p, f in zip(params, fresh, strict=True) if f]
            norms = iter(foreach_norms(chosen))
            zero = torch.zeros((), dtype=sdt, device=batch.device)
            out["x0_sq"] = torch.stack(
                [next(norms).to(batch.device, sdt).square() if f else zero for f in fresh]
            )
            if self._zero_init_scale:  # sum of squares and (local) size of every x_0 in the step
                # a fresh tensor's x_0 is the tensor itself (with implicit zero x_0 it is stored
                # in _update); an implicit x_0 adds 0 to the sum and its size to the count
                # a subsampled x_0 (slice_p) counts its sum of squares times its scale; a
                # fresh tensor's own values are used where its stored x_0 is not a full copy
                x0s, weights = [], []
                for gb in batch.groups:
                    layouts = self._layouts(gb, [_stored_x0(s) for s in gb.states])
                    for s, p, f, lay in zip(gb.states, gb.originals, gb.fresh, layouts,
                                            strict=True):  # fmt: skip
                        x0 = _stored_x0(s)
                        if x0 is not None and (lay[0] == 1 or not f):
                            x0s.append(x0)
                            weights.append(lay[2])
                        elif f:
                            x0s.append(_x0_source(p))
                            weights.append(1.0)
                norms = foreach_norms(x0s)
                total = (
                    torch.stack([n.to(batch.device, sdt) for n in norms]).square()
                    if norms
                    else torch.zeros(1, dtype=sdt, device=batch.device)
                )
                if any(w != 1.0 for w in weights):
                    total = total * torch.tensor(weights, dtype=sdt, device=batch.device)
                padded = sum(getattr(o, "_shard_numel_padded", 0) for gb in batch.groups
                             for o in gb.originals)  # FSDP1 flat shards' zero padding  # fmt: skip
                count = float(sum(p.numel() for gb in batch.groups for p in gb.params) - padded)
                out["x0_all"] = torch.stack(
                    [total.sum(), torch.tensor(count, dtype=sdt, device=batch.device)]
                )
        nonzero = self._zero_check(batch, sdt)
        if nonzero is not None:
            out["x0_nz"] = nonzero
        return out

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        self._take_x0(batch, stats)
        if batch.num_tensors == 0:
            return
        device = batch.device
        g2, d2 = stats["g2"], stats["d2"]
        sdt = g2.dtype
        rbar_states = [s["rbar"] for gb in batch.groups for s in gb.states]
        G_states = [s["G"] for gb in batch.groups for s in gb.states]
        rbar = torch.stack([r.to(device, sdt) for r in rbar_states])
        G = torch.stack([x.to(device, sdt) for x in G_states])
        # per-group constants, written into each group's slice of the vectors
        eps = torch.empty_like(rbar)
        lr = torch.empty_like(rbar)
        r_eps = torch.empty_like(rbar) if "x0_sq" in stats else None
        start = 0
        for gb in batch.groups:
            sl = slice(start, start + len(gb.params))
            eps[sl] = gb.group["eps"]
            lr[sl] = gb.group["lr"]
            if r_eps is not None:
                r_eps[sl] = gb.group["reps_rel"]
            start += len(gb.params)
        base = rbar
        if r_eps is not None:  # tensors at their first step (rbar still 0) start at r_eps;
            # this initialisation happens even on a skipped step, like taking x_0
            norm = stats["x0_sq"].sqrt()
            if "x0_all" in stats:  # all-zero tensors: sqrt(n_k) RMS of the step's x_0
                total, count = stats["x0_all"].unbind(0)
                numel = [float(p.numel()) for gb in batch.groups for p in gb.originals]
                numel_t = torch.tensor(numel, dtype=sdt, device=device)
                norm = torch.where(norm > 0, norm, (numel_t * total / count.clamp_min(1.0)).sqrt())
            r_eps = r_eps * (1.0 + norm)
            base = torch.where(rbar == 0, r_eps, rbar)
        new_rbar = torch.where(ok, torch.maximum(base, d2.sqrt()), base)
        new_G = torch.where(ok, G + g2, G)
        eta = _safe_div(new_rbar, torch.sqrt(new_G + eps))
        sizes = torch.where(ok, lr * eta, torch.zeros_like(eta))
        torch._foreach_copy_(rbar_states, list(new_rbar.unbind(0)))
        torch._foreach_copy_(G_states, list(new_G.unbind(0)))
        step = self.global_tensor(
            "step", device, lambda d: torch.zeros((), dtype=torch.int64, device=d)
        )
        self.global_state["step"] = step + ok.to(torch.int64)
        sizes_list = list(sizes.unbind(0))
        start = 0
        for gb in batch.groups:
            n = len(gb.params)
            if n:
                self._apply(gb, sizes_list[start : start + n], ok, shared=False)
            start += n

    def etas(self) -> list[tuple[torch.Tensor, float]]:
        """``(parameter, eta)`` for every tensor with state (reads device memory: for logging
        and tests)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state.get(p)
                if s and "rbar" in s:
                    out.append((p, float(s["rbar"] / torch.sqrt(s["G"] + group["eps"]))))
        return out

    def stats(self) -> dict[str, float]:
        out = TuningFreeOptimizer.stats(self)
        rows = [
            (float(s["rbar"]), float(s["G"]), group["eps"])
            for group in self.param_groups
            for p in group["params"]
            if (s := self.state.get(p)) and "rbar" in s
        ]
        if rows:
            eta = sorted(r / math.sqrt(g + e) for r, g, e in rows)
            rbar = sorted(r for r, _, _ in rows)
            G = sorted(g for _, g, _ in rows)
            out.update(
                eta_min=eta[0],
                eta_median=_median(eta),
                eta_max=eta[-1],
                rbar_median=_median(rbar),
                rbar_max=rbar[-1],
                G_median=_median(G),
            )
        if "step" in self.global_state:
            out["step"] = float(self.global_state["step"])
        return out
