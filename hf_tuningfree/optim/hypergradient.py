"""Hypergradient descent as ordinary torch optimizers, with stackable hyperoptimizer towers.

Chandra, Xie, Ragan-Kelley & Meijer, "Gradient Descent: The Ultimate Optimizer", NeurIPS 2022
(arXiv:1909.13371), building on Baydin, Cornish, Martinez Rubio, Schmidt & Wood, "Online Learning
Rate Adaptation with Hypergradient Descent", ICLR 2018.

The one-step hypergradient
--------------------------
A base optimizer moves the parameters by ``x_{t+1} = x_t - u_t(h)``, where ``h`` are its
hyperparameters (step size, momentum, betas, ...). When the next gradient ``g_{t+1} = dL/dx`` at
``x_{t+1}`` arrives, the derivative of the loss with respect to the hyperparameters used for the
last update is (Baydin et al., Section 2; Chandra et al., Section 2)::

    dL(x_{t+1}) / dh = <g_{t+1}, dx_{t+1}/dh> = -<g_{t+1}, du_t/dh>.

As in the paper's implementation, the optimizer state entering ``u_t`` (momentum buffer, moments)
is treated as a constant ("detached"): only the direct dependence of this one update on ``h``
counts. The authors obtain ``du_t/dh`` by backpropagating through the update, which needs
``backward(create_graph=True)`` and a wrapped model. Here it is written down per optimizer, and
the hypergradient is a handful of model-wide dot products formed when ``g_{t+1}`` arrives:

============  ==================  =====================================================  ========
optimizer     hyperparameter      ``du_t/dh`` (per element; ``s`` = schedule multiplier)  buffer
============  ==================  =====================================================  ========
SGD           step size ``a``     ``s * buf_t``                                          none [1]
SGD           momentum ``mu``     ``s * a * buf_{t-1}``                                  one
Adam          step size           ``s * (mhat_t / (sqrt(vhat_t) + eps) + wd * x_t)`` [2]   none [3]
Adam          beta1, beta2        ``s * a * d/dbeta [mhat/(sqrt(vhat)+eps)]`` (bias      one each
                                  corrections ``1 - beta^t`` differentiated too)
AdaGrad       step size           ``s * g_t / (sqrt(G_t) + eps)``                        one
RMSProp       step size, decay    ``s * g/(sqrt(v)+eps)``, ``s * a * d/drho [...]``      one each
============  ==================  =====================================================  ========

[1] the momentum buffer *is* the last update direction (``momentum=0`` keeps ``g`` in it).
[2] decoupled weight decay; ``x_t`` is recovered exactly from ``x_{t+1}`` and one more dot product.
[3] ``mhat_t / (sqrt(vhat_t) + eps)`` is recomputed from ``m_t``, ``v_t`` when ``g_{t+1}`` arrives.

The dot products are sums over every parameter of every param group (the Trainer's decay/no-decay
split does not change the algorithm) and, under FSDP2/FSDP1/ZeRO, over every shard: they travel in
the base class's single all-reduce. They read every gradient element, so they double as the
non-finite check (no separate pass over the gradients).

Towers
------
With ``height=H`` there are ``H`` hyperoptimizers stacked on the base optimizer. Level ``j``
(``j = 1..H``) is SGD or Adam and updates the learned variables of level ``j-1`` (level 0: the
base optimizer's learned hyperparameters; level ``j >= 1``: the step size of hyperoptimizer ``j``)
with its own step size ``kappa_j``; ``kappa_1 .. kappa_{H-1}`` are learned by the level above and
``kappa_H`` is fixed. ``height=1`` is Baydin et al.'s hypergradient descent. Every level is
updated top-down (the paper's order) from hypergradients formed by the chain rule through the
previous hyper-updates, again one step deep::

    dL/d theta_j = <dL/d theta_{j-1}, d theta_{j-1}/d theta_j>,
    d theta_{j-1}/d theta_j = -P'(theta_j) * D_j,     D_j = direction of the last level-j update

(``D_j = dL/dtheta_{j-1}`` for SGD, ``mhat/(sqrt(vhat)+eps)`` for Adam); these are scalars, so a
tower costs a few dozen 0-dim tensor operations per step whatever its height. A hyperoptimizer
starts when its hypergradient first exists (level ``j`` at step ``j+1``): before that there is no
earlier update to differentiate, and an Adam hyperoptimizer would otherwise count empty steps in
its bias correction.

Parametrisations (what the hyperoptimizers actually update)
-----------------------------------------------------------
* Momentum, betas, RMSProp decay: ``beta = (tanh(z) + 1) / 2`` as in the authors' code (a scaled
  sigmoid), with ``z`` kept in ``[-8, 8]`` so that even in fp32 ``beta`` stays in
  ``[1.1e-7, 1 - 1.1e-7]``: no tower can produce ``beta >= 1``.
* Step sizes (every level): ``lr_parametrization="log"`` (default) learns ``log(alpha)``: the
  step size stays positive and an Adam hyperoptimizer changes it by about a factor
  ``exp(+-kappa)`` per step whatever its scale, which is what makes one default serve initial step
  sizes four orders of magnitude apart (measured: see ``hyper_lr``). ``"square"`` learns
  ``sqrt(alpha)``, the authors' choice for RMSProp's step size; ``"identity"`` learns ``alpha``
  itself, as Baydin et al. and the authors' SGD/Adam/AdaGrad do, projected to ``alpha >= 0``
  (``height=1``, ``hyper_optimizer="sgd"``, ``"identity"`` is exactly
  ``alpha_t = alpha_{t-1} + kappa * <g_t, g_{t-1}>``).

Defaults (measured)
-------------------
Chosen on a 16-32-4 tanh MLP learning a random teacher's 4 classes (1024 points, minibatches of
64, 300 steps, 2 seeds), with initial step sizes spanning four orders of magnitude (SGD with
momentum 0.9: 1e-4..1e-1, Adam: 1e-5..1e-2); "spread" is max - min of the final full-batch loss
over the four starts, "mean" its average (plain SGD: spread 1.08, mean 0.81; plain Adam: 1.03,
0.92):

==========================================  ===============  ===============
tower (hyper_lr per level, hyper_betas)     SGD spread/mean  Adam spread/mean
==========================================  ===============  ===============
height 1 (0.05), (0.9, 0.999)               0.151 / 0.273    0.079 / 0.218
height 2 (0.05, 0.02), (0.9, 0.999)         0.085 / 0.229    0.051 / 0.173
height 3 (0.05, 0.02, 0.02), (0.9, 0.999)   0.116 / 0.234    0.062 / 0.190
height 2 (0.01, 0.01), (0.9, 0.999)         0.235 / 0.346    0.095 / 0.300
height 2 (0.02, 0.02), (0.9, 0.999)         0.128 / 0.265    0.042 / 0.218
height 1 (0.05), (0.9, 0.99)                0.168 / 0.285    0.103 / 0.228
**height 2 (0.05, 0.02), (0.9, 0.99)**      0.063 / 0.227    0.031 / 0.171
height 3 (0.05, 0.02, 0.02), (0.9, 0.99)    0.090 / 0.225    0.059 / 0.188
==========================================  ===============  ===============

* ``height=2``: the second level is what makes far-off starts recover (it grows ``kappa_1`` while
  the step size is consistently too small); a third level brought no further gain at this budget,
  and over 1500 steps it let ``kappa_1`` run up to ~0.5, which makes the step size noisy.
* ``hyper_lr``: 0.05 at level 1 (the step size can change ~5% per step), 0.02 above.
* ``hyper_betas=(0.9, 0.99)``: in log coordinates the hypergradient scales with the step size, so
  after a phase at a large step size an Adam hyperoptimizer with ``beta2=0.999`` remembers the
  large hypergradients for ~1000 steps and barely moves afterwards (traced: a 3-level tower
  overshot to 0.93, fell to 0.004, then recovered only 2x in 180 steps); 0.99 forgets in ~100.
* The initial step sizes (the registry's ``lr``) are the usual ones (SGD 1e-2, Adam 1e-3, AdaGrad
  1e-2, RMSProp 1e-3); the towers move them. On the task above they settled at 0.1-0.15 (SGD,
  whose best fixed step size there is about 0.1) and 0.02-0.03 (Adam, best fixed between 1e-2
  and 1e-1).
* Known limitation (measured, not tuned away): the one-step hypergradient is greedy. For AdaGrad
  and RMSProp, whose normalised directions anti-correlate from one step to the next as soon as the
  step is large, the towers settled 3-20x below the best fixed step size (final loss 0.44-0.55
  against 0.29 / 0.35 for RMSProp / AdaGrad at their best fixed step), while removing almost all
  sensitivity to the start (spread 0.05-0.09 against 1.03-1.09 for plain; 1 seed).

Performance (``benchmarks/step_time.py``)
-----------------------------------------
A step is two passes over memory. Pass 1 forms the dot products (and with them the non-finite
check every optimizer here makes before writing anything); after it, the tower moves the learned
values (a few dozen 0-dim torch operations: height 3 costs about as much as height 1); pass 2 is
the update. On CPU (``"auto"`` and ``"compiled"``, fp32/fp64 tensors) both passes are C loops of
:mod:`hf_tuningfree.optim._native`, one call per device/dtype bucket for all its tensors (the
``torch.compile``d or eager kernels made one call per tensor): pass 1 reads ``g`` and the stored
derivatives (SGD: the momentum buffer; AdaGrad, RMSProp: the last direction) or, for Adam, ``g,
m, v`` and the step counters, recomputing ``m / (sqrt(v) c + eps)``; it sums in fp64, per block
in a fixed order (the result does not depend on the thread count). Pass 2 follows the
per-element functions below (``_sgd_update``, ``_adam_update``, ``_adagrad_update``,
``_rmsprop_update``) operation by operation, reading the learned step size (and a learned momentum
or decay), Adam's step counters and ``ok`` from memory: SGD's update is bit-identical to the
per-tensor path, the others differ by the rounding of ``sqrt`` (C's is correctly rounded,
torch's CPU one not always) and ``pow``. HyperAdam with learned betas, 16-bit parameters, GPUs
and machines without a C compiler keep the torch paths: pass 1 ``torch.dot`` per tensor (SGD),
multi-tensor ops and a compiled kernel (Adam); pass 2 torch's fused multi-tensor kernels
(``torch._fused_sgd_``, ``torch._fused_adamw_``, the learned step size as a tensor and
``found_inf`` for the skip) where the configuration allows (fixed momentum / betas), else the
per-tensor kernels, compiled where it pays.

Measured on the 2-core CI machine (24.4M parameters in 147 tensors, median of 50 steps, one
thread, CPU time of the thread because the machine was shared with other jobs: ``--only
hyper_sgd,hyper_adam --impls auto --extra-contenders --p10 --cpu-time --threads 1``, one run; the
10th percentile in brackets):

=========================================  ===========  ============  ===============
optimizer                                  ms/step      x fused SGD   x fused AdamW
=========================================  ===========  ============  ===============
torch SGD momentum, fused                  10.3 (9.7)   1.00          0.71
torch SGD momentum, foreach (default)      16.1 (15.2)  1.57          1.12
hyper_sgd, height 0 (plain SGD)            14.0 (13.2)  1.36
hyper_sgd (default, height 2)              17.6 (16.8)  **1.71**
hyper_sgd, height 1 / height 3             17.2 / 17.8  1.68 / 1.73
hyper_sgd, learned momentum                24.7 (23.7)  2.41
torch AdamW, fused                         14.4 (14.0)                1.00
hyper_adam, height 0 (plain Adam)          18.3 (17.4)                1.27
hyper_adam (default, height 2)             24.7 (24.0)                **1.71**
hyper_adam, height 3                       24.7 (24.0)                1.71
hyper_adam, learned betas (torch paths)    62.9 (60.6)                4.37
=========================================  ===========  ============  ===============

Against the goals (``hyper_sgd`` <= 1.3x SGD with momentum, ``hyper_adam`` <= 1.8x fused
AdamW; README "Step time" has three 2-thread runs: 1.59-1.62x and 1.54-1.71x): Adam's is met,
SGD's is missed, for reasons in the structure. The skip-on-NaN rule needs a pass that
reads every gradient before anything is written, and the hypergradient needs ``g`` against the
last direction: for SGD the momentum buffer, two streams read before torch's fused SGD's three
read and two written; for Adam ``g, m, v``, three before fused AdamW's four read and three
written. Reading is what limits these loops (one core: ~33 GB/s read, in both passes; the
writes come nearly free; with the data in cache the C update runs faster than torch's fused
one, streamed it runs at its speed), so the two C passes alone measure ~1.5-1.6x the fused
kernels here. The rest, ~2-3 ms per step, is Python and the tower's 0-dim operations, ~2.5x
slower than on a small model because every pass over ~100 MB per stream evicts their code and
data from the caches. Keeping Adam's direction in a parameter-sized buffer instead (written by
the update, read by pass 1) would read two streams in pass 1 instead of three but write one
more in pass 2, for 4 bytes per parameter (measured ~4% on the earlier torch paths): not taken.

State and the schedule
----------------------
Every level's hyperparameter values (and the hyperoptimizers' moments and last directions) are
0-dim tensors in ``self.global_state`` under ``hyper/level{l}/{name}`` (``hyper/group{i}/...`` with
``per_group=True``); they are saved in ``state_dict()`` and a resume is bit-exact. ``step()`` reads
nothing back to the host. ``group["lr"]`` stays the schedule's multiplier: the step used is
``alpha * group["lr"] / lr_ref`` with ``lr_ref`` the constructor's ``lr`` (the learned ``alpha``
starts there), so a warm-up or decay schedule scales the learned step size. A step whose gradients
contain NaN/Inf anywhere changes nothing: not the parameters, not the hyperparameters, not the
stored derivatives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch.optim.optimizer import ParamsT

from . import _native
from .base import (
    StepBatch,
    TuningFreeOptimizer,
    bucket_by_device_and_dtype,
    compute_dtype,
    foreach_norms,
    real_dtype,
    scalar_state,
)
from .distributed import local_view
from .kernels import (
    FUSED_SGD_CPU_DTYPES,
    IMPL_ENV_VAR,
    IMPLEMENTATIONS,
    CompiledKernel,
    fast_path_accepts,
    order_for_compile,
    resolve_implementation,
)
from .validation import (
    check_bool,
    check_choice,
    check_in_range,
    check_nonnegative,
    check_positive,
    scalar_value,
)

__all__ = [
    "HYPER_OPTIMIZERS",
    "STEP_PARAMETRIZATIONS",
    "HyperAdaGrad",
    "HyperAdam",
    "HyperRMSProp",
    "HyperSGD",
    "HypergradientOptimizer",
]

#: Hyperoptimizers a tower level can use.
HYPER_OPTIMIZERS = ("adam", "sgd")
#: How step sizes (of every level) are parametrised; see the module docstring.
STEP_PARAMETRIZATIONS = ("log", "square", "identity")

#: Initial step sizes of the Adam hyperoptimizers when ``hyper_lr`` is not given: level 1, then
#: every level above (chosen by measurement; see the module docstring, "Defaults").
DEFAULT_HYPER_LR = (0.05, 0.02)

_Z_LIMIT = 8.0  # |z| bound of the squashed hyperparameters: (tanh(8) + 1) / 2 < 1 even in fp32
_LOG_LIMIT = 50.0  # |log alpha| bound: keeps exp() finite in fp32 (never reached in practice)
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FOREACH_DTYPES = (torch.float32, torch.float64)  # dots run in these as they are (no cast)
_SMALL_NUMEL = 1 << 16  # below this, Adam's dots of a tensor go through multi-tensor ops
_ADAM_STREAMS = ("param", "grad", "exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------- parametrisations
def _raw_from_value(kind: str, value: float) -> float:
    """The learned variable for a hyperparameter of ``value`` (host side, at initialisation)."""
    if kind == "squash":
        return max(-_Z_LIMIT, min(_Z_LIMIT, math.atanh(2.0 * value - 1.0)))
    if kind == "log":
        return math.log(value)
    if kind == "square":
        return math.sqrt(value)
    return value  # identity


def _value(kind: str, raw: torch.Tensor) -> torch.Tensor:
    if kind == "squash":
        return (torch.tanh(raw) + 1.0) * 0.5
    if kind == "log":
        return torch.exp(raw)
    if kind == "square":
        return raw * raw
    return raw


def _derivative(kind: str, raw: torch.Tensor) -> torch.Tensor:
    """d value / d raw."""
    if kind == "squash":
        t = torch.tanh(raw)
        return (1.0 - t * t) * 0.5
    if kind == "log":
        return torch.exp(raw)
    if kind == "square":
        return 2.0 * raw
    return torch.ones_like(raw)


def _project(kind: str, raw: torch.Tensor) -> torch.Tensor:
    if kind == "squash":
        return raw.clamp(-_Z_LIMIT, _Z_LIMIT)
    if kind == "log":
        return raw.clamp(-_LOG_LIMIT, _LOG_LIMIT)
    if kind == "identity":
        return raw.clamp(min=0.0)
    return raw


# ---------------------------------------------------------------------- per-tensor kernels
# Each base optimizer has two per-tensor functions, run eagerly ("loop") or compiled:
#   *_dots:   the dot products of the gradient with the derivatives of the last update, returned
#             as one 1-D tensor (one entry per learned quantity): ``_direction_dots`` where the
#             derivatives are stored (SGD, AdaGrad, RMSProp), ``_adam_dots`` recomputes them;
#   *_update: the update itself, which also stores what the next step's dots need.
# Every write of *_update is a no-op where ``ok`` is False (a skipped step changes nothing).
# Optional tensors (buffers of learned betas etc.) follow the fixed ones in the argument list;
# static flags say which are present.


def _direction_dots(g: torch.Tensor, *stored: torch.Tensor) -> torch.Tensor:
    """``<g, D>`` for each stored derivative ``D`` of the last update (SGD: ``buf`` for the step
    size, ``buf_prev`` for the momentum; AdaGrad, RMSProp: the direction, ``d_decay``)."""
    cdt = compute_dtype(g.dtype)
    g = g.to(cdt)
    return torch.stack([(g * t.to(cdt)).sum() for t in stored])


def _update_gradient(
    p: torch.Tensor, g: torch.Tensor, ok: torch.Tensor, weight_decay: float, maximize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, x)`` in the compute dtype as an update uses them: ``g`` negated for ``maximize``,
    0 where ``ok`` is False (a skipped step), plus the coupled L2 term ``weight_decay * x``."""
    cdt = compute_dtype(p.dtype)
    g = g.to(cdt)
    if maximize:
        g = -g
    g = torch.where(ok, g, 0.0)
    x = p.to(cdt)
    if weight_decay != 0.0:
        g = g + weight_decay * x
    return g, x


