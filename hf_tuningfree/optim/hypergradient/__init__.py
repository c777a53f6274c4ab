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

Defaults and performance
------------------------
How the defaults (``height=2``, ``hyper_lr=(0.05, 0.02)``, ``hyper_betas=(0.9, 0.99)``) were
chosen, the tower's known limitation on AdaGrad and RMSProp, and how a step runs and what it
costs against torch's fused SGD and AdamW, with the measurements: ``docs/hypergradient.md``.

Files: :mod:`.kernels` (the per-element functions and path choices), :mod:`.tower` (the tower,
:class:`HypergradientOptimizer`), :mod:`.passes` (the base optimizer's passes over the parameters
and the path each runs on), then one file per base optimizer (:mod:`.sgd`, :mod:`.adam`,
:mod:`.adagrad`, :mod:`.rmsprop`).

State and the schedule
----------------------
Every level's hyperparameter values (and the hyperoptimizers' moments and last directions) are
0-dim tensors in ``self.global_state`` under ``hyper/level{l}/{name}`` (``hyper/group{i}/...`` with
``per_group=True``); they are saved in ``state_dict()`` and a resume is bit-exact.

One step size per tensor
------------------------
``per_tensor=True`` gives every parameter tensor a tower of its own: the same algorithm with the
model-wide dot ``sum_tensors <g, du/dh>`` replaced by each tensor's own dot, so a LoRA ``B``, an
embedding, a LayerNorm gain each learn the step the one-step hypergradient asks for them (Baydin
et al. name the per-parameter form in Section 2; here the unit is the tensor, not the element,
so each hypergradient still averages over the tensor's elements). The tower's values below the
fixed top are then vectors, one entry per tensor in group order, and the tower stays a few dozen
operations per step whatever the number of tensors; each tensor starts at its group's ``lr``. The
step size alone is learned (``learn="lr"``). The update runs tensor by tensor (one kernel call or
C call each, where the model-wide form makes one per bucket). Under FSDP each rank's dot of a
shard is summed entry by entry with the others in the step's one all-reduce; under DeepSpeed ZeRO
the optimizer sees one flat partition per group, so it is one step size per group there; with
parameters split between ranks by hand (``global_reduce="world"``, different tensors per rank) it
is refused at the first step. Measured on the task suite: better than one step size for the model
on all five tasks (README, "Does it hold on tasks it was not tuned on?"); the registry's
``hyper_adam`` (= ``tuningfree``) uses it. ``step()`` reads
nothing back to the host. ``group["lr"]`` stays the schedule's multiplier: the step used is
``alpha * group["lr"] / lr_ref`` with ``lr_ref`` the constructor's ``lr`` (the learned ``alpha``
starts there), so a warm-up or decay schedule scales the learned step size. A step whose gradients
contain NaN/Inf anywhere changes nothing: not the parameters, not the hyperparameters, not the
stored derivatives.
"""

from __future__ import annotations

from .adagrad import HyperAdaGrad
from .adam import HyperAdam
from .kernels import HYPER_OPTIMIZERS, STEP_PARAMETRIZATIONS
from .rmsprop import HyperRMSProp
from .sgd import HyperSGD
from .tower import HypergradientOptimizer

__all__ = [
    "HYPER_OPTIMIZERS",
    "STEP_PARAMETRIZATIONS",
    "HyperAdaGrad",
    "HyperAdam",
    "HyperRMSProp",
    "HyperSGD",
    "HypergradientOptimizer",
]
