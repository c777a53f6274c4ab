"""DoG, L-DoG and T-DoG: SGD whose step size is distance over gradients.

Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule",
ICML 2023 (arXiv:2302.12022; v3 states T-DoG for locally bounded stochastic gradients).

For the iterates ``x_0, x_1, ...`` and stochastic gradients ``g_t`` (``t = 0`` is the first step)::

    r_eps  = reps_rel * (1 + ||x_0||)                      # reps_rel: 1e-3 here, 1e-6 the paper's
    rbar_t = max(r_eps, max_{i <= t} ||x_i - x_0||)       # the largest distance travelled so far
    G_t    = sum_{i <= t} ||g_i||^2
    eta_t  = rbar_t / sqrt(G_t + eps)                      # the DoG step size
    x_{t+1} = x_t - lr * eta_t * g_t                       # lr: a multiplier, 1.0 as the paper

* ``DoG``: one ``eta`` for the whole model. The norms run over every parameter of every param group
  (the Trainer's decay/no-decay split does not change the algorithm) and, under FSDP, over every
  shard: their local sums go through the base class's single collective.
* ``LDoG`` (layer-wise DoG): the same formula for each tensor on its own, ``r_eps``, ``rbar``,
  ``G`` and ``eta`` per tensor, computed as vectors over the tensors. A tensor that starts at 0
  (LoRA's B) has no scale of its own, and the paper's ``1 + ||x_0^k||`` gives it an absolute
  ``reps_rel``; with ``zero_init_scale=True`` (default) it takes ``sqrt(n_k) RMS(x_0)``, the norm
  its ``n_k`` weights would have at the root mean square of all the initial weights.

Fast start (issue 13): ``r_eps`` sets the first step's length, and ``rbar`` then grows by about
``1 + 1/sqrt(t)`` a step, so from the paper's ``reps_rel = 1e-6`` it takes hundreds of steps to
reach the distance the run settles at (``rbar / ||x_0||`` of 1e-2..1e-1 on the suite's tasks):
the default here is ``reps_rel = 1e-3``, chosen on all the suite's tasks (README, "fast start").
``reps_rel=1e-6, zero_init_scale=False`` is the authors' algorithm exactly.
* ``TDoG`` (tamed DoG): DoG's step divided by the logarithmic taming factor of the paper's theory
  (see :class:`TDoG`); it is the variant the paper's guarantees are proved for, and its steps are
  several orders of magnitude smaller than DoG's.

Weight decay is coupled, as in the paper and the authors' code: ``g_t`` above is
``grad + weight_decay * x_t`` (it also enters ``G``); ``p.grad`` itself is never modified.

Precision: with bf16/fp16 parameters (no fp32 master weights), an update below half a unit in
the last place is lost, and DoG's first steps (with the paper's ``reps_rel``, ``r_eps`` is ~1e-6
of the weights' norm) are such: the weights, hence ``rbar``, may not move at all. Train DoG with
fp32 parameters (autocast mixed precision keeps them), or raise ``reps_rel``. Statistics are
fp32 (fp64 for fp64 models).

Polynomial-decay iterate averaging, which the paper pairs with DoG for its results, is
:class:`hf_tuningfree.optim.averaging.PolynomialDecayAverager`.

How a step runs, without reading device memory on the host, in as few passes as possible:

* ``||g||^2`` (and, with weight decay, ``||g + wd x||^2``) per tensor: one reduction pass, whose
  plain gradient norms also serve the base class's non-finite guard (which therefore does not
  read the gradients again).
* ``||x_t - x_0||^2`` was measured by the previous step: the pass that writes ``x_t`` also sums
  ``(x_t - x_0)^2`` per tensor into ``state["dist_sq"]``. The step therefore reads one scalar
  per tensor, and the update is ONE pass that reads ``x, g, x_0`` and writes ``x``. On CPU both
  passes are fused C loops over every tensor of a group in one call each (:mod:`._native`,
  ``implementation="compiled"``, the CPU default): four streams read and one written per step,
  against fused AdamW's four read and three written. ``torch.compile`` cannot do this: inductor
  splits "store x and sum (x - x0)^2" into two loops. Elsewhere (CUDA, 16-bit parameters, no C
  compiler) torch's fused SGD kernel or per-tensor ops update ``x`` and foreach ops measure the
  distance.
* The stored distance assumes that parameters change only through ``step()`` between steps; an
  averager's swap restores them bit-exactly, which keeps it valid. After editing parameters by
  hand (or loading other weights into the model), call :meth:`DoG.refresh_distances`.
* ``x_0`` is per-parameter state created at the parameter's first step with a gradient. ``r_eps``
  is taken from the parameters that have a gradient at the optimizer's first step; a parameter
  whose first gradient comes later starts its own distance at that point.

Memory (issue 17). ``x_0`` is DoG's only parameter-sized state (AdamW keeps two):

* ``implicit_zero_x0=True`` (default): a tensor whose every element is 0 at its first step
  (LoRA's B matrices, zero-initialised biases) stores no ``x_0``; its distance is ``||x||``,
  the same number as from a stored copy of zeros, bit for bit on every path (the idea of prodigy
  PR #23, where LoRA users asked for it), so ``rbar``, ``eta`` and L-DoG's ``zero_init_scale``
  are unchanged. Deciding it needs the values on the host: the step that creates a tensor's
  state reads one flag per fresh tensor, all in one read (one device synchronisation on GPUs,
  none on CPU, where the flags are read through numpy); no later step reads anything. The
  flags travel with the step's one collective, so under FSDP every rank of a sharded tensor
  makes the same choice (the state dict has the same keys on every rank). A state (or a
  checkpoint) without ``x0`` for a tensor means an implicit zero ``x0``, whatever the option.
* ``slice_p=k > 1`` (default 1: off; the idea of prodigy PR #22, ``slice_p``, which OneTrainer
  PR #550 reported to halve Prodigy's memory, applied to DoG's only parameter-sized state):
  a tensor of ``n`` elements stores ``x_0`` only for the elements ``0, k, 2k, ...`` of its
  flattened form (``m = ceil(n / k)`` of them) and its squared distance is estimated as
  ``D2 = (n / m) * sum over those elements of (x - x_0)^2``; ``rbar`` is the max of
  ``sqrt(D2)`` (summed over tensors first for DoG), the gradient norms ``G`` stay exact (they
  need no state), and ``eta = rbar / sqrt(G)`` moves with the estimate (its relative error is
  that of ``sqrt(D2)`` once the distance exceeds ``r_eps``). Bias: under a uniformly random
  offset ``o`` in ``0..k-1`` (keeping ``o, o + k, ...``) ``D2`` is unbiased when ``k`` divides
  ``n`` (each element is kept by exactly one offset; otherwise within a factor ``1 - k/n``);
  the fixed offset 0 used here is deterministic, so its error is structural, not noise: in a
  matrix whose row length is a multiple of ``k`` it sees the same columns ``0, k, 2k, ...`` of
  every row and misjudges the distance when those columns move differently from the rest
  (choose ``k`` coprime with the row lengths to cycle through the columns). The same elements
  are used at every step, so the error does not compound through the running max. ``sqrt`` of
  an unbiased ``D2`` is biased low (Jensen: ``E[sqrt(D2)] <= sqrt(E[D2])``). Tensors with an
  implicit zero ``x_0`` keep their exact distance (it needs no state). Under FSDP2 (a
  ``DTensor`` sharded on dim 0) each rank keeps the elements whose index in the whole tensor is
  a multiple of ``k``, so the estimate equals one process's; the subsample is a rank-local
  tensor (each rank's ``state_dict()`` resumes exactly; resharding a checkpoint with
  distributed checkpointing is not supported with ``slice_p > 1``). On the C path the update
  pass sums the kept elements with a strided loop over each block it has just written.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from . import _native
from .base import (
    GroupBatch,
    StepBatch,
    TuningFreeOptimizer,
    bucket_by_device_and_dtype,
    compute_dtype,
    foreach_norms,
    statistic_dtype,
    working_view,
)
from .distributed import is_dtensor, local_view
from .kernels import (
    FUSED_SGD_CPU_DTYPES,
    IMPL_ENV_VAR,
    IMPLEMENTATIONS,
    StateShapeError,
    fast_path_accepts,
    resolve_implementation,
)
from .validation import (
    check_bool,
    check_choice,
    check_in_range,
    check_nonnegative,
    check_positive,
)

__all__ = ["DoG", "LDoG", "TDoG", "dog_tensor_update", "taming_factor"]

#: Per-parameter 0-dim statistics kept in their own (fp32/fp64) dtype across ``load_state_dict``
#: (torch casts floating per-parameter state to the parameter's dtype, which would round them to
#: bf16 for bf16 parameters).
_SCALAR_STATE_KEYS = ("dist_sq", "rbar", "G")
#: The streams the C update takes, for its checks' messages.
_STREAMS = ("param", "grad", "x0")


# --------------------------------------------------------------------------- kernels
def dog_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor | None,
    dist_sq: torch.Tensor,
    ok: torch.Tensor,
    step_size: torch.Tensor,
    *,
    weight_decay: float,
    layout: tuple[int, int, float] = (1, 0, 1.0),
) -> None:
    """One tensor's DoG update in place, and the squared distance of the result from ``x0``.

    ``x <- x - step_size * (g + weight_decay * x)`` then ``dist_sq <- ||x - x0||^2`` (summed in
    ``dist_sq``'s dtype, from ``x`` as stored; ``x0`` None: an implicit all-zero ``x0``, the
    distance is ``||x||``; ``layout`` ``(stride, offset, scale)`` with ``stride > 1``: ``x0``
    holds elements ``offset, offset + stride, ...`` of the flattened tensor and the distance is
    estimated from those, times ``scale``: see :class:`DoG`, ``slice_p``). Where ``ok`` is False
    (a NaN/Inf gradient somewhere) nothing changes. The per-tensor ("loop") path, and the
    reference for the others.
    """
    g = torch.where(ok, grad, 0.0)  # a private copy: a skipped step's NaN/Inf never reaches x
    if weight_decay != 0.0:
        g = g.add_(param, alpha=weight_decay)  # coupled decay: the paper's g + wd * x
    param.addcmul_(g, step_size, value=-1.0)
    dist_sq.copy_(torch.where(ok, _distance_sq(param, x0, dist_sq.dtype, layout), dist_sq))


def _distance_sq(
    param: torch.Tensor,
    x0: torch.Tensor | None,
    sdt: torch.dtype,
    layout: tuple[int, int, float] = (1, 0, 1.0),
) -> torch.Tensor:
    """``||param - x0||^2`` (0-dim, summed in ``sdt``); ``x0`` None: ``||param||^2``; a
    subsampled ``x0`` (``layout``'s stride > 1): the scaled sum over the kept elements."""
    stride, offset, scale = layout
    if x0 is None:
        diff = param.to(sdt)
    elif stride == 1:
        diff = param.to(sdt) - x0.to(sdt)
    else:  # a strided view: torch ops only (never handed to the C or fused kernels)
        diff = param.reshape(-1)[offset::stride].to(sdt) - x0.to(sdt)
        return (diff * diff).sum() * scale
    return (diff * diff).sum()


def _fused_sgd_available(params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """Whether torch's fused SGD kernel takes this bucket: fp32/fp64 only, because on CPU (torch
    2.13) it leaves the vectorised part of bf16/fp16 tensors unchanged (``SGD(fused=True)`` has
    the same defect), and only contiguous tensors of their parameters' shapes
    (``fast_path_accepts``: it treats a strided tensor as contiguous memory)."""
    return (
        hasattr(torch, "_fused_sgd_")
        and params[0].device.type in ("cpu", "cuda", "xpu", "mps")
        and fast_path_accepts(
            [params, grads],
            ("param", "grad"),
            dtypes=FUSED_SGD_CPU_DTYPES,  # on every device: 16-bit on GPU is untested here
            cpu_only=False,
        )
    )


def _sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    step_size: torch.Tensor,
    skip: torch.Tensor,
    weight_decay: float,
) -> None:
    """``x <- x - step_size * (g + weight_decay * x)`` for a device/dtype bucket in one
    multi-tensor kernel (torch's fused SGD: reads ``x`` and ``g``, writes ``x``, leaves ``g``
    alone); a nonzero ``skip`` (0-dim fp32) leaves every tensor untouched, decided on the device."""
    torch._fused_sgd_(
        params,
        grads,
        [],
        weight_decay=weight_decay,
        momentum=0.0,
        lr=step_size,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        is_first_step=False,
        grad_scale=None,
        found_inf=skip,
    )


def _foreach_distances(
    params: list[torch.Tensor],
    x0s: list[torch.Tensor | None],
    sdt: torch.dtype,
    layouts: list[tuple[int, int, float]] | None = None,
) -> torch.Tensor:
    """``||x - x0||^2`` of each tensor (a vector), with foreach ops (``x0`` None: ``||x||^2``;
    subsampled ``x0`` (``layouts``): per tensor, as :func:`_distance_sq`)."""
    sliced = [] if layouts is None else [i for i, lay in enumerate(layouts) if lay[0] > 1]
    if sliced:
        out = list(_foreach_distances(
            [p for i, p in enumerate(params) if i not in sliced],
            [x for i, x in enumerate(x0s) if i not in sliced],
            sdt,
        ).unbind(0)) if len(sliced) < len(params) else []  # fmt: skip
        for i in sliced:  # the kept elements, a strided view: torch ops
            out.insert(i, _distance_sq(params[i], x0s[i], sdt, layouts[i]))  # type: ignore[index]
        return torch.stack(out)
    stored = [i for i, x0 in enumerate(x0s) if x0 is not None]
    if len(stored) == len(params):
        norms = torch._foreach_norm(torch._foreach_sub(params, x0s), 2, dtype=sdt)
        return torch.stack(norms).square()
    out: list[torch.Tensor | None] = [None] * len(params)
    if stored:
        diffs = torch._foreach_sub([params[i] for i in stored], [x0s[i] for i in stored])
        for i, n in zip(stored, torch._foreach_norm(diffs, 2, dtype=sdt), strict=True):
            out[i] = n
        del diffs
    implicit = [i for i, x0 in enumerate(x0s) if x0 is None]
    for i, n in zip(implicit, torch._foreach_norm([params[i] for i in implicit], 2, dtype=sdt),
                    strict=True):  # fmt: skip
        out[i] = n
    return torch.stack(out).square()  # type: ignore[arg-type]


def _read_flags(flags: torch.Tensor) -> list[bool]:
    """The one host read of the DoG family, made once at state creation (never in a later
    step): which fresh tensors are not all zero. For CPU tensors the values are already in host
    memory and are read through numpy (no device synchronisation exists to avoid); elsewhere
    ``tolist()`` is one synchronisation, for all the step's fresh tensors at once."""
    if flags.device.type == "cpu":
        return [bool(v) for v in flags.numpy().tolist()]
    return [bool(v) for v in flags.tolist()]


def _resolve(requested: str, device: torch.device, numel: int) -> str:
    """The code path for a bucket. ``"auto"``: on CPU the fused C loop (``"compiled"``): it
    costs a one-off ~1 s build per machine, not a compilation per process, so it pays for every
    model size; elsewhere foreach ops (torch's fused SGD + multi-tensor norms). The environment
    override of :func:`~hf_tuningfree.optim.kernels.resolve_implementation` applies."""
    if requested == "auto" and not os.environ.get(IMPL_ENV_VAR, "").strip():
        return "compiled" if device.type == "cpu" else "foreach"
    return resolve_implementation(requested, device, numel)


# --------------------------------------------------------------------------- T-DoG
def taming_factor(
    step: torch.Tensor, lbar: torch.Tensor, l0: torch.Tensor, *, delta: float
) -> torch.Tensor:
    """T-DoG's divisor of the DoG step (0-dim tensor, no host reads).

    ``8^4 * theta_{T,delta} * log_+^2(1 + t * lbar_t^2 / l_0^2)`` with ``log_+(z) = 1 + log z``,
    ``theta_{T,delta} = log(60 log(6T) / delta)`` and ``T = t + 1`` steps so far; ``lbar_t`` is
    the largest gradient norm seen up to step ``t`` and ``l_0`` the first one (see :class:`TDoG`).
    """
    t = step.to(lbar.dtype)
    horizon = t + 1.0
    theta = torch.log(60.0 * torch.log(6.0 * horizon) / delta)
    ratio = torch.where(
        l0 > 0, (lbar * lbar) / (l0 * l0).clamp_min(torch.finfo(l0.dtype).tiny), 1.0
    )
    log_plus = 1.0 + torch.log1p(t * ratio)
    return (8.0**4) * theta * log_plus * log_plus


# --------------------------------------------------------------------------- optimizers
class DoG(TuningFreeOptimizer):
    r"""DoG (Ivgi, Hinder & Carmon, ICML 2023): one step size for the whole model.

    .. math::
        \eta_t = \frac{\bar r_t}{\sqrt{G_t + \epsilon}},\quad
        \bar r_t = \max\big(r_\epsilon, \max_{i\le t}\|x_i - x_0\|\big),\quad
        G_t = \sum_{i\le t}\|g_i\|^2,\quad
        x_{t+1} = x_t - \mathrm{lr}\cdot\eta_t\, g_t

    with :math:`r_\epsilon = \texttt{reps\_rel}\,(1 + \|x_0\|)` and
    :math:`g_t = \nabla + \texttt{weight\_decay}\cdot x_t` (coupled decay, as the paper).

    Use it with iterate averaging (:class:`~hf_tuningfree.optim.averaging.PolynomialDecayAverager`):
    DoG has no decaying schedule, and the paper's results are for the averaged weights.

    Args:
        params: parameters or param groups.
        lr: multiplier of the DoG step (default 1.0, the paper's; schedules and warm-up multiply
            it). Not a learning rate to tune.
        reps_rel: ``r_eps`` relative to ``1 + ||x_0||`` (default 1e-3, measured on the suite's
            tasks; the paper's is 1e-6). It sets the first step; the authors suggest 1e-4 for
            models with batch normalisation and smaller values if the first steps diverge. Must
            be > 0 and the same in every param group (it defines one model-wide quantity).
        weight_decay: coupled weight decay (added to the gradient, also in ``G``), per group.
        eps: added to ``G`` for numerical safety (default 1e-8, as the authors); must be the same
            in every param group.
        implementation: ``"auto"`` (CPU: ``"compiled"``; elsewhere ``"foreach"``),
            ``"compiled"`` (on CPU, fp32/fp64: the fused C loops of
            :mod:`hf_tuningfree.optim._native`, built once per machine with the system C
            compiler; otherwise as ``"foreach"``), ``"foreach"`` (torch's fused SGD kernel and
            multi-tensor norms) or ``"loop"`` (tensor by tensor, the reference). The environment
            variable ``HF_TUNINGFREE_IMPL`` overrides ``"auto"``.
        implicit_zero_x0: True (default): no stored ``x0`` for a tensor that is all zero at its
            first step (its distance is ``||x||``; the same ``rbar`` and ``eta``, bit for bit,
            as with a stored copy); one batched host read at the step that creates state (see
            the module docstring). False: every tensor stores its copy, as before.
        slice_p: ``k >= 1`` (int, per group; default 1): with ``k > 1`` store ``x0`` for every
            ``k``-th element only (``x0`` is then 1-D, ``ceil(n / k)`` elements) and estimate
            each tensor's distance from them, scaled by ``sqrt(n / ceil(n / k))``: ``1/k`` of the
            memory, ``rbar`` and ``eta`` from an estimate whose bias the module docstring
            states. Saved with the param groups; changing it after the state exists raises.
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    Per-parameter state: ``x0`` (the parameter at its first step with a gradient; absent for an
    all-zero tensor with ``implicit_zero_x0``; 1-D, every ``slice_p``-th element, with
    ``slice_p > 1``) and
    ``dist_sq`` (``||x - x0||^2`` of this tensor, this rank's part). Model-wide state
    (``global_state``): ``rbar``, ``G``, ``eta`` (0-dim, on the parameters' device) and ``step``
    (steps applied).
    ``stats()`` reports ``eta`` (without the ``lr`` multiplier), ``rbar``, ``G`` and ``step``.
    """

    _layerwise = False
    SCALAR_STATE_KEYS = TuningFreeOptimizer.SCALAR_STATE_KEYS | frozenset(_SCALAR_STATE_KEYS)
    _CONSTRUCTOR_ONLY = (*TuningFreeOptimizer._CONSTRUCTOR_ONLY, "implicit_zero_x0")
    _PICKLED_ATTRIBUTES = (*TuningFreeOptimizer._PICKLED_ATTRIBUTES, "_implicit_zero_x0")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        reps_rel: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        implementation: str = "auto",
        *,
        implicit_zero_x0: bool = True,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        self._implicit_zero_x0 = check_bool("implicit_zero_x0", implicit_zero_x0)
        defaults = {
            "slice_p": _check_slice_p(slice_p),
            "lr": check_nonnegative("lr", lr),
            "reps_rel": check_positive("reps_rel", reps_rel),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
            "eps": check_nonnegative("eps", eps),
            "implementation": check_choice("implementation", implementation, IMPLEMENTATIONS),
        }
        super().__init__(
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, check in (
            ("slice_p", lambda _, v: _check_slice_p(v)),
            ("lr", check_nonnegative),
            ("reps_rel", check_positive),
            ("weight_decay", check_nonnegative),
            ("eps", check_nonnegative),
        ):
            if key in param_group:
                param_group[key] = check(key, param_group[key])
        super().add_param_group(param_group)
        if not self._layerwise:
            for key in self._model_wide_keys():
                values = {g[key] for g in self.param_groups}
                if len(values) > 1:
                    raise ValueError(
                        f"Invalid {key}: {sorted(values)} in different param groups; "
                        f"{type(self).__name__} computes one model-wide step size, so {key} must "
                        "be the same in every group (LDoG accepts per-group values)"
                    )

    def _model_wide_keys(self) -> tuple[str, ...]:
        return ("reps_rel", "eps")

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        device = local_view(param).device
        sdt = statistic_dtype(param.dtype)
        if not getattr(self, "_implicit_zero_x0", True):
            state["x0"] = _make_x0(param, group.get("slice_p", 1))
        # else x0 is taken in this step's _update (_take_x0), only if the tensor is not all zero
        state["dist_sq"] = torch.zeros((), dtype=sdt, device=device)  # ||x - x0||^2, local part
        if self._layerwise:
            state["rbar"] = torch.zeros((), dtype=sdt, device=device)  # 0 until initialised
            state["G"] = torch.zeros((), dtype=sdt, device=device)

    def _check_fit(self, gb: GroupBatch) -> None:
        """The base class's check, on the tensors with a stored ``x0`` and on those without one
        apart, so that a group mixing both (LoRA: A stored, B implicit) keeps its whole-list
        comparisons instead of a per-parameter check every step."""
        sliced = gb.group.get("slice_p", 1) > 1
        kind = [_x0_kind(s, p, sliced) for s, p in zip(gb.states, gb.originals, strict=True)]
        if len(set(kind)) <= 1 and (not kind or kind[0] != "sliced"):
            super()._check_fit(gb)
            return
        for want in ("full", "none", "sliced"):
            idx = [i for i, k in enumerate(kind) if k == want]
            if not idx:
                continue
            states = [gb.states[i] for i in idx]
            if want == "sliced":  # checked against the group's slice_p in _layouts, each step
                states = [{k: v for k, v in st.items() if k != "x0"} for st in states]
            part = GroupBatch(
                gb.group,
                params=[gb.params[i] for i in idx],
                grads=[gb.grads[i] for i in idx],
                states=states,
                originals=[gb.originals[i] for i in idx],
            )
            super()._check_fit(part)

    def _check_state_shapes(self, state: dict[Any, Any], groups: list[dict[str, Any]]) -> None:
        # the groups being loaded say which slice_p each parameter's x0 was made with
        self._slice_of = {
            id(p): g.get("slice_p", 1)
            for g in groups
            for p in g["params"]
            if isinstance(p, torch.Tensor)
        }
        try:
            super()._check_state_shapes(state, groups)
        finally:
            self._slice_of = {}

    def _misfit(self, param: torch.Tensor, state: dict[str, Any]) -> str | None:
        """The base class's check, where with ``slice_p = k > 1`` ``x0`` may also be the 1-D
        subsample of the length :func:`_slice_geometry` gives."""
        k = self.__dict__.get("_slice_of", {}).get(id(param), 1)
        x0 = state.get("x0")
        if k == 1 or not isinstance(x0, torch.Tensor) or is_dtensor(x0) or x0.dim() != 1:
            return super()._misfit(param, state)
        problem = super()._misfit(param, {key: v for key, v in state.items() if key != "x0"})
        if problem is not None or super()._misfit(param, {"x0": x0}) is None:
            return problem
        numel = local_view(param).numel() * (2 if param.is_complex() else 1)
        _, _, kept = _slice_geometry(param, numel, k)
        if x0.numel() == kept:
            return None
        return (
            f"'x0' has shape {list(x0.shape)}, expected [{kept}] (every {k}-th element, "
            f"slice_p={k}) or shape {list(param.shape)}"
        )

    def _layouts(self, gb: Any, x0s: list[torch.Tensor | None]) -> list[tuple[int, int, float]]:
        """``(stride, offset, scale)`` of every tensor's ``x0`` (see :func:`_slice_geometry`);
        ``(1, 0, 1.0)`` for a full copy or none. A subsample of the wrong length for the
        group's ``slice_p`` raises :class:`~hf_tuningfree.optim.kernels.StateShapeError`."""
        k = gb.group.get("slice_p", 1)
        out = []
        for p, local, x0 in zip(gb.originals, gb.params, x0s, strict=True):
            if x0 is None or k == 1 or x0.shape == local.shape:
                out.append((1, 0, 1.0))
                continue
            offset, scale, kept = _slice_geometry(p, local.numel(), k)
            if x0.dim() != 1 or x0.numel() != kept:
                raise StateShapeError(
                    f"x0 holds {x0.numel()} elements, {kept} expected for slice_p={k} (was "
                    "slice_p changed after the state was created?)",
                    param=local,
                    key="x0",
                )
            out.append((k, offset, scale))
        return out

    def _zero_check(self, batch: StepBatch, sdt: torch.dtype) -> torch.Tensor | None:
        """For implicit zero ``x0``: per tensor of the batch (batch order) 1.0 where it is fresh
        (first step) and not all zero on this rank, else 0.0; summed over ranks with the step's
        other statistics (no collective of its own), so every rank of a sharded tensor makes the
        same choice. None when no tensor needs the check (no fresh tensor, or the option off)."""
        if not getattr(self, "_implicit_zero_x0", True):
            return None
        if not any(f for gb in batch.groups for f in gb.fresh):
            return None
        zero = torch.zeros((), dtype=torch.bool, device=batch.device)
        flags = [
            _x0_source(p).ne(0).any().to(batch.device) if f else zero  # NaN counts as nonzero
            for gb in batch.groups
            for p, f in zip(gb.originals, gb.fresh, strict=True)
        ]
        return torch.stack(flags).to(sdt)

    def _take_x0(self, batch: StepBatch, stats: dict[str, torch.Tensor]) -> None:
        """Store ``x0`` for the fresh tensors that are not all zero (on any rank), before the
        update writes them; the others keep none (``x0`` implicitly 0). Reads the flags of
        :meth:`_zero_check` on the host: once, at the step that creates the state."""
        nonzero = stats.get("x0_nz")
        if nonzero is None:
            return
        flags = iter(_read_flags(nonzero > 0))
        for gb in batch.groups:
            for state, p, fresh in zip(gb.states, gb.originals, gb.fresh, strict=True):
                if next(flags) and fresh and "x0" not in state:
                    src = torch.view_as_real(p) if p.is_complex() else p
                    state["x0"] = _make_x0(src, gb.group.get("slice_p", 1))

    # ------------------------------------------------------------------ statistics
    @staticmethod
    def _stat_dtype(batch: StepBatch) -> torch.dtype:
        fp64 = any(p.dtype == torch.float64 for gb in batch.groups for p in gb.params)
        return torch.float64 if fp64 else torch.float32

    def _grad_sq(self, batch: StepBatch, sdt: torch.dtype) -> torch.Tensor:
        """``||g + wd x||^2`` of every tensor of the batch (a vector in batch order).

        One reduction pass per bucket: the C loop on CPU (fp32/fp64), foreach norms elsewhere.
        The plain gradient norms it yields are handed to the base class's non-finite guard
        (``batch.grad_norms()``), so the gradients are read once for both."""
        guard: list[list[torch.Tensor]] = []
        parts: list[torch.Tensor] = []
        for gb in batch.groups:
            n = len(gb.params)
            if n == 0:
                guard.append([])
                continue
            wd = gb.group["weight_decay"]
            raw = torch.empty(n, dtype=sdt, device=batch.device)
            eff = torch.empty(n, dtype=sdt, device=batch.device)
            buckets = bucket_by_device_and_dtype([gb.params, gb.grads])
            for (device, _), ([ps, gs], idx) in buckets.items():
                impl = _resolve(gb.group["implementation"], device, sum(p.numel() for p in ps))
                if impl == "compiled" and _native.accepts([ps, gs], ("param", "grad")):
                    both = torch.empty(len(ps), 2, dtype=torch.float64)
                    _native.grad_sq(ps, gs, wd, both)
                    r, e = both[:, 0].to(sdt), both[:, 1].to(sdt)
                else:
                    r = torch.stack(torch._foreach_norm(gs, 2, dtype=sdt)).square()
                    e = r
                    if wd != 0.0:
                        added = torch._foreach_add(gs, ps, alpha=wd)
                        e = torch.stack(torch._foreach_norm(added, 2, dtype=sdt)).square()
                        del added
                if len(buckets) == 1:
                    raw, eff = r.to(batch.device), e.to(batch.device)
                else:
                    where = torch.tensor(idx, device=batch.device)
                    raw[where], eff[where] = r.to(batch.device), e.to(batch.device)
            guard.append(list(raw.sqrt().unbind(0)))
            parts.append(eff)
        batch._grad_norms = guard
        if not parts:
            return torch.zeros(0, dtype=sdt, device=batch.device)
        return torch.cat(parts)

    def _local_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        sdt = self._stat_dtype(batch)
        zero = torch.zeros((), dtype=sdt, device=batch.device)
        # ||x_t - x_0||^2 over every parameter with state (also those without a gradient now:
        # they did not move since their last update, which stored their distance)
        dists = [
            s["dist_sq"]
            for group in self.param_groups
            for p in group["params"]
            if (s := self.state.get(p)) and "dist_sq" in s
        ]
        out = {
            "g2": self._grad_sq(batch, sdt).sum(),
            "d2": torch.stack([d.to(batch.device, sdt) for d in dists]).sum() if dists else zero,
        }
        if "rbar" not in self.global_state:  # first step: ||x_0|| for r_eps
            norms = [n for gb in batch.groups for n in foreach_norms(gb.params)]
            out["x0_sq"] = (
                torch.stack([n.to(batch.device, sdt) for n in norms]).square().sum()
                if norms
                else zero
            )
        nonzero = self._zero_check(batch, sdt)
        if nonzero is not None:
            out["x0_nz"] = nonzero
        return out

    def _eta(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Advance ``rbar``, ``G`` (and ``step``) in ``global_state``; return this step's eta."""
        gs = self.global_state
        reps_rel = self.param_groups[0]["reps_rel"]
        eps = self.param_groups[0]["eps"]
        g2, d2 = stats["g2"], stats["d2"]
        if "rbar" not in gs:  # first step (also when skipped: x_0 has been taken)
            r_eps = reps_rel * (1.0 + stats["x0_sq"].sqrt())
            gs["rbar"] = r_eps
            gs["G"] = torch.zeros_like(r_eps)
            gs["eta"] = torch.zeros_like(r_eps)
            gs["step"] = torch.zeros((), dtype=torch.int64, device=device)
        rbar = self.global_tensor("rbar", device, _missing)
        G = self.global_tensor("G", device, _missing)
        step = self.global_tensor("step", device, _missing)
        new_rbar = torch.where(ok, torch.maximum(rbar, d2.sqrt()), rbar)
        new_G = torch.where(ok, G + g2, G)
        eta = _safe_div(new_rbar, torch.sqrt(new_G + eps))
        eta = self._tame(eta, new_rbar, new_G, g2, ok, step, device)
        gs["rbar"], gs["G"] = new_rbar, new_G
        gs["eta"] = torch.where(ok, eta, self.global_tensor("eta", device, _missing))
        gs["step"] = step + ok.to(torch.int64)
        return eta

    def _tame(
        self,
        eta: torch.Tensor,
        rbar: torch.Tensor,
        G: torch.Tensor,
        g2: torch.Tensor,
        ok: torch.Tensor,
        step: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        return eta

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        self._take_x0(batch, stats)
        eta = self._eta(stats, ok, batch.device)
        zero = torch.zeros((), dtype=eta.dtype, device=eta.device)
        for gb in batch.groups:
            if not gb.params:
                continue
            size = torch.where(ok, eta * gb.group["lr"], zero)
            self._apply(gb, [size] * len(gb.params), ok, shared=True)

    def _apply(
        self, gb: Any, step_sizes: list[torch.Tensor], ok: torch.Tensor, *, shared: bool
    ) -> None:
        """``x -= step_size * (g + wd x)`` for every tensor of a group (``shared``: one step size
        for the group), then ``dist_sq = ||x - x0||^2`` for each.

        ``"compiled"`` on CPU (fp32/fp64): the fused C loop, one call for the bucket.
        ``"loop"`` and 16-bit parameters: ``dog_tensor_update`` tensor by tensor. Otherwise
        (``"foreach"``, CUDA): torch's fused multi-tensor SGD kernel, then foreach ops for the
        distances.
        """
        group = gb.group
        wd = group["weight_decay"]
        x0_list = [_stored_x0(s) for s in gb.states]
        layout_list = self._layouts(gb, x0_list)
        lists = [gb.params, gb.grads, x0_list, gb.state_list("dist_sq")]
        for (device, dtype), (bucket, idx) in bucket_by_device_and_dtype(lists).items():
            ok_d = ok.to(device)
            cdt = compute_dtype(dtype)
            sizes = [step_sizes[i].to(device, cdt) for i in idx]
            params, grads, x0s, dists = bucket
            layouts = [layout_list[i] for i in idx]
            impl = _resolve(group["implementation"], device, sum(p.numel() for p in params))
            if impl == "compiled" and _c_takes(params, grads, x0s):
                steps = sizes[0] if shared else torch.stack(sizes)
                new = torch.stack(dists).to(torch.float64)  # kept as is on a skipped step
                _native.dog_update(
                    params,
                    grads,
                    x0s,
                    steps,
                    wd,
                    ok_d,
                    new,
                    x0_strides=[lay[0] for lay in layouts],
                    x0_offsets=[lay[1] for lay in layouts],
                )
                if any(lay[0] > 1 for lay in layouts):  # sums over the kept elements, scaled
                    scales = torch.tensor([lay[2] for lay in layouts], dtype=torch.float64)
                    new = torch.where(ok_d, new * scales, new)
                torch._foreach_copy_(dists, list(new.to(dists[0].dtype).unbind(0)))
            elif impl == "loop" or not _fused_sgd_available(params, grads):
                for j, (p, g, x0, d) in enumerate(zip(*bucket, strict=True)):
                    dog_tensor_update(
                        p, g, x0, d, ok_d, sizes[j], weight_decay=wd, layout=layouts[j]
                    )
            else:
                skip = (~ok_d).to(torch.float32)
                if shared:
                    _sgd_step_(params, grads, sizes[0], skip, wd)
                else:
                    for j in range(len(params)):
                        _sgd_step_(params[j : j + 1], grads[j : j + 1], sizes[j], skip, wd)
                new = _foreach_distances(params, x0s, dists[0].dtype, layouts)
                kept = torch.where(ok_d, new, torch.stack(dists))
                torch._foreach_copy_(dists, list(kept.unbind(0)))

    # ------------------------------------------------------------------ maintenance
    @torch.no_grad()
    def refresh_distances(self) -> None:
        """Recompute every stored ``||x - x0||^2`` from the parameters as they are now.

        ``step()`` keeps these distances current by itself; call this after changing parameters
        outside ``step()`` (editing them by hand, loading other weights into the model).
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "dist_sq" not in state:
                    continue
                d = state["dist_sq"]
                x = working_view(p)
                x0 = _stored_x0(state)
                gb = GroupBatch(group, params=[x], originals=[p])
                layout = self._layouts(gb, [x0])[0]
                d.copy_(_distance_sq(x, x0, d.dtype, layout))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating per-parameter state to the parameter's dtype; keep the 0-dim
        # statistics in their own dtype (fp32 for bf16 parameters) so a resume is exact.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        keep: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        for i, p in zip(ids, params, strict=False):
            saved = state_dict["state"].get(i)
            if not isinstance(saved, dict):
                continue
            for key in _SCALAR_STATE_KEYS:
                value = saved.get(key)
                if isinstance(value, torch.Tensor):
                    keep.append((p, key, value))
        super().load_state_dict(state_dict)
        for p, key, value in keep:
            self.state[p][key] = value.detach().clone().to(local_view(p).device)

    def stats(self) -> dict[str, float]:
        out = super().stats()
        gs = self.global_state
        for key in ("eta", "rbar", "G"):
            if key in gs:
                out[key] = float(gs[key])
        if "step" in gs:
            out["step"] = float(gs["step"])
        return out


class TDoG(DoG):
    r"""T-DoG, the "tamed" DoG of Ivgi, Hinder & Carmon's theory (arXiv:2302.12022 v3, Section 3,
    the step-size definition for locally bounded stochastic gradients).

    .. math::
        \eta_t = \frac{\bar r_t}{8^4\,\theta_{T,\delta}\,
                 \log_+^2\!\big(1 + t\,\bar\ell_t^2/\bar\ell_0^2\big)\,
                 \sqrt{G_t + 16\,\bar\ell_t^2}},
        \qquad \theta_{T,\delta} = \log\frac{60\log(6T)}{\delta},\quad \log_+(z) = 1 + \log z,

    where :math:`\bar\ell_t = \max_{i\le t}\ell(x_i)` bounds the stochastic gradient norms met
    so far. The paper's :math:`\ell` is a (local) bound that is not observable; here
    :math:`\bar\ell_t` is the largest gradient norm observed up to step :math:`t` (the same proxy
    makes :math:`\bar\ell_0 = \|g_0\|`), and :math:`T = t + 1`, the steps so far (the paper
    fixes the horizon :math:`T` in advance). ``rbar``, ``G``, ``r_eps`` and weight decay are as in
    :class:`DoG`.

    The taming makes the theory work (iterates stay within a constant factor of the initial
    distance with probability ``1 - delta``); in practice the divisor is 10^5-10^6, so T-DoG
    moves very little in runs of ordinary length. It is here for fidelity to the paper and for
    experiments; train with :class:`DoG` or :class:`LDoG`.

    Args:
        delta: failure probability of the high-probability guarantee (default 0.1), in (0, 1).
        (others): as :class:`DoG`.

    Extra model-wide state: ``lbar`` (largest gradient norm so far) and ``l0`` (the first one);
    ``stats()`` adds ``lbar`` and ``taming`` (the divisor).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        reps_rel: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        delta: float = 0.1,
        implementation: str = "auto",
        *,
        implicit_zero_x0: bool = True,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        self._delta = check_in_range("delta", delta, 0.0, 1.0, low_inclusive=False)
        super().__init__(
            params,
            lr=lr,
            reps_rel=reps_rel,
            weight_decay=weight_decay,
            eps=eps,
            implementation=implementation,
            implicit_zero_x0=implicit_zero_x0,
            slice_p=slice_p,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    _PICKLED_ATTRIBUTES = (*DoG._PICKLED_ATTRIBUTES, "_delta")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "delta" in param_group:
            check_in_range("delta", param_group["delta"], 0.0, 1.0, low_inclusive=False)
        else:
            param_group["delta"] = getattr(self, "_delta", 0.1)
        super().add_param_group(param_group)

    def _fill_group(self, group: dict[str, Any]) -> None:
        super()._fill_group(group)
        group.setdefault("delta", self._delta)

    def _model_wide_keys(self) -> tuple[str, ...]:
        return ("reps_rel", "eps", "delta")

    def _tame(
        self,
        eta: torch.Tensor,
        rbar: torch.Tensor,
        G: torch.Tensor,
        g2: torch.Tensor,
        ok: torch.Tensor,
        step: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        gs = self.global_state
        zero = torch.zeros_like(rbar)
        lbar = self.global_tensor("lbar", device, lambda d: zero)
        l0 = self.global_tensor("l0", device, lambda d: zero)
        gnorm = g2.sqrt()
        new_lbar = torch.where(ok, torch.maximum(lbar, gnorm), lbar)
        new_l0 = torch.where(ok & (l0 == 0), gnorm, l0)  # first nonzero gradient norm applied
        factor = taming_factor(step, new_lbar, new_l0, delta=self.param_groups[0]["delta"])
        gs["lbar"], gs["l0"] = new_lbar, new_l0
        gs["taming"] = torch.where(ok, factor, self.global_tensor("taming", device, lambda d: zero))
        return _safe_div(
            rbar, factor * torch.sqrt(G + 16.0 * new_lbar * new_lbar + self.param_groups[0]["eps"])
        )

    def stats(self) -> dict[str, float]:
        out = super().stats()
        for key in ("lbar", "taming"):
            if key in self.global_state:
                out[key] = float(self.global_state[key])
        return out


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


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den`` is 0 (``eps=0`` with only zero gradients so far: no step,
    rather than ``inf * 0 = NaN``)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def _missing(device: torch.device) -> torch.Tensor:
    raise KeyError("DoG global state is incomplete (a checkpoint from another optimizer?)")


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def _x0_source(p: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor a parameter's ``x0`` is taken from (its real view if complex)."""
    local = local_view(p)
    return torch.view_as_real(local) if local.is_complex() else local


def _stored_x0(state: dict[str, Any]) -> torch.Tensor | None:
    """The rank-local stored ``x0`` of a parameter, None where it is implicitly all zero."""
    x0 = state.get("x0")
    return None if x0 is None else local_view(x0)


def _c_takes(
    params: list[torch.Tensor], grads: list[torch.Tensor], x0s: list[torch.Tensor | None]
) -> bool:
    """Whether the C update takes this bucket: parameters and gradients as ``_native.accepts``
    (which raises on a gradient of another shape), every stored ``x0`` a contiguous CPU tensor
    of the parameters' dtype (the base class has checked its shape); implicit ones are NULL."""
    if not _native.accepts([params, grads], _STREAMS[:2]):
        return False
    dtype = params[0].dtype
    return all(x is None or (x.is_cpu and x.dtype == dtype and x.is_contiguous()) for x in x0s)


def _check_slice_p(value: object) -> int:
    """``slice_p`` must be an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid slice_p: {value!r}; allowed: an int >= 1 (1: no subsampling)")
    return value


def _x0_kind(state: dict[str, Any], p: torch.Tensor, sliced: bool) -> str:
    """``"none"`` (implicit zero), ``"sliced"`` (with ``slice_p > 1``: not of the parameter's
    shape; its length is checked in ``_layouts``) or ``"full"`` (anything else: the base class
    checks it has the parameter's shape)."""
    x0 = state.get("x0")
    if x0 is None:
        return "none"
    if not sliced or is_dtensor(x0):
        return "full"
    shape = (torch.view_as_real(p) if p.is_complex() else p).shape
    return "full" if x0.shape == shape else "sliced"


def _slice_geometry(p: torch.Tensor, local_numel: int, k: int) -> tuple[int, float, int]:
    """``(offset, scale, kept)`` of the ``slice_p = k`` subsample of parameter ``p`` (rank-local
    part of ``local_numel`` real elements): the kept elements are those whose index in the
    flattened (whole) tensor is a multiple of ``k``, i.e. local elements ``offset, offset + k,
    ...`` (``kept`` of them), and ``scale = n / ceil(n / k)`` for the whole tensor's ``n``
    elements. A ``DTensor`` sharded on dim 0 only (FSDP2) keeps the same elements as the whole
    tensor would, so the ranks' scaled sums add up to the one-process estimate; other
    placements (and FSDP1 flat shards) subsample each rank's part on its own (offset 0, the
    local ``n``)."""
    n, start = local_numel, 0
    if is_dtensor(p):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape = tuple(p.shape)
        local_shape, offsets = compute_local_shape_and_global_offset(
            p.shape, p.device_mesh, p.placements
        )
        if len(shape) >= 1 and tuple(local_shape[1:]) == shape[1:]:
            row = math.prod(shape[1:]) * (2 if p.is_complex() else 1)
            n, start = p.numel() * (2 if p.is_complex() else 1), offsets[0] * row
    offset = (-start) % k
    kept = max(0, -(-(local_numel - offset) // k))
    total_kept = -(-n // k)
    return offset, (n / total_kept if total_kept else 1.0), kept


def _make_x0(param: torch.Tensor, k: int) -> torch.Tensor:
    """The stored ``x0`` of ``param`` (its real view if complex): a contiguous copy, or with
    ``slice_p = k > 1`` a 1-D rank-local copy of the kept elements (:func:`_slice_geometry`)."""
    if k == 1:
        x0 = param.detach().clone(memory_format=torch.preserve_format)
        return x0 if is_dtensor(x0) or x0.is_contiguous() else x0.contiguous()
    local = local_view(param).detach()
    offset, _, _ = _slice_geometry(param, local.numel(), k)
    return local.reshape(-1)[offset::k].clone()