def _sgd_update(
    *args: torch.Tensor, weight_decay: float, maximize: bool, learn_momentum: bool
) -> None:
    """``buf = mu * buf + (g + wd * x)``; ``x -= lr * buf`` (torch's SGD, dampening 0). Learning
    the momentum, the buffer before this update is kept in ``buf_prev`` (d buf / d mu)."""
    if learn_momentum:
        p, g, buf, buf_prev, ok, lr, mu = args
    else:
        p, g, buf, ok, lr, mu = args
        buf_prev = None
    g, x = _update_gradient(p, g, ok, weight_decay, maximize)
    cdt = x.dtype
    b = buf.to(cdt)
    new_b = mu * b + g
    x = x - torch.where(ok, lr, 0.0) * new_b
    if buf_prev is not None:
        buf_prev.copy_(torch.where(ok, b, buf_prev.to(cdt)))
    buf.copy_(torch.where(ok, new_b, b))
    p.copy_(x)


def _bias_corrections(
    k: torch.Tensor, beta1: torch.Tensor, beta2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - beta^k`` for step counts ``k`` (1 where ``k == 0``: nothing was accumulated yet)."""
    started = k > 0
    bc1 = torch.where(started, 1.0 - torch.pow(beta1, k), 1.0)
    bc2 = torch.where(started, 1.0 - torch.pow(beta2, k), 1.0)
    return bc1, bc2


def _adam_scalars(
    steps: Sequence[torch.Tensor],
    beta1: torch.Tensor,
    beta2: torch.Tensor,
    dtype: torch.dtype,
    *,
    for_update: bool,
) -> list[tuple[torch.Tensor, ...]]:
    """Per tensor, the 0-dim scalars its Adam kernel needs, computed for the whole list at once.

    Kept out of the elementwise kernels: a compiled kernel would evaluate ``pow`` and friends
    of its 0-dim inputs once per element. ``for_update=False`` (the dots of the last update,
    step counts ``k`` as stored): ``1 / bc1``, ``1 / sqrt(bc2)``. ``for_update=True`` (the update
    that takes the count to ``k + 1``): ``bc1``, ``bc2``, ``(k+1) beta1^k``, ``(k+1) beta2^k``.
    """
    k = torch.stack(list(steps)).to(beta1.device, dtype)
    beta1, beta2 = beta1.to(dtype), beta2.to(dtype)
    if not for_update:
        bc1, bc2 = _bias_corrections(k, beta1, beta2)
        cols = (1.0 / bc1, torch.rsqrt(bc2))
    else:
        k1 = k + 1.0
        cols = (
            1.0 - torch.pow(beta1, k1),
            1.0 - torch.pow(beta2, k1),
            k1 * torch.pow(beta1, k),
            k1 * torch.pow(beta2, k),
        )
    return list(zip(*(c.unbind(0) for c in cols), strict=True))


def _adam_dots(
    *args: torch.Tensor,
    eps: float,
    learn_lr: bool,
    need_x: bool,
    learn_beta1: bool,
    learn_beta2: bool,
) -> torch.Tensor:
    """``<g, mhat/(sqrt(vhat)+eps)>`` with the moments and bias corrections of the last update
    (step size; ``inv_bc1 = 1 / bc1``, ``inv_sqrt_bc2 = 1 / sqrt(bc2)``), ``<g, x>`` (decoupled
    weight decay), ``<g, d_beta1>``, ``<g, d_beta2>``."""
    g, m, v = args[:3]
    tensors = args[3:-2]  # x (need_x), d_beta1, d_beta2, in that order
    inv_bc1, inv_sqrt_bc2 = args[-2:]
    cdt = compute_dtype(g.dtype)
    g = g.to(cdt)
    out = []
    if learn_lr:
        # mhat / (sqrt(vhat) + eps) = m / bc1 / (sqrt(v) / sqrt(bc2) + eps): one sqrt, one div
        d = m.to(cdt) / (torch.sqrt(v.to(cdt)) * inv_sqrt_bc2 + eps)
        out.append((g * d).sum() * inv_bc1)
    for t in tensors:
        out.append((g * t.to(cdt)).sum())
    return torch.stack(out)


def _adam_update(
    *args: torch.Tensor,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    learn_beta1: bool,
    learn_beta2: bool,
) -> None:
    """Adam / AdamW (torch's formulation: ``x -= lr * mhat / (sqrt(vhat) + eps)``), and the
    elementwise derivatives of that direction with respect to beta1 / beta2 when they are learned
    (old moments held constant, bias corrections differentiated). Scalars from ``_adam_scalars``;
    ``lr`` is 0 on a skipped step."""
    p, g, m, v = args[:4]
    extra = list(args[4:-8])
    ok, lr, beta1, beta2, bc1, bc2, kb1, kb2 = args[-8:]
    d_beta1 = extra.pop(0) if learn_beta1 else None
    d_beta2 = extra.pop(0) if learn_beta2 else None
    g, x = _update_gradient(p, g, ok, 0.0 if decoupled else weight_decay, maximize)
    cdt = x.dtype
    m_old = m.to(cdt)
    v_old = v.to(cdt)
    m_new = m_old + (1.0 - beta1) * (g - m_old)
    v_new = beta2 * v_old + (1.0 - beta2) * (g * g)
    sv = torch.sqrt(v_new / bc2)
    denom = sv + eps
    mhat = m_new / bc1
    if weight_decay != 0.0 and decoupled:
        x = x - (lr * weight_decay) * x
    x = x - lr * (mhat / denom)
    # d(m/bc)/dbeta = (dm/dbeta * bc + m * k beta^(k-1)) / bc^2, with dm/dbeta = m_old - g.
    # Over one denominator the first update's derivative is exactly 0 (as it is analytically):
    # a rounding residue there would be blown up to a full step by an Adam hyperoptimizer.
    if d_beta1 is not None:
        num = (m_old - g) * bc1 + m_new * kb1
        d_beta1.copy_(torch.where(ok, num / (bc1 * bc1) / denom, d_beta1.to(cdt)))
    if d_beta2 is not None:
        num = (v_old - g * g) * bc2 + v_new * kb2
        dv = num / (bc2 * bc2)
        dd = torch.where(sv > 0, -(mhat / (denom * denom)) * dv / (2.0 * sv), 0.0)
        d_beta2.copy_(torch.where(ok, dd, d_beta2.to(cdt)))
    m.copy_(torch.where(ok, m_new, m_old))
    v.copy_(torch.where(ok, v_new, v_old))
    p.copy_(x)


def _foreach_adam_lr_dots(
    bucket: list[list[torch.Tensor]], scalars: list[tuple[torch.Tensor, ...]], eps: float
) -> list[torch.Tensor]:
    """``_adam_dots`` (step size, and ``<g, x>`` when ``bucket`` holds the parameters too) for a
    device/dtype bucket of small tensors, with multi-tensor ops."""
    grads, ms, vs = bucket[:3]
    inv_bc1 = [sc[0] for sc in scalars]
    inv_sqrt_bc2 = [sc[1] for sc in scalars]
    denom = torch._foreach_sqrt(vs)
    torch._foreach_mul_(denom, inv_sqrt_bc2)
    torch._foreach_add_(denom, eps)
    gm = torch._foreach_mul(grads, ms)
    torch._foreach_div_(gm, denom)
    sums = [t.sum() * c for t, c in zip(gm, inv_bc1, strict=True)]
    if len(bucket) == 3:
        return [s.reshape(1) for s in sums]
    gx = torch._foreach_mul(grads, bucket[3])
    return [torch.stack([s, t.sum()]) for s, t in zip(sums, gx, strict=True)]


def _adagrad_update(
    *args: torch.Tensor, eps: float, weight_decay: float, maximize: bool, learn_lr: bool
) -> None:
    """``G += g^2``; ``x -= lr * g / (sqrt(G) + eps)`` (torch's Adagrad without lr decay); the
    direction is kept for the next step's hypergradient."""
    if learn_lr:
        p, g, acc, direction, ok, lr = args
    else:
        p, g, acc, ok, lr = args
        direction = None
    g, x = _update_gradient(p, g, ok, weight_decay, maximize)
    cdt = x.dtype
    a = acc.to(cdt)
    a_new = a + g * g
    d = g / (torch.sqrt(a_new) + eps)
    x = x - torch.where(ok, lr, 0.0) * d
    if direction is not None:
        direction.copy_(torch.where(ok, d, direction.to(cdt)))
    acc.copy_(torch.where(ok, a_new, a))
    p.copy_(x)


def _rmsprop_update(
    *args: torch.Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
    learn_lr: bool,
    learn_decay: bool,
) -> None:
    """``v = rho * v + (1 - rho) * g^2``; ``x -= lr * g / (sqrt(v) + eps)`` (torch's RMSprop);
    the direction and its derivative with respect to ``rho`` are kept when learned."""
    p, g, sq = args[:3]
    extra = list(args[3:-3])
    ok, lr, rho = args[-3:]
    direction = extra.pop(0) if learn_lr else None
    d_decay = extra.pop(0) if learn_decay else None
    g, x = _update_gradient(p, g, ok, weight_decay, maximize)
    cdt = x.dtype
    v_old = sq.to(cdt)
    v_new = rho * v_old + (1.0 - rho) * (g * g)
    sv = torch.sqrt(v_new)
    denom = sv + eps
    d = g / denom
    x = x - torch.where(ok, lr, 0.0) * d
    if direction is not None:
        direction.copy_(torch.where(ok, d, direction.to(cdt)))
    if d_decay is not None:
        dd = torch.where(sv > 0, -(g / (denom * denom)) * (v_old - g * g) / (2.0 * sv), 0.0)
        d_decay.copy_(torch.where(ok, dd, d_decay.to(cdt)))
    sq.copy_(torch.where(ok, v_new, v_old))
    p.copy_(x)


_KERNELS = {
    fn.__name__: CompiledKernel(fn, f"hypergradient {fn.__name__.strip('_')}")
    for fn in (
        _direction_dots,
        _sgd_update,
        _adam_dots,
        _adam_update,
        _adagrad_update,
        _rmsprop_update,
    )
}


def _run(fn: Any, impl: str, tensors: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """One tensor through ``fn``, eagerly or compiled."""
    if impl == "compiled":
        return _KERNELS[fn.__name__](tensors, *args, **kwargs)
    return fn(*tensors, *args, **kwargs)


def _tensor_order(impl: str, fn: Any, sizes: Sequence[int]) -> list[int]:
    if impl == "compiled":
        return order_for_compile(_KERNELS[fn.__name__], sizes)
    return list(range(len(sizes)))


def _fused_ok(
    group: dict[str, Any],
    bucket: list[list[torch.Tensor]],
    names: Sequence[str],
    cpu_dtypes: Sequence[torch.dtype] = _FUSED_DTYPES,
) -> bool:
    """Whether torch's fused multi-tensor kernel may run a bucket of ``group`` (the caller adds
    the optimizer's own condition: fixed momentum / betas): ``fast_path_accepts`` (contiguous
    tensors of their parameters' shapes: the kernel treats every tensor as contiguous memory),
    of ``cpu_dtypes`` on CPU."""
    device = bucket[0][0].device.type
    dtypes = cpu_dtypes if device == "cpu" else _FUSED_DTYPES
    return (
        group["implementation"] in ("auto", "foreach")
        and device in _FUSED_DEVICES
        and fast_path_accepts(bucket, names, dtypes=dtypes, cpu_only=False)
    )


def _fused_step_args(lr: torch.Tensor, ok: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """The step size and skip arguments of torch's fused kernels: ``lr`` as a tensor of the
    kernel's precision, ``found_inf`` set where the step is skipped."""
    return {
        "lr": lr.to(torch.float64 if dtype == torch.float64 else torch.float32),
        "grad_scale": None,
        "found_inf": (~ok).to(torch.float32),
    }


def _stored_dots(
    gb: Any, stored: list[list[torch.Tensor]], impl: str, *, torch_dot: bool = False
) -> list[torch.Tensor]:
    """Per tensor of ``gb``, ``_direction_dots`` of its gradient with its entries of ``stored``
    (lists of per-parameter derivatives of the last update). ``torch_dot``: a single stored
    derivative against an fp32/fp64 contiguous gradient goes through ``torch.dot`` instead."""
    out: list[torch.Tensor | None] = [None] * len(gb.params)
    for i in _tensor_order(impl, _direction_dots, [p.numel() for p in gb.params]):
        g = gb.grads[i]
        ts = [s[i] for s in stored]
        if (
            torch_dot
            and len(ts) == 1
            and g.dtype in _FOREACH_DTYPES
            and g.is_contiguous()
            and ts[0].is_contiguous()
        ):
            # torch.dot: one vectorised pass at memory bandwidth, no temporaries
            out[i] = torch.dot(g.view(-1), ts[0].view(-1)).reshape(1)
        else:
            out[i] = _run(_direction_dots, impl, [g, *ts])
    return out  # type: ignore[return-value]


def _update_each(
    fn: Any, impl: str, bucket: list[list[torch.Tensor]], *args: Any, **static: Any
) -> None:
    """``fn`` on every tensor of a device/dtype ``bucket`` (lists, the parameters first) with the
    same 0-dim tensors ``args`` and flags ``static``."""
    for i in _tensor_order(impl, fn, [p.numel() for p in bucket[0]]):
        _run(fn, impl, [t[i] for t in bucket], *args, **static)


def _wants_native(requested: str, device: torch.device, numel: int) -> bool:
    """Whether a group should try the C loops of :mod:`._native`: on CPU for ``"compiled"``, and
    for ``"auto"`` at every size (a one-off ~1 s build per machine, no compilation per process)
    unless ``HF_TUNINGFREE_IMPL`` overrides ``"auto"``; never for ``"loop"`` / ``"foreach"``."""
    if device.type != "cpu":
        return False
    if requested == "auto" and not os.environ.get(IMPL_ENV_VAR, "").strip():
        return True
    return resolve_implementation(requested, device, numel) == "compiled"


# ---------------------------------------------------------------------- shared machinery
def _one_per_level(values: Sequence[Any], height: int, what: str, given: Any, unit: str) -> list:
    """``values`` for levels 1..height: one value serves every level, else exactly ``height``."""
    values = list(values)
    if len(values) == 1:
        values = values * max(height, 1)
    if height > 0 and len(values) != height:
        raise ValueError(
            f"Invalid {what}: {given!r}; allowed: one {unit} for every level or exactly "
            f"height={height} {unit}s (level 1 first)"
        )
    return values


def _names(value: str | Sequence[str], what: str) -> tuple[str, ...]:
    """``"lr+beta1"``, ``"lr,beta1"``, ``"adam/sgd"`` or a sequence of names -> tuple."""
    if isinstance(value, str):
        for sep in (",", "/", " "):
            value = value.replace(sep, "+")
        parts = [v for v in value.split("+") if v]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise TypeError(f"{what} must be a string or a sequence of strings, got {value!r}")
    if not all(isinstance(v, str) for v in parts):
        raise TypeError(f"{what} must be a string or a sequence of strings, got {value!r}")
    return tuple(p.strip().lower() for p in parts)


class HypergradientOptimizer(TuningFreeOptimizer):
    """Base class of the hypergradient optimizers (see the module docstring for the algorithm).

    Subclasses declare ``LEARNABLE`` (their learnable hyperparameters, step size ``"lr"`` first),
    ``SQUASHED`` (those living in (0, 1)), and implement ``_init_param_state`` and
    ``_group_update``. Where the update stores ``du/dh`` per element, ``STORED_DERIVATIVES`` names
    the state key of each, and the default ``_dot_names`` / ``_group_dots`` dot the gradient with
    them; HyperAdam recomputes its step-size derivative from the moments and overrides both.
    """

    LEARNABLE: tuple[str, ...] = ("lr",)
    #: Names ``learn`` accepts for several learnable hyperparameters at once.
    LEARN_ALIASES: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    SQUASHED: frozenset[str] = frozenset()
    #: ``(learnable hyperparameter, per-parameter state key of its stored du/dh)``, in
    #: ``LEARNABLE`` order.
    STORED_DERIVATIVES: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        learn: str | Sequence[str],
        height: int,
        hyper_optimizer: str | Sequence[str],
        hyper_lr: float | Sequence[float] | None,
        hyper_betas: tuple[float, float],
        hyper_eps: float,
        lr_parametrization: str,
        per_group: bool,
        skip_nonfinite: bool,
        global_reduce: object,
        stochastic_rounding: bool = True,
    ) -> None:
        name = type(self).__name__
        if isinstance(height, bool) or not isinstance(height, int) or height < 0:
            raise ValueError(f"Invalid height: {height!r}; allowed: an integer >= 0")
        learned = tuple(m for n in _names(learn, "learn") for m in self.LEARN_ALIASES.get(n, (n,)))
        unknown = [n for n in learned if n not in self.LEARNABLE]
        if unknown:
            aliases = f" (or {list(self.LEARN_ALIASES)})" if self.LEARN_ALIASES else ""
            raise ValueError(
                f"Unknown hyperparameter(s) {unknown} in learn for {name}; learnable: "
                f"{list(self.LEARNABLE)}{aliases}"
            )
        if height > 0 and not learned:
            raise ValueError(f"{name}: learn is empty; name at least one of {list(self.LEARNABLE)}")
        self.learn = tuple(n for n in self.LEARNABLE if n in learned) if height > 0 else ()
        self.height = height if self.learn else 0
        kinds = _names(hyper_optimizer, "hyper_optimizer")
        for k in kinds:
            check_choice("hyper_optimizer", k, HYPER_OPTIMIZERS)
        kinds = _one_per_level(kinds, height, "hyper_optimizer", hyper_optimizer, "name")
        self.hyper_optimizers = tuple(kinds[: self.height])
        if hyper_lr is None:
            if "sgd" in self.hyper_optimizers:
                raise ValueError(
                    "hyper_lr is required with an SGD hyperoptimizer: its step size is in units "
                    "of the hypergradient, which depend on the problem (the default hyper_lr "
                    "is for the scale-free Adam hyperoptimizers)"
                )
            lrs = [DEFAULT_HYPER_LR[min(j, 1)] for j in range(max(height, 1))]
        elif isinstance(hyper_lr, (int, float, torch.Tensor)):
            lrs = [hyper_lr]
        else:
            lrs = list(hyper_lr)
        lrs = [check_positive(f"hyper_lr[{i}]", v) for i, v in enumerate(lrs)]
        lrs = _one_per_level(lrs, height, "hyper_lr", hyper_lr, "number")
        self.hyper_lr = tuple(lrs[: self.height])
        if not (isinstance(hyper_betas, Sequence) and len(hyper_betas) == 2):
            raise ValueError(f"Invalid hyper_betas: {hyper_betas!r}; allowed: two numbers")
        self.hyper_betas = tuple(
            check_in_range(f"hyper_betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(hyper_betas)
        )
        self.hyper_eps = check_nonnegative("hyper_eps", hyper_eps)
        self.lr_parametrization = str(
            check_choice("lr_parametrization", lr_parametrization, STEP_PARAMETRIZATIONS)
        )
        self.per_group = check_bool("per_group", per_group)
        for level, value in enumerate(self.hyper_lr[: self.height - 1], start=1):
            # the step sizes of levels 1..height-1 are learned like the base step size
            self._check_step_range(f"hyper_lr[{level - 1}]", value)
        self._check_initial_values(defaults)
        super().__init__(
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    #: What ``copy.deepcopy`` and pickling keep besides the base's: the tower's configuration.
    _PICKLED_ATTRIBUTES = (
        *TuningFreeOptimizer._PICKLED_ATTRIBUTES,
        "learn",
        "height",
        "hyper_optimizers",
        "hyper_lr",
        "hyper_betas",
        "hyper_eps",
        "lr_parametrization",
        "per_group",
    )
    #: One tower for the whole optimizer (``per_group=True`` gives each group its own values,
    #: not its own configuration): a param group naming one of these is an error.
    _CONSTRUCTOR_ONLY = (
        *TuningFreeOptimizer._CONSTRUCTOR_ONLY,
        "learn",
        "height",
        "hyper_optimizer",
        "hyper_lr",
        "hyper_betas",
        "hyper_eps",
        "lr_parametrization",
        "per_group",
    )

    def _reset_transient(self) -> None:
        super()._reset_transient()
        self._finite_term: torch.Tensor | None = None
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._step_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ configuration helpers
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # The learned step size starts at lr_ref; group["lr"] / lr_ref is the schedule multiplier.
        group.setdefault("lr_ref", group["lr"] if self.per_group else self.defaults["lr"])
        sharing = None if self.per_group else list(range(len(self.param_groups)))
        self._check_initial_values(group, sharing)

    def _fill_group(self, group: dict[str, Any]) -> None:
        super()._fill_group(group)
        group.setdefault("lr_ref", group["lr"] if self.per_group else self.defaults["lr"])
        group["lr_ref"] = scalar_value("lr_ref", group["lr_ref"])

    def _check_step_range(self, name: str, value: float) -> None:
        """A step size learned in log space must start inside the range its logarithm is kept
        in (``[-_LOG_LIMIT, _LOG_LIMIT]``); outside, the first step would silently move it to
        the bound (a factor up to 1e25 for a group sharing the value)."""
        if self.lr_parametrization == "log":
            low, high = math.exp(-_LOG_LIMIT), math.exp(_LOG_LIMIT)
            if not low <= value <= high:
                raise ValueError(
                    f"Invalid {name}: {value!r}; allowed with lr_parametrization='log': a number "
                    f"in [exp(-{_LOG_LIMIT:g}), exp({_LOG_LIMIT:g})] = [{low:.3g}, {high:.3g}] "
                    "(the learned log step size is kept in that range)"
                )

    def _check_initial_values(
        self, group: dict[str, Any], sharing: list[int] | None = None
    ) -> None:
        """The starting values of the learned hyperparameters in ``group`` (the constructor's
        defaults or a param group) are valid, and equal across the groups ``sharing`` them."""
        if "lr" in self.learn:
            self._check_step_range("lr", check_positive("lr", group["lr"]))
        for key in self.learn:
            if key != "lr":
                self._check_learnable_value(key, self._initial_value(group, key))
                if sharing is not None:
                    self._shared_initial_value(sharing, key)

    @staticmethod
    def _initial_value(group: dict[str, Any], key: str) -> float:
        if key.startswith("beta") and key[4:].isdigit():
            return float(group["betas"][int(key[4:]) - 1])
        return float(group[key])

    def _check_learnable_value(self, key: str, value: float) -> None:
        if key in self.SQUASHED:
            check_in_range(
                f"{key} (learned: squashed into (0, 1))",
                value,
                0.0,
                1.0,
                low_inclusive=False,
            )

    def _shared_initial_value(self, members: list[int], name: str) -> float:
        values = {self._initial_value(self.param_groups[gi], name) for gi in members}
        if len(values) > 1:
            raise ValueError(
                f"{type(self).__name__}: param groups sharing learned hyperparameters must start "
                f"from the same {name} (got {sorted(values)}); pass per_group=True to learn one "
                "set per group"
            )
        return values.pop()

    def _kind(self, level: int, name: str) -> str:
        if level == 0 and name in self.SQUASHED:
            return "squash"
        return self.lr_parametrization

    def _level_names(self, level: int) -> tuple[str, ...]:
        return self.learn if level == 0 else ("lr",)

    def _prefix(self, gi: int) -> str:
        """State-key prefix of the learned hyperparameters that param group ``gi`` uses."""
        return f"hyper/group{gi}/" if self.per_group else "hyper/"

    def _sets(self) -> list[tuple[str, list[int]]]:
        """(state-key prefix, param-group indices) of each set of shared hyperparameters."""
        if self.per_group:
            return [(self._prefix(i), [i]) for i in range(len(self.param_groups))]
        return [(self._prefix(0), list(range(len(self.param_groups))))]

    def _tower_keys(self, prefix: str) -> list[tuple[int, str, str]]:
        """``(level, name, state key)`` of every value in the tower of ``prefix``, level 0 up to
        the fixed top step size (level ``height``)."""
        return [
            (level, name, f"{prefix}level{level}/{name}")
            for level in range(self.height + 1)
            for name in self._level_names(level)
        ]

    @property
    def learning(self) -> bool:
        return self.height > 0

    # ------------------------------------------------------------------ hyper state
    def _hyper_dtype(self) -> torch.dtype:
        """fp64 if any parameter is fp64, else fp32: the same on every rank, whatever has a
        gradient there (ranks must stack their statistics in one dtype). Cached for the step."""
        cached = self._step_cache.get("dtype")
        if cached is not None:
            return cached
        dtype = torch.float32
        params = (p for g in self.param_groups for p in g["params"])
        if any(real_dtype(p.dtype) == torch.float64 for p in params):
            dtype = torch.float64
        self._step_cache["dtype"] = dtype
        return dtype

    def _g(self, key: str) -> torch.Tensor:
        return self.global_state[key]

    def _ensure_hyper_state(self, device: torch.device) -> None:
        """Create (first step) or move (after a load) the tower's 0-dim tensors."""
        dtype = self._hyper_dtype()

        def const(v: float) -> Any:
            return lambda d: torch.tensor(v, dtype=dtype, device=d)

        self.global_tensor("hyper/step", device, const(0.0))
        n_params = sum(len(g["params"]) for g in self.param_groups)
        last = self.global_tensor(
            "hyper/last_update", device, lambda d: torch.full((n_params,), -1.0, device=d)
        )
        if last.numel() < n_params:  # a param group was added
            pad = torch.full((n_params - last.numel(),), -1.0, device=device, dtype=last.dtype)
            self.global_state["hyper/last_update"] = torch.cat([last, pad])
        for gi in range(len(self.param_groups)):
            self.global_tensor(f"hyper/group{gi}/prev_scale", device, const(0.0))
        for prefix, members in self._sets():
            first = self.param_groups[members[0]]
            for level, name, key in self._tower_keys(prefix):
                if level == self.height:  # the fixed top step size
                    self.global_tensor(key, device, const(self.hyper_lr[level - 1]))
                    continue
                kind = self._kind(level, name)
                if key + "/raw" not in self.global_state:
                    if level > 0:
                        value = self.hyper_lr[level - 1]
                    elif name == "lr":
                        value = first["lr_ref"]
                    else:
                        value = self._shared_initial_value(members, name)
                    self.global_state[key + "/raw"] = torch.tensor(
                        _raw_from_value(kind, float(value)), dtype=dtype, device=device
                    )
                raw = self.global_tensor(key + "/raw", device, const(0.0))
                self.global_tensor(key, device, lambda d, r=raw, k=kind: _value(k, r.to(d)))
                for suffix in ("grad", "dir", "exp_avg", "exp_avg_sq"):
                    self.global_tensor(f"{key}/{suffix}", device, const(0.0))

    # ------------------------------------------------------------------ subclass hooks
    def _stored_derivatives(self) -> list[str]:
        """State keys of the stored derivatives of the learned hyperparameters."""
        return [key for name, key in self.STORED_DERIVATIVES if name in self.learn]

    def _dot_names(self, group: dict[str, Any]) -> list[str]:
        """Names of the per-group dot products, in the order ``_group_dots`` returns them."""
        return [name for name, _ in self.STORED_DERIVATIVES if name in self.learn]

    def _group_dots(
        self, gb: Any, values: dict[str, torch.Tensor], impl: str
    ) -> list[torch.Tensor]:
        """Per tensor of ``gb``, a 1-D tensor of the dot products named by ``_dot_names``."""
        return _stored_dots(gb, [gb.state_list(k) for k in self._stored_derivatives()], impl)

    def _group_update(
        self,
        gb: Any,
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
        impl: str,
    ) -> None:
        """The base optimizer's update of ``gb`` with hyperparameter ``values`` (0-dim tensors)
        and effective step size ``lr``."""
        raise NotImplementedError

    def _lr_dot(
        self, group: dict[str, Any], dots: dict[str, torch.Tensor], prev_lr: torch.Tensor
    ) -> torch.Tensor:
        """``<g, du/d(effective step size)>`` from the group's dots (``prev_lr``: the effective
        step size of the last update)."""
        return dots["lr"]

    # ------------------------------------------------------------------ the C path
    # On CPU (``"auto"``, ``"compiled"``; fp32/fp64 contiguous tensors; a C compiler) both passes
    # of a group are C loops of :mod:`._native`, one call per device/dtype bucket: the dots
    # (``_native_bucket_dots``) and the update (``_native_update``). Subclasses say which state
    # they need (``_native_state_keys``; ``NATIVE_COUNTER``: a per-parameter fp32 step counter the
    # C code reads and advances) and whether a configuration is covered (``_native_covers``).
    NATIVE_COUNTER: str | None = None

    def _native_covers(self, group: dict[str, Any]) -> bool:
        """Whether the C loops implement this configuration (default: yes)."""
        return True

    def _native_state_keys(self, group: dict[str, Any]) -> list[str]:
        """Per-parameter state tensors the C loops read or write, in their argument order."""
        raise NotImplementedError

    def _native_ok(self, gb: Any) -> bool:
        """Whether group batch ``gb`` runs on the C loops this step."""
        return self._native_plan(gb) is not None

    def _native_plan(self, gb: Any) -> list[tuple[list[_native.Addresses], list[int]]] | None:
        """The C path's view of ``gb`` for this step, formed once (both passes share it): per
        device/dtype bucket, the addresses of ``[params, grads, *state lists, counters]`` and the
        bucket's indices in ``gb``; None when the group takes the torch paths."""
        cache = self._step_cache.setdefault("native", {})
        key = id(gb)
        if key not in cache:
            cache[key] = self._native_check(gb)
        return cache[key]

    def _native_check(self, gb: Any) -> list[tuple[list[_native.Addresses], list[int]]] | None:
        group = gb.group
        if not gb.params or not self._native_covers(group):
            return None
        if not _wants_native(group["implementation"], gb.params[0].device, gb.numel):
            return None
        lists = [gb.params, gb.grads, *(gb.state_list(k) for k in self._native_state_keys(group))]
        whole = self._native_addresses(gb, lists, list(range(len(gb.params))))
        if whole is not None:
            return [whole]  # the usual case: one bucket
        if len({(p.device, p.dtype) for p in gb.params}) == 1:
            return None
        plan = []
        for bucket, idx in bucket_by_device_and_dtype(lists).values():
            part = self._native_addresses(gb, bucket, idx)
            if part is None:
                return None
            plan.append(part)
        return plan

    def _native_addresses(
        self, gb: Any, lists: list[list[torch.Tensor]], idx: list[int]
    ) -> tuple[list[_native.Addresses], list[int]] | None:
        counters = []
        if self.NATIVE_COUNTER is not None:
            counters.append([gb.states[i][self.NATIVE_COUNTER] for i in idx])
        names = ["param", "grad", *self._native_state_keys(gb.group)]
        addrs = _native.hyper_addresses(lists, counters, names)
        return None if addrs is None else (addrs, idx)

    def _native_dots(self, gb: Any, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dots of ``_group_dots`` for every tensor of ``gb`` as one ``(n, len(names))``
        fp64 CPU tensor, from one C pass per bucket over the gradients."""
        plan = self._native_plan(gb)
        assert plan is not None
        out = torch.empty(len(gb.params), len(self._dot_names(gb.group)), dtype=torch.float64)
        if len(plan) == 1:
            self._native_bucket_dots(gb, plan[0][0], out)
            return out
        for addrs, idx in plan:
            part = torch.empty(len(idx), out.shape[1], dtype=torch.float64)
            self._native_bucket_dots(gb, addrs, part)
            out[torch.tensor(idx)] = part
        return out

    def _native_bucket_dots(
        self, gb: Any, addrs: list[_native.Addresses], out: torch.Tensor
    ) -> None:
        """Default: ``<g, D>`` with the stored derivatives (state keys of
        ``_stored_derivatives``, after the parameters and gradients in ``addrs``)."""
        keys = self._native_state_keys(gb.group)
        stored = [addrs[2 + keys.index(k)] for k in self._stored_derivatives()]
        _native.hyper_direction_dots(addrs[1], stored, out)

    def _native_update(
        self,
        gb: Any,
        addrs: list[_native.Addresses],
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        """The base update of one bucket of ``gb`` (``addrs``: ``[params, grads, *state lists,
        counters]``) by the C loop; it writes nothing unless ``ok``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ values of this step
    def _values(self, gi: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Hyperparameter values for group ``gi``: learned ones from the global state, fixed ones
        from the param group (as 0-dim tensors)."""
        group = self.param_groups[gi]
        prefix = self._prefix(gi)
        dtype = self._hyper_dtype()
        out: dict[str, torch.Tensor] = {}
        for name in self.LEARNABLE:
            if name in self.learn:
                out[name] = self._g(f"{prefix}level0/{name}")
            elif name != "lr":
                out[name] = torch.tensor(
                    self._initial_value(group, name), dtype=dtype, device=device
                )
        return out

    def _scale(self, group: dict[str, Any]) -> float:
        """The schedule multiplier of the learned step size (or the fixed step size itself)."""
        if "lr" in self.learn:
            return group["lr"] / group["lr_ref"]
        return group["lr"]

    # ------------------------------------------------------------------ the step
    def _batch_indices(self, batch: StepBatch) -> torch.Tensor:
        """Global indices (over all param groups) of the tensors in ``batch``, in batch order."""
        index = {}
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                index[id(p)] = i
                i += 1
        key = tuple(index[id(p)] for gb in batch.groups for p in gb.originals)
        cached = self._index_cache.get(key)
        if cached is None or cached.device != batch.device:
            cached = torch.tensor(key, dtype=torch.long, device=batch.device)
            if len(self._index_cache) > 16:
                self._index_cache.clear()
            self._index_cache[key] = cached
        return cached

    def _local_statistics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        self._finite_term = None
        self._step_cache = {}
        if not self.learning:
            return {}
        device = batch.device
        self._ensure_hyper_state(device)
        dtype = self._hyper_dtype()
        idx = self._batch_indices(batch)
        last = self._g("hyper/last_update")
        # A tensor contributes only if the last successful step updated it (else d u / d h = 0).
        valid = (last[idx] == self._g("hyper/step").to(last.dtype)).to(dtype)
        self._step_cache["idx"] = idx
        out: dict[str, torch.Tensor] = {}
        pos = 0
        finite = []
        for gi, gb in enumerate(batch.groups):
            names = self._dot_names(gb.group)
            n = len(gb.params)
            if n:
                values = self._values(gi, device)
                if self._native_ok(gb):
                    dots = self._native_dots(gb, values)  # fp64: summed in fp64, then cast
                else:
                    impl = self._impl(gb, device, update=False)
                    dots = torch.stack(self._group_dots(gb, values, impl)).to(device, dtype)
                summed = (dots * valid[pos : pos + n].unsqueeze(1)).sum(0).to(dtype)
                if gb.group["maximize"]:  # the loss is -objective
                    summed = -summed
                finite.append(summed.sum())
            else:
                summed = torch.zeros(len(names), dtype=dtype, device=device)
            pos += n
            for name, value in zip(names, summed.unbind(0), strict=True):
                out[f"dot/{gi}/{name}"] = value
        self._finite_term = (
            torch.stack(finite).sum() if finite else torch.zeros((), dtype=dtype, device=device)
        )
        return out

    def _finiteness_statistic(self, batch: StepBatch) -> torch.Tensor:
        # NaN/Inf in any gradient element makes some dot product NaN/Inf (0 * inf is NaN too).
        if self._finite_term is not None:
            return self._finite_term
        # Nothing learned (height 0): the guard's own pass, one C loop per bucket where the
        # group runs on the C path (``_native.sum_sq``), else the gradient norms.
        parts: list[torch.Tensor] = []
        for gb in batch.groups:
            if not gb.params:
                continue
            plan = self._native_plan(gb)
            if plan is not None:
                for addrs, _ in plan:
                    total = torch.empty((), dtype=torch.float64)
                    _native.sum_sq(addrs[1].tensors, total)
                    parts.append(total)
            else:
                parts.extend(foreach_norms(gb.grads))
        return batch.sum_on_device(parts)

    def _impl(self, gb: Any, device: torch.device, *, update: bool) -> str:
        requested = gb.group["implementation"]
        impl = resolve_implementation(requested, device, gb.numel)
        return "loop" if impl == "foreach" else impl

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        device = batch.device
        dtype = self._hyper_dtype()
        if self.learning:
            for prefix, members in self._sets():
                self._hyper_step(prefix, members, stats, ok, device)
        for gi, gb in enumerate(batch.groups):
            group = gb.group
            scale = self._scale(group)
            if isinstance(scale, torch.Tensor):  # a tensor assigned to group["lr"]
                scale = scale.to(device, dtype)
            values = self._values(gi, device)
            if self.learning:
                alpha = values.get("lr")
                lr = alpha * scale if alpha is not None else torch.as_tensor(scale, dtype=dtype)
                key = f"hyper/group{gi}/prev_scale"
                self.global_state[key] = torch.where(
                    ok, torch.as_tensor(scale, dtype=dtype, device=device), self._g(key)
                )
            else:
                lr = torch.as_tensor(group["lr"], dtype=dtype, device=device)
            if not gb.params:
                continue
            plan = self._native_plan(gb)
            if plan is not None:
                for addrs, _ in plan:
                    self._native_update(gb, addrs, values, lr.to(device), ok)
            else:
                impl = self._impl(gb, device, update=True)
                self._group_update(gb, values, lr.to(device), ok, impl)
        if self.learning:
            idx = self._step_cache["idx"]
            step = self._g("hyper/step")
            last = self._g("hyper/last_update")
            new_last = torch.where(ok, (step + 1.0).to(last.dtype), last[idx])
            self.global_state["hyper/last_update"] = last.index_put((idx,), new_last)
            self.global_state["hyper/step"] = step + ok.to(step.dtype)
        self._step_cache = {}

    def _hyper_step(
        self,
        prefix: str,
        members: list[int],
        stats: dict[str, torch.Tensor],
        ok: torch.Tensor,
        device: torch.device,
    ) -> None:
        """Hypergradients of every level from the dots, then the top-down hyper-updates."""
        gs = self.global_state
        H = self.height
        count = gs["hyper/step"]
        # ---- level 0: h_k = dL/d raw_k = -sum_groups <g, d u / d raw_k>
        names0 = self.learn
        raw_lr = gs[f"{prefix}level0/lr/raw"] if "lr" in names0 else None
        alpha = gs[f"{prefix}level0/lr"] if "lr" in names0 else None
        terms: dict[str, list[torch.Tensor]] = {n: [] for n in names0}
        for gi in members:
            group = self.param_groups[gi]
            names = self._dot_names(group)
            dots = {n: stats[f"dot/{gi}/{n}"] for n in names}
            prev_scale = gs[f"hyper/group{gi}/prev_scale"]
            prev_lr = prev_scale * alpha if alpha is not None else prev_scale
            for name in names0:
                if name == "lr":
                    d = self._lr_dot(group, dots, prev_lr)
                    terms[name].append(prev_scale * _derivative(self._kind(0, name), raw_lr) * d)
                else:
                    raw = gs[f"{prefix}level0/{name}/raw"]
                    terms[name].append(prev_lr * _derivative("squash", raw) * dots[name])
        h = [-torch.stack([torch.stack(terms[n]).sum() for n in names0])]
        # ---- levels 1..H-1: chain rule through the last hyper-update, d theta_{j-1}/d theta_j
        for j in range(1, H):
            below = self._level_names(j - 1)
            direction = torch.stack([gs[f"{prefix}level{j - 1}/{n}/dir"] for n in below])
            raw_j = gs[f"{prefix}level{j}/lr/raw"]
            pj = _derivative(self.lr_parametrization, raw_j)
            h.append((-(pj * (h[j - 1] * direction).sum())).reshape(1))
        for j in range(H):
            for n, v in zip(self._level_names(j), h[j].unbind(0), strict=True):
                key = f"{prefix}level{j}/{n}/grad"
                gs[key] = torch.where(ok, v, gs[key])
        # ---- top-down: hyperoptimizer j updates level j-1 with step size kappa_j
        b1, b2 = self.hyper_betas
        for j in range(H, 0, -1):
            below = self._level_names(j - 1)
            keys = [f"{prefix}level{j - 1}/{n}" for n in below]
            kappa = gs[f"{prefix}level{j}/lr"]
            active = torch.logical_and(ok, count >= j)
            grad = h[j - 1]
            if self.hyper_optimizers[j - 1] == "adam":
                m = torch.stack([gs[k + "/exp_avg"] for k in keys])
                v = torch.stack([gs[k + "/exp_avg_sq"] for k in keys])
                t = count - (j - 1)  # this hyperoptimizer's step number if it steps now
                m_new = b1 * m + (1.0 - b1) * grad
                v_new = b2 * v + (1.0 - b2) * grad * grad
                bc1 = 1.0 - torch.pow(torch.as_tensor(b1, dtype=t.dtype, device=device), t)
                bc2 = 1.0 - torch.pow(torch.as_tensor(b2, dtype=t.dtype, device=device), t)
                direction = (m_new / bc1) / (torch.sqrt(v_new / bc2) + self.hyper_eps)
                direction = torch.where(active, direction, 0.0)
                for i, k in enumerate(keys):
                    gs[k + "/exp_avg"] = torch.where(active, m_new[i], m[i])
                    gs[k + "/exp_avg_sq"] = torch.where(active, v_new[i], v[i])
            else:
                direction = torch.where(active, grad, 0.0)
            for i, (k, n) in enumerate(zip(keys, below, strict=True)):
                kind = self._kind(j - 1, n)
                raw = gs[k + "/raw"]
                new_raw = torch.where(active, _project(kind, raw - kappa * direction[i]), raw)
                gs[k + "/raw"] = new_raw
                gs[k] = torch.where(ok, _value(kind, new_raw), gs[k])
                # direction of the last successful update (0 if this level did not step)
                gs[k + "/dir"] = torch.where(ok, direction[i], gs[k + "/dir"])

    # ------------------------------------------------------------------ logging
    def stats(self) -> dict[str, float]:
        """``hyper/level{l}/{name}``: every level's current value (level 0: the base optimizer's
        learned hyperparameters; level ``l >= 1``: the step size of hyperoptimizer ``l``, the top
        one fixed); ``hyper/group{i}/...`` with ``per_group=True``. Reads device memory."""
        out = super().stats()
        if not self.learning:
            return out
        for prefix, _ in self._sets():
            for _, _, key in self._tower_keys(prefix):
                if key in self.global_state:
                    out[key] = float(self.global_state[key])
        return out

    def hypergradients(self) -> dict[str, float]:
        """The hypergradients used by the last successful step, ``dL/d(learned variable)`` in
        the parametrised coordinates (e.g. ``d L / d log(alpha)``). For tests and debugging."""
        return {
            k[: -len("/grad")]: float(v)
            for k, v in self.global_state.items()
            if k.endswith("/grad")
        }


# ---------------------------------------------------------------------- SGD
class HyperSGD(HypergradientOptimizer):
    r"""SGD (with momentum) whose step size, and optionally momentum, are learned online by
    hypergradient descent, with a tower of ``height`` hyperoptimizers on top.

    Base update (torch's SGD, dampening 0, coupled weight decay)::

        buf = momentum * buf + (g + weight_decay * x);     x -= alpha * s * buf

    with ``s = group["lr"] / lr`` the schedule multiplier (1 without a schedule).

    Args:
        params: parameters or param groups.
        lr: initial step size ``alpha`` (the registry's recommended value; see its entry for how
            it was chosen). With ``"lr"`` learned, a schedule on ``group["lr"]`` multiplies it.
        momentum: momentum coefficient (default 0.9); learned if ``"momentum"`` is in ``learn``
            (then it must be in (0, 1)).
        weight_decay: L2 penalty added to the gradient (torch's SGD).
        maximize: maximize the objective.
        learn: the hyperparameters learned: ``"lr"`` (default), ``"momentum"``, or both
            (``"lr+momentum"`` or a sequence).
        height: number of hyperoptimizer levels (default 2): 1 learns the hyperparameters with a
            fixed hyper step size ``hyper_lr[0]``; each extra level learns the step size of the
            level below. 0 is plain SGD.
        hyper_optimizer: ``"adam"`` (default) or ``"sgd"`` for every level, or one per level
            (``"adam/sgd"``, level 1 first).
        hyper_lr: initial step size of each hyperoptimizer level (one number for all levels, or
            one per level, level 1 first); the top level's stays fixed. Default: 0.05 for level
            1 and 0.02 above (``DEFAULT_HYPER_LR``, measured). With the ``"log"``
            parametrisation and Adam hyperoptimizers it is about the largest per-step change of
            ``log(alpha)``: scale-free. SGD hyperoptimizers work in units of their hypergradient
            and need an explicit value.
        hyper_betas, hyper_eps: betas (default ``(0.9, 0.99)``, measured) and eps of the Adam
            hyperoptimizers.
        lr_parametrization: ``"log"`` (default), ``"square"`` or ``"identity"``; see the module
            docstring.
        per_group: learn one set of hyperparameters per param group (default: one set for the
            whole model, whatever the groups).
        implementation: ``"auto"``, ``"foreach"``, ``"loop"`` or ``"compiled"``. On CPU,
            ``"auto"`` and ``"compiled"`` run both passes of the step as C loops over all tensors
            (:mod:`hf_tuningfree.optim._native`, built once per machine with the system C
            compiler; fp32/fp64). ``"foreach"`` (and ``"auto"`` elsewhere) use torch's fused
            multi-tensor SGD kernel for the update when the momentum is fixed and non-zero;
            otherwise as in :mod:`hf_tuningfree.optim.kernels`.
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    Per-parameter state: ``momentum_buffer`` (with ``momentum=0`` it holds the last gradient,
    the last update direction), plus ``momentum_buffer_prev`` when the momentum is learned.
    """

    LEARNABLE = ("lr", "momentum")
    SQUASHED = frozenset({"momentum"})
    STORED_DERIVATIVES = (("lr", "momentum_buffer"), ("momentum", "momentum_buffer_prev"))

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        learn: str | tuple[str, ...] = "lr",
        height: int = 2,
        hyper_optimizer: str | tuple[str, ...] = "adam",
        hyper_lr: float | tuple[float, ...] | None = None,
        hyper_betas: tuple[float, float] = (0.9, 0.99),
        hyper_eps: float = 1e-16,
        lr_parametrization: str = "log",
        per_group: bool = False,
        implementation: str = "auto",
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": check_nonnegative("lr", lr),
            "momentum": check_in_range("momentum", momentum, 0.0, 1.0),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
            "maximize": check_bool("maximize", maximize),
            "implementation": check_choice("implementation", implementation, IMPLEMENTATIONS),
        }
        super().__init__(
            params,
            defaults,
            learn=learn,
            height=height,
            hyper_optimizer=hyper_optimizer,
            hyper_lr=hyper_lr,
            hyper_betas=hyper_betas,
            hyper_eps=hyper_eps,
            lr_parametrization=lr_parametrization,
            per_group=per_group,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if "momentum" in self.learn:
            state["momentum_buffer_prev"] = torch.zeros_like(
                param, memory_format=torch.preserve_format
            )

    def _buffers(self, gb: Any) -> list[list[torch.Tensor]]:
        lists = [gb.state_list("momentum_buffer")]
        if "momentum" in self.learn:
            lists.append(gb.state_list("momentum_buffer_prev"))
        return lists

    def _group_dots(self, gb: Any, values: dict[str, torch.Tensor], impl: str) -> list:
        stored = [gb.state_list(k) for k in self._stored_derivatives()]
        fast = gb.group["implementation"] in ("auto", "foreach")
        return _stored_dots(gb, stored, impl, torch_dot=fast)

    def _native_state_keys(self, group: dict[str, Any]) -> list[str]:
        keys = ["momentum_buffer"]
        if "momentum" in self.learn:
            keys.append("momentum_buffer_prev")
        return keys

    def _native_update(
        self,
        gb: Any,
        addrs: list[_native.Addresses],
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        _native.hyper_sgd_update(
            addrs[0],
            addrs[1],
            addrs[2],
            addrs[3] if "momentum" in self.learn else None,
            ok,
            lr=lr,
            momentum=values["momentum"],
            weight_decay=gb.group["weight_decay"],
            maximize=gb.group["maximize"],
        )

    def _group_update(
        self,
        gb: Any,
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
        impl: str,
    ) -> None:
        group = gb.group
        learn_momentum = "momentum" in self.learn
        static = {
            "weight_decay": group["weight_decay"],
            "maximize": group["maximize"],
            "learn_momentum": learn_momentum,
        }
        lists = [gb.params, gb.grads, *self._buffers(gb)]
        for (device, dtype), (bucket, _) in bucket_by_device_and_dtype(lists).items():
            ok_d = ok.to(device)
            lr_d = lr.to(device)
            if (
                not learn_momentum
                and group["momentum"] > 0.0
                and _fused_ok(
                    group, bucket, ("param", "grad", "momentum_buffer"), FUSED_SGD_CPU_DTYPES
                )
            ):
                torch._fused_sgd_(
                    bucket[0],
                    bucket[1],
                    bucket[2],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    dampening=0.0,
                    nesterov=False,
                    maximize=group["maximize"],
                    is_first_step=False,
                    **_fused_step_args(lr_d, ok_d, dtype),
                )
                continue
            mu = values["momentum"].to(device)
            _update_each(_sgd_update, impl, bucket, ok_d, lr_d, mu, **static)


# ---------------------------------------------------------------------- Adam
class HyperAdam(HypergradientOptimizer):
    r"""Adam / AdamW whose step size, and optionally betas, are learned online by hypergradient
    descent, with a tower of ``height`` hyperoptimizers on top.

    Base update (torch's Adam; ``decoupled_weight_decay=True`` is AdamW)::

        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        x -= alpha * s * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    Args:
        params: parameters or param groups.
        lr: initial step size ``alpha``; a schedule on ``group["lr"]`` multiplies the learned one.
        betas: ``(beta1, beta2)``; learned ones (``"beta1"``/``"beta2"`` in ``learn``) must be in
            (0, 1) and move through ``(tanh(z) + 1) / 2``.
        eps: added to ``sqrt(vhat)``.
        weight_decay: weight decay; decoupled (AdamW, default) or added to the gradient.
        decoupled_weight_decay: see ``weight_decay``.
        maximize: maximize the objective.
        learn: any of ``"lr"`` (default), ``"beta1"``, ``"beta2"``.
        height, hyper_optimizer, hyper_lr, hyper_betas, hyper_eps, lr_parametrization, per_group:
            as in :class:`HyperSGD`.
        implementation: as in :class:`HyperSGD`: the C loops on CPU (fixed betas; learned ones
            keep the torch paths), else ``"foreach"``/``"auto"`` run the update through torch's
            fused Adam(W) kernel when the betas are fixed.
        skip_nonfinite, global_reduce, stochastic_rounding: see
            :class:`~hf_tuningfree.optim.base.TuningFreeOptimizer`.

    Per-parameter state: ``step``, ``exp_avg``, ``exp_avg_sq``, plus ``d_beta1``/``d_beta2``
    (the derivative of the last update direction) for each learned beta. Learning only the step
    size costs no memory beyond Adam's: the last direction is recomputed from the moments.
    """

    LEARNABLE = ("lr", "beta1", "beta2")
    LEARN_ALIASES: ClassVar[Mapping[str, tuple[str, ...]]] = {"betas": ("beta1", "beta2")}
    SQUASHED = frozenset({"beta1", "beta2"})

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        maximize: bool = False,
        *,
        learn: str | tuple[str, ...] = "lr",
        height: int = 2,
        hyper_optimizer: str | tuple[str, ...] = "adam",
        hyper_lr: float | tuple[float, ...] | None = None,
        hyper_betas: tuple[float, float] = (0.9, 0.99),
        hyper_eps: float = 1e-16,
        lr_parametrization: str = "log",
        per_group: bool = False,
        implementation: str = "auto",
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        if not (isinstance(betas, Sequence) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r}; allowed: a sequence of 2 numbers")
        defaults = {
            "lr": check_nonnegative("lr", lr),
            "betas": tuple(check_in_range(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas)),
            "eps": check_positive("eps", eps),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
            "decoupled_weight_decay": check_bool("decoupled_weight_decay", decoupled_weight_decay),
            "maximize": check_bool("maximize", maximize),
            "implementation": check_choice("implementation", implementation, IMPLEMENTATIONS),
        }
        super().__init__(
            params,
            defaults,
            learn=learn,
            height=height,
            hyper_optimizer=hyper_optimizer,
            hyper_lr=hyper_lr,
            hyper_betas=hyper_betas,
            hyper_eps=hyper_eps,
            lr_parametrization=lr_parametrization,
            per_group=per_group,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["step"] = scalar_state(local_view(param).device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        for name in ("beta1", "beta2"):
            if name in self.learn:
                state[f"d_{name}"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _needs_x(self, group: dict[str, Any]) -> bool:
        return (
            "lr" in self.learn and group["decoupled_weight_decay"] and group["weight_decay"] != 0.0
        )

    def _dot_names(self, group: dict[str, Any]) -> list[str]:
        names = ["lr"] if "lr" in self.learn else []
        if self._needs_x(group):
            names.append("x")
        return names + [n for n in ("beta1", "beta2") if n in self.learn]

    def _lr_dot(
        self, group: dict[str, Any], dots: dict[str, torch.Tensor], prev_lr: torch.Tensor
    ) -> torch.Tensor:
        if not self._needs_x(group):
            return dots["lr"]
        # u = lr * (d + wd * x_prev); x_prev = (x + lr * d) / (1 - lr * wd) from the last update
        wd = group["weight_decay"]
        x_prev = (dots["x"] + prev_lr * dots["lr"]) / (1.0 - prev_lr * wd)
        return dots["lr"] + wd * x_prev

    def _group_dots(self, gb: Any, values: dict[str, torch.Tensor], impl: str) -> list:
        group = gb.group
        static = {
            "eps": group["eps"],
            "learn_lr": "lr" in self.learn,
            "need_x": self._needs_x(group),
            "learn_beta1": "beta1" in self.learn,
            "learn_beta2": "beta2" in self.learn,
        }
        extra = []
        if static["need_x"]:
            extra.append(gb.params)
        for name in ("beta1", "beta2"):
            if name in self.learn:
                extra.append(gb.state_list(f"d_{name}"))
        m, v = gb.state_list("exp_avg"), gb.state_list("exp_avg_sq")
        steps = [s["step"] for s in gb.states]
        cdt = compute_dtype(gb.grads[0].dtype)
        scalars = _adam_scalars(steps, values["beta1"], values["beta2"], cdt, for_update=False)
        out: list[torch.Tensor | None] = [None] * len(gb.params)
        large = list(range(len(gb.params)))
        multi_tensor = group["implementation"] != "loop"  # "loop" is the pure reference path
        if multi_tensor and not (static["learn_beta1"] or static["learn_beta2"]):
            # Small tensors (biases, norms: most of a transformer's tensors, little of its
            # memory) in a few multi-tensor calls instead of one kernel call each.
            small = [
                i
                for i in large
                if gb.grads[i].numel() < _SMALL_NUMEL and gb.grads[i].dtype in _FOREACH_DTYPES
            ]
            large = [i for i in large if i not in set(small)]
            lists = [[gb.grads[i] for i in small], [m[i] for i in small], [v[i] for i in small]]
            if static["need_x"]:
                lists.append([gb.params[i] for i in small])
            for (dev, _), (bucket, idx) in bucket_by_device_and_dtype(lists).items():
                sc = [tuple(t.to(dev) for t in scalars[small[j]]) for j in idx]
                dots = _foreach_adam_lr_dots(bucket, sc, group["eps"])
                for j, d in zip(idx, dots, strict=True):
                    out[small[j]] = d
        sizes = [gb.params[i].numel() for i in large]
        for j in _tensor_order(impl, _adam_dots, sizes):
            i = large[j]
            dev = gb.grads[i].device
            tensors = [gb.grads[i], m[i], v[i], *(e[i] for e in extra)]
            sc = [t.to(dev) for t in scalars[i]]
            out[i] = _run(_adam_dots, impl, tensors, *sc, **static)
        return out  # type: ignore[return-value]

    def _native_covers(self, group: dict[str, Any]) -> bool:
        # learned betas (their derivative buffers) stay on the torch paths
        return "beta1" not in self.learn and "beta2" not in self.learn

    NATIVE_COUNTER = "step"

    def _native_state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq"]

    def _native_bucket_dots(
        self, gb: Any, addrs: list[_native.Addresses], out: torch.Tensor
    ) -> None:
        group = gb.group
        beta1, beta2 = group["betas"]
        _native.hyper_adam_dots(
            addrs[1],
            addrs[2],
            addrs[3],
            addrs[0] if self._needs_x(group) else None,
            addrs[4],  # the step counters
            out,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
        )

    def _native_update(
        self,
        gb: Any,
        addrs: list[_native.Addresses],
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        group = gb.group
        beta1, beta2 = group["betas"]
        _native.hyper_adam_update(
            *addrs[:4],
            addrs[4],  # the step counters, advanced by the C code
            ok,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )

    def _group_update(
        self,
        gb: Any,
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
        impl: str,
    ) -> None:
        group = gb.group
        learned_betas = [n for n in ("beta1", "beta2") if n in self.learn]
        static = {
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "decoupled": group["decoupled_weight_decay"],
            "maximize": group["maximize"],
            "learn_beta1": "beta1" in self.learn,
            "learn_beta2": "beta2" in self.learn,
        }
        lists = [
            gb.params,
            gb.grads,
            gb.state_list("exp_avg"),
            gb.state_list("exp_avg_sq"),
            *(gb.state_list(f"d_{n}") for n in learned_betas),
        ]
        steps = [s["step"] for s in gb.states]
        for (device, dtype), (bucket, idx) in bucket_by_device_and_dtype(lists).items():
            ok_d = ok.to(device)
            lr_d = lr.to(device)
            bucket_steps = [steps[i] for i in idx]
            if not learned_betas and _fused_ok(group, bucket, _ADAM_STREAMS):
                torch._foreach_add_(bucket_steps, ok_d.to(torch.float32))
                beta1, beta2 = group["betas"]
                fused = (
                    torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
                )
                fused(
                    bucket[0],
                    bucket[1],
                    bucket[2],
                    bucket[3],
                    [],
                    bucket_steps,
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    amsgrad=False,
                    maximize=group["maximize"],
                    **_fused_step_args(lr_d, ok_d, dtype),
                )
                continue
            b1, b2 = values["beta1"].to(device), values["beta2"].to(device)
            lr_ok = torch.where(ok_d, lr_d, 0.0)
            scalars = _adam_scalars(bucket_steps, b1, b2, compute_dtype(dtype), for_update=True)
            for i in _tensor_order(impl, _adam_update, [p.numel() for p in bucket[0]]):
                _run(
                    _adam_update,
                    impl,
                    [t[i] for t in bucket],
                    ok_d,
                    lr_ok,
                    b1,
                    b2,
                    *(t.to(device) for t in scalars[i]),
                    **static,
                )
            torch._foreach_add_(bucket_steps, ok_d.to(torch.float32))


# ---------------------------------------------------------------------- AdaGrad
class HyperAdaGrad(HypergradientOptimizer):
    r"""AdaGrad whose step size is learned online by hypergradient descent, with a tower of
    ``height`` hyperoptimizers on top.

    Base update (torch's Adagrad without lr decay)::

        G += g^2;     x -= alpha * s * g / (sqrt(G) + eps)

    Args:
        params: parameters or param groups.
        lr: initial step size ``alpha``.
        eps: added to ``sqrt(G)`` (default 1e-10, as torch).
        initial_accumulator_value: starting value of ``G``.
        weight_decay: L2 penalty added to the gradient.
        maximize: maximize the objective.
        learn: ``"lr"`` (the only learnable hyperparameter).
        height, hyper_optimizer, hyper_lr, hyper_betas, hyper_eps, lr_parametrization, per_group,
        implementation, skip_nonfinite, global_reduce, stochastic_rounding: as in
            :class:`HyperSGD`.

    Per-parameter state: ``sum`` (G) and ``direction`` (the last ``g / (sqrt(G) + eps)``).
    """

    LEARNABLE = ("lr",)
    STORED_DERIVATIVES = (("lr", "direction"),)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        learn: str | tuple[str, ...] = "lr",
        height: int = 2,
        hyper_optimizer: str | tuple[str, ...] = "adam",
        hyper_lr: float | tuple[float, ...] | None = None,
        hyper_betas: tuple[float, float] = (0.9, 0.99),
        hyper_eps: float = 1e-16,
        lr_parametrization: str = "log",
        per_group: bool = False,
        implementation: str = "auto",
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": check_nonnegative("lr", lr),
            "eps": check_positive("eps", eps),
            "initial_accumulator_value": check_nonnegative(
                "initial_accumulator_value", initial_accumulator_value
            ),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
            "maximize": check_bool("maximize", maximize),
            "implementation": check_choice("implementation", implementation, IMPLEMENTATIONS),
        }
        super().__init__(
            params,
            defaults,
            learn=learn,
            height=height,
            hyper_optimizer=hyper_optimizer,
            hyper_lr=hyper_lr,
            hyper_betas=hyper_betas,
            hyper_eps=hyper_eps,
            lr_parametrization=lr_parametrization,
            per_group=per_group,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["sum"] = torch.full_like(
            param, group["initial_accumulator_value"], memory_format=torch.preserve_format
        )
        for key in self._stored_derivatives():
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _native_state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["sum", *self._stored_derivatives()]

    def _native_update(
        self,
        gb: Any,
        addrs: list[_native.Addresses],
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        group = gb.group
        _native.hyper_adagrad_update(
            addrs[0],
            addrs[1],
            addrs[2],
            addrs[3] if "lr" in self.learn else None,
            ok,
            lr=lr,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )

    def _group_update(
        self,
        gb: Any,
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
        impl: str,
    ) -> None:
        group = gb.group
        lists = [gb.params, gb.grads, gb.state_list("sum")]
        lists += [gb.state_list(k) for k in self._stored_derivatives()]
        static = {
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "maximize": group["maximize"],
            "learn_lr": "lr" in self.learn,
        }
        for (device, _), (bucket, _) in bucket_by_device_and_dtype(lists).items():
            _update_each(_adagrad_update, impl, bucket, ok.to(device), lr.to(device), **static)


# ---------------------------------------------------------------------- RMSProp
class HyperRMSProp(HypergradientOptimizer):
    r"""RMSProp whose step size, and optionally decay, are learned online by hypergradient
    descent, with a tower of ``height`` hyperoptimizers on top.

    Base update (torch's RMSprop, no momentum, not centered)::

        v = decay * v + (1 - decay) * g^2;     x -= alpha * s * g / (sqrt(v) + eps)

    Args:
        params: parameters or param groups.
        lr: initial step size ``alpha``.
        decay: smoothing constant of ``v`` (torch calls it ``alpha``; default 0.99); learned if
            ``"decay"`` is in ``learn`` (then in (0, 1), through ``(tanh(z) + 1) / 2``).
        eps: added to ``sqrt(v)``.
        weight_decay: L2 penalty added to the gradient.
        maximize: maximize the objective.
        learn: any of ``"lr"`` (default), ``"decay"``.
        height, hyper_optimizer, hyper_lr, hyper_betas, hyper_eps, lr_parametrization, per_group,
        implementation, skip_nonfinite, global_reduce, stochastic_rounding: as in
            :class:`HyperSGD`.

    Per-parameter state: ``square_avg``, plus ``direction`` (the last ``g / (sqrt(v) + eps)``)
    when the step size is learned and ``d_decay`` when the decay is.
    """

    LEARNABLE = ("lr", "decay")
    SQUASHED = frozenset({"decay"})
    STORED_DERIVATIVES = (("lr", "direction"), ("decay", "d_decay"))

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        decay: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        learn: str | tuple[str, ...] = "lr",
        height: int = 2,
        hyper_optimizer: str | tuple[str, ...] = "adam",
        hyper_lr: float | tuple[float, ...] | None = None,
        hyper_betas: tuple[float, float] = (0.9, 0.99),
        hyper_eps: float = 1e-16,
        lr_parametrization: str = "log",
        per_group: bool = False,
        implementation: str = "auto",
        skip_nonfinite: bool = True,
        global_reduce: object = "auto",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = {
            "lr": check_nonnegative("lr", lr),
            "decay": check_in_range("decay", decay, 0.0, 1.0),
            "eps": check_positive("eps", eps),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
            "maximize": check_bool("maximize", maximize),
            "implementation": check_choice("implementation", implementation, IMPLEMENTATIONS),
        }
        super().__init__(
            params,
            defaults,
            learn=learn,
            height=height,
            hyper_optimizer=hyper_optimizer,
            hyper_lr=hyper_lr,
            hyper_betas=hyper_betas,
            hyper_eps=hyper_eps,
            lr_parametrization=lr_parametrization,
            per_group=per_group,
            skip_nonfinite=skip_nonfinite,
            global_reduce=global_reduce,
            stochastic_rounding=stochastic_rounding,
        )

    def _init_param_state(self, param: torch.Tensor, state: dict[str, Any], group: dict) -> None:
        state["square_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        for key in self._stored_derivatives():
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _native_state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["square_avg", *self._stored_derivatives()]

    def _native_update(
        self,
        gb: Any,
        addrs: list[_native.Addresses],
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        group = gb.group
        stored = dict(zip(self._stored_derivatives(), addrs[3:], strict=True))
        _native.hyper_rmsprop_update(
            addrs[0],
            addrs[1],
            addrs[2],
            stored.get("direction"),
            stored.get("d_decay"),
            ok,
            lr=lr,
            decay=values["decay"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )

    def _group_update(
        self,
        gb: Any,
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
        impl: str,
    ) -> None:
        group = gb.group
        lists = [gb.params, gb.grads, gb.state_list("square_avg")]
        lists += [gb.state_list(k) for k in self._stored_derivatives()]
        static = {
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "maximize": group["maximize"],
            "learn_lr": "lr" in self.learn,
            "learn_decay": "decay" in self.learn,
        }
        for (device, _), (bucket, _) in bucket_by_device_and_dtype(lists).items():
            ok_d, lr_d = ok.to(device), lr.to(device)
            rho = values["decay"].to(device)
            _update_each(_rmsprop_update, impl, bucket, ok_d, lr_d, rho, **static)
