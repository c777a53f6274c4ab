"""Schedule-free Prodigy: Prodigy's step size with schedule-free iterate averaging.

Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled", NeurIPS 2024
(arXiv:2405.15682): the momentum of Adam is replaced by an interpolation and an average of three
sequences, so that a CONSTANT step size reaches what a decaying schedule reaches, without knowing
the run's length. With ``gamma_k`` the step and ``u_k`` Adam's normalised gradient::

    y_k     = (1 - beta1) z_k + beta1 x_k          (the gradient is taken here)
    z_{k+1} = z_k - gamma_k u_k                    (the base optimizer's iterate)
    x_{k+1} = (1 - c_{k+1}) x_k + c_{k+1} z_{k+1}   (the average: evaluate and save this one)
    c_{k+1} = w_k / sum_{i <= k} w_i,   w_k = (max_{i <= k} gamma_i)^2

Prodigy (Mishchenko & Defazio, ICML 2024) supplies ``gamma_k = d_k lr sqrt(1 - beta2^(k+1))``,
with ``d_k`` its lower bound on the distance to the solution estimated from ``<g_k, x_0 - z_k>``:
the schedule-free bound (the paper's Theorem 1) makes ``sum_k w_k <g_k, z_k - x_*>`` (gradients at
``y_k``, the base iterate ``z_k``) non-negative, so ``sum_k w_k <g_k, x_0 - z_k> <= ||s|| D`` as
in D-Adaptation's dual-averaging argument, with ``z`` the sequence that moves by the steps.
Adam's second moment ``v`` is of the raw gradients (schedule-free AdamW's ``u``, with ``d`` in
``gamma``); at a constant ``d`` it is Prodigy's ``d g / (sqrt(v_d) + d eps)``, and a ``d`` that
jumps (the fast start, ``d0_rel``) does not make the next steps ``d_{k+1} / d_k`` times larger
through a ``v`` that remembers the small ``d_k``.
The averaging weights ``w_k`` are the squared steps, as the paper's warm-up analysis and the
authors' code use, so the iterates of the first steps, taken while ``d`` is still tiny, weigh
almost nothing in ``x``: Prodigy's growth of ``d`` acts as the warm-up schedule-free needs. This is
the combination ``prodigy-plus-schedule-free`` ships for LoRA training.

The parameters hold ``y`` while training and ``x`` after :meth:`eval`; :meth:`train` goes back.
Only ``z`` is stored: ``x = (y - (1 - beta1) z) / beta1``, so the state is the size of
Prodigy's (``z, v, s, x0`` against ``m, v, s, x0``). The step combines the three updates into
two (the authors' form)::

    y_{k+1} = y_k + c (z_k - y_k) - gamma_k (1 - beta1 (1 - c)) u_k
    z_{k+1} = z_k - gamma_k u_k

Evaluate and save in eval mode (``optimizer.eval()``, then ``optimizer.train()`` before the next
step; ``step()`` in eval mode raises). ``TuningFreeTrainer`` does this for evaluation, for
``save_model`` and for checkpoints (:mod:`hf_tuningfree.hf.schedule_free`). Switching modes is a
``lerp`` each way, exact to rounding (one ulp), and a checkpoint holds the mode, so a resume
repeats the same operations and continues bit-exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .base import GroupBatch
from .dadapt.passes import (
    TensorPass,
    _flags,
    _pass,
    _scalar,
    _weight_decay_scalars,
    effective_grad,
)
from .distributed import local_view
from .prodigy import Prodigy, prodigy_s, prodigy_sums
from .validation import check_nonnegative, check_nonnegative_int

__all__ = ["ProdigyScheduleFree", "prodigy_sf_tensor_update", "schedule_free_weight"]

#: The param-group key that says whether the group's parameters hold ``y`` (True) or ``x``.
TRAIN_MODE = "train_mode"


def prodigy_sf_tensor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    z: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    s: torch.Tensor | None,
    ok: torch.Tensor,
    step_size: torch.Tensor,
    y_step: torch.Tensor,
    average: torch.Tensor,
    s_weight: torch.Tensor,
    coupled_wd: torch.Tensor,
    decoupled_wd: torch.Tensor,
    c_v: torch.Tensor,
    c_s: torch.Tensor,
    eps: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> None:
    """One tensor of schedule-free Prodigy, in place (``param`` holds ``y``).

    ``step_size`` is ``gamma = d lr bc``, ``average`` the averaging weight ``c``, ``y_step``
    ``gamma (1 - beta1 (1 - c))``; ``s_weight`` the weight of ``g`` in ``s``; ``c_v = 1 - beta2``,
    ``c_s = beta3 - 1``; ``decoupled_wd`` the decay coefficient applied at ``y`` (inside ``u``,
    as the authors' schedule-free AdamW). On a skipped step every coefficient is 0 and nothing
    changes."""
    g, y = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    g = torch.where(ok, g, 0.0)
    zz = z.to(g.dtype)
    v = exp_avg_sq.to(g.dtype)
    v = v + c_v * (g * g - v)
    u = g / (v.sqrt() + eps) + decoupled_wd * y
    param.copy_(y + average * (zz - y) - y_step * u)
    z.copy_(zz - step_size * u)
    exp_avg_sq.copy_(v)
    if s is not None:  # None: slice_p > 1 (prodigy_sf_sliced_s)
        s.copy_(prodigy_s(s.to(g.dtype), g, s_weight, c_s))


def prodigy_sf_sliced_s(
    param: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    step_size: torch.Tensor,
    y_step: torch.Tensor,
    average: torch.Tensor,
    s_weight: torch.Tensor,
    coupled_wd: torch.Tensor,
    decoupled_wd: torch.Tensor,
    c_v: torch.Tensor,
    c_s: torch.Tensor,
    *_: torch.Tensor,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> torch.Tensor:
    """Schedule-free Prodigy's new ``s`` on the kept elements (``slice_p > 1``)."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    return prodigy_s(s.to(g.dtype), torch.where(ok, g, 0.0), s_weight, c_s)


def prodigy_sf_statistics(
    param: torch.Tensor,
    grad: torch.Tensor,
    z: torch.Tensor,
    s: torch.Tensor,
    x0: torch.Tensor | None,
    coupled_wd: torch.Tensor,
    s_weight: torch.Tensor,
    c_s: torch.Tensor,
    *,
    maximize: bool,
    coupled: bool,
    acc64: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of schedule-free Prodigy for one tensor: ``||g||^2``, ``<g', x_0 - z_k>`` (the
    base iterate: see :class:`ProdigyScheduleFree`) and ``||s_{k+1}||_1``."""
    g, _ = effective_grad(grad, param, coupled_wd, maximize=maximize, coupled=coupled)
    return prodigy_sums(grad, g, z.to(g.dtype), s, x0, s_weight, c_s, acc64)


_PRODIGY_SF_STATISTICS = _pass(
    prodigy_sf_statistics,
    "ProdigyScheduleFree statistics",
    ("z", "s", "x0"),
    ("g_sq", "dot", "s_l1"),
    optional=("x0",),
)
_PRODIGY_SF_UPDATE = _pass(
    prodigy_sf_tensor_update,
    "ProdigyScheduleFree",
    ("z", "exp_avg_sq", "s"),
    (),
    ("param", "z", "exp_avg_sq", "s"),
    optional=("s",),
    sliced=prodigy_sf_sliced_s,
)


def schedule_free_weight(
    step_size: torch.Tensor,
    lr_max: torch.Tensor,
    weight_sum: torch.Tensor,
    step: torch.Tensor | None = None,
    r: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(new lr_max, new weight_sum, c)``: the averaging weight of this step's ``z`` in ``x``,
    ``c = w / (weight_sum + w)`` with ``w = (k + 1)^r max(lr_max, step_size)^2`` (``k = step``,
    the steps taken before this one; the paper's polynomial weighting, ``r = 0``: none), 0 while
    no step was taken: a warm-up from ``lr = 0`` leaves ``x`` at ``x_0``."""
    new_max = torch.maximum(lr_max, step_size)
    w = new_max * new_max
    if r != 0.0:
        w = w * torch.pow(step + 1.0, r)
    new_sum = weight_sum + w
    c = torch.where(new_sum > 0, w / torch.where(new_sum > 0, new_sum, 1.0), 0.0)
    return new_max, new_sum, c


class ScheduleFreeModes:
    """``train()`` / ``eval()`` of a schedule-free optimizer whose parameters hold ``y`` in train
    mode and ``x`` in eval mode, with ``z`` in ``state[p]["z"]`` and ``beta1`` in
    ``group["betas"][0]``. The mode is a param-group key, so it is saved in the state dict."""

    param_groups: list[dict[str, Any]]
    state: Any

    def _interpolate(self, train: bool) -> None:
        with torch.no_grad():
            for group in self.param_groups:
                if group.get(TRAIN_MODE, True) == train:
                    continue
                beta1 = group["betas"][0]
                # x -> y: y = x + (1 - beta1) (z - x); y -> x: x = y + (1 - 1/beta1) (z - y)
                weight = 1.0 - beta1 if train else 1.0 - 1.0 / beta1
                for p in group["params"]:
                    z = self.state[p].get("z") if p in self.state else None
                    if z is not None:
                        local_view(p).lerp_(local_view(z).to(p.dtype), weight)
                group[TRAIN_MODE] = train

    def train(self, mode: bool = True) -> None:
        """Put ``y`` into the parameters (the point where gradients are taken); a no-op in train
        mode. ``train(False)`` is ``eval()``, as for modules."""
        self._interpolate(bool(mode))

    def eval(self) -> None:
        """Put the average ``x`` into the parameters, for evaluation and saving; a no-op in eval
        mode."""
        self._interpolate(False)

    @property
    def training(self) -> bool:
        """Whether the parameters hold ``y`` (every group is in train mode)."""
        return all(g.get(TRAIN_MODE, True) for g in self.param_groups)

    def _check_train_mode(self) -> None:
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step() called in eval mode: the parameters hold the "
                "averaged weights x, not the point y where gradients must be taken; call "
                "optimizer.train() before training steps and optimizer.eval() before evaluating "
                "or saving"
            )


class ProdigyScheduleFree(ScheduleFreeModes, Prodigy):
    r"""Schedule-free Prodigy (Defazio et al., NeurIPS 2024; Mishchenko & Defazio, ICML 2024).

    With ``gamma_k = d_k lr bc_k``, ``bc_k = sqrt(1 - beta2^(k+1))`` (1 with
    ``use_bias_correction=False``), the parameters holding ``y_k``::

        v_{k+1}   = beta2 v_k + (1 - beta2) g_k^2
        u_k       = g_k / (sqrt(v_{k+1}) + eps) + wd y_k                (decoupled decay at y)
        r_{k+1}   = beta3 r_k + (d_k / d0) gamma_k <g_k, x_0 - z_k>        (summed over groups)
        s_{k+1}   = beta3 s_k + (d_k / d0) gamma_k g_k
        d_{k+1}   = max(d_k, min(d_coef r_{k+1} / ||s_{k+1}||_1, growth_rate d_k))  (via d_max)
        z_{k+1}   = z_k - gamma_k u_k
        x_{k+1}   = (1 - c_{k+1}) x_k + c_{k+1} z_{k+1},   c from schedule_free_weight
        y_{k+1}   = (1 - beta1) z_{k+1} + beta1 x_{k+1}

    Use a constant ``lr`` (no decaying schedule: the average replaces it); a warm-up is not
    needed (``d`` starts small and the early iterates weigh ~nothing in ``x``) but does no harm.
    Call :meth:`eval` before evaluating or saving and :meth:`train` after.

    Args: as :class:`~hf_tuningfree.optim.prodigy.Prodigy`, except ``d_coef`` (default 0.5, where
    Prodigy's is 1: chosen on the task suite, 3 seeds each: worst task 1.053 -> 1.032 of the best
    AdamW, mean 1.018 -> 1.006; better from scratch, 0.006-0.016 worse on the fine-tuning and LoRA
    tasks; the README's suite section). ``betas[0]`` is the interpolation weight ``beta1`` of
    ``y`` between ``z`` and ``x`` (default 0.9, the authors'), and two options of the authors'
    ``schedulefree`` optimizers (model-wide):

    - ``warmup_steps`` (default 0: off): ``gamma_k`` times ``min(1, (k+1) / warmup_steps)`` (the
      weights of the numerator and of ``s`` too, as a scheduler's ``lr`` would scale them);
    - ``r`` (default 2): the averaging weight ``w_k = (k+1)^r (max_i gamma_i)^2`` (the paper's
      polynomial weighting, ``r`` in the authors' code, where 0 is the default): later iterates
      weigh more. On a from-scratch run whose ``d`` settles early the uniform average
      (``r = 0``) keeps the early iterates in ``x``; ``r = 2`` was measured better on every
      task of the suite (``gpt2-long`` 1.122 -> 1.053 of the best AdamW, 3 seeds; the README's
      suite section has the five). As every key a state dict lacks, one saved before ``r``
      existed loads with the constructor's ``r``: pass ``r=0.0`` to resume such a run as it
      was averaged.

    State: per parameter ``z``, ``exp_avg_sq`` (v), ``s``, ``x0`` (none for a tensor that was
    all zero at its first step: ``implicit_zero_x0``, as Prodigy); model-wide ``d``, ``d_max``,
    ``numerator``, ``s_l1``, ``step``, ``sf_lr_max`` and ``sf_weight_sum`` (the averaging).
    ``stats()`` adds ``sf_average_weight`` (the last ``c``).
    """

    FUSE = False  # no fused C kernel for this update yet: the torch passes run
    _MODEL_WIDE = (*Prodigy._MODEL_WIDE, "warmup_steps", "r")
    #: no C kernels (neither pass): the compiled kernels, foreach ops and the loop
    PATHS = ("compiled", "foreach", "loop")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        use_bias_correction: bool = True,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d0_rel: float = 1e-2,
        d_coef: float = 0.5,
        growth_rate: float = float("inf"),
        d_groups: str = "model",
        maximize: bool = False,
        implementation: str = "auto",
        *,
        implicit_zero_x0: bool = True,
        slice_p: int = 1,
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
        warmup_steps: int = 0,
        r: float = 2.0,
    ) -> None:
        # set before the base constructor adds the groups: add_param_group fills them in and
        # _validate_group checks them there
        self._sf_defaults = {"warmup_steps": warmup_steps, "r": r}
        if not 0.0 < betas[0] < 1.0:
            raise ValueError(
                f"Invalid betas[0]: {betas[0]!r}; allowed: 0 < beta1 < 1 (the schedule-free "
                "interpolation weight; eval() divides by it)"
            )
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            beta3=beta3,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            use_bias_correction=use_bias_correction,
            safeguard_warmup=safeguard_warmup,
            d0=d0,
            d0_rel=d0_rel,
            d_coef=d_coef,
            growth_rate=growth_rate,
            d_groups=d_groups,
            maximize=maximize,
            implementation=implementation,
            implicit_zero_x0=implicit_zero_x0,
            slice_p=slice_p,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )
        self.defaults.update(self._sf_defaults)  # a state dict without them loads with these

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group added in eval mode starts in eval mode: its parameters are x = y = z at first
        param_group.setdefault(TRAIN_MODE, self.training if self.param_groups else True)
        for key, value in self._sf_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_nonnegative_int("warmup_steps", group.get("warmup_steps", 0))
        check_nonnegative("r", group.get("r", 0.0))

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["s"] = self._stat_zeros(param)
        state["z"] = param.detach().clone(memory_format=torch.preserve_format)
        self._init_x0(param, state, group)

    def _bias_correction(self, step: torch.Tensor) -> torch.Tensor | float:
        """The factor of ``d lr`` in step ``k``: ``sqrt(1 - beta2^(k+1))``, the second moment's
        correction (there is no first moment), times the linear warm-up
        ``min(1, (k+1) / warmup_steps)`` with ``warmup_steps > 0`` (the authors' optimizer
        keyword; it scales the numerator's and ``s``'s weights as a scheduler's ``lr`` would)."""
        group = self.param_groups[0]
        factor: torch.Tensor | float = 1.0
        if group["use_bias_correction"]:
            factor = torch.sqrt(1.0 - torch.pow(group["betas"][1], step + 1.0))
        warmup = group.get("warmup_steps", 0)
        if warmup:
            factor = factor * torch.clamp((step + 1.0) / warmup, max=1.0)
        return factor

    def _reference_step(self, d: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The step that sets the averaging weight: ``d lr bc`` with the largest ``lr`` of the
        groups of the current estimate (all groups, unless ``d_groups="group"``)."""
        groups = getattr(self, "_scope_groups", None) or self.param_groups
        lr = max((g["lr"] for g in groups), default=0.0)
        return d * self._bias_correction(step) * lr

    def _averaging(
        self, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lr_max = self._global("sf_lr_max", d.device)
        weight_sum = self._global("sf_weight_sum", d.device)
        r = self.param_groups[0].get("r", 0.0)
        return schedule_free_weight(self._reference_step(d, step), lr_max, weight_sum, step, r)

    def _statistics_pass(
        self, gb: GroupBatch, d: torch.Tensor, step: torch.Tensor
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        dlr = self._dlr(group, d, step)
        coupled, _ = _weight_decay_scalars(group, dlr)
        scalars = [coupled, self._s_weight(group, d, dlr), _scalar(self._beta3() - 1.0, d)]
        return _PRODIGY_SF_STATISTICS, scalars, _flags(group)

    def _before_step(self) -> None:
        # not an override of step(): torch wraps each class's step() with the step hooks, so an
        # override calling super().step() would run every hook twice
        self._check_train_mode()

    def _fill_group(self, group: dict[str, Any]) -> None:
        super()._fill_group(group)
        group.setdefault(TRAIN_MODE, True)  # a state dict from before the key existed

    def _update_pass(
        self,
        gb: GroupBatch,
        d: torch.Tensor,
        step: torch.Tensor,
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
    ) -> tuple[TensorPass, list[torch.Tensor], dict[str, Any]]:
        group = gb.group
        beta1, beta2 = group["betas"]
        on = ok.to(d.dtype)  # every coefficient is 0 on a skipped step
        dlr = on * self._dlr(group, d, step)
        c = on * self._averaging(d, step)[2]
        coupled, decoupled = _weight_decay_scalars(group, on)
        scalars = [
            ok,
            dlr,
            dlr * (1.0 - beta1 * (1.0 - c)),
            c,
            on * self._s_weight(group, d, dlr),
            coupled,
            decoupled,
            on * (1.0 - beta2),
            on * (self._beta3() - 1.0),
            _scalar(group["eps"], d),
        ]
        return _PRODIGY_SF_UPDATE, scalars, _flags(group)

    def _finish(
        self, stats: dict[str, torch.Tensor], ok: torch.Tensor, d: torch.Tensor, step: torch.Tensor
    ) -> None:
        lr_max, weight_sum, c = self._averaging(d, step)  # with d_k, before d is updated
        self._store_unless_skipped(ok, sf_lr_max=lr_max, sf_weight_sum=weight_sum, sf_c=c)
        super()._finish(stats, ok, d, step)

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out["sf_average_weight"] = self._global_float("sf_c")
        return out
