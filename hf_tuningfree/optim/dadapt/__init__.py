"""D-Adaptation: SGD, Adam and AdaGrad whose step size is learned from the run itself.

Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023 (arXiv:2301.07733).

Every variant keeps ONE scalar ``d`` for the whole model: a lower bound on the distance
``D = ||x0 - x*||`` from the initial point to a solution, which starts at ``d0`` and never
decreases. It is read off a weighted sum of past gradients ``s``::

    d_hat = <weighted sum of lambda_i <g_i, s_i>> / ||s||      (a lower bound on D, convex case)
    d     = max(d, min(d_hat, growth_rate * d))

and the step is ``d * lr`` (``lr`` is a multiplier, default 1.0, that schedules and warm-up act
on). The three variants differ in the weighting and the norm; the class docstrings state each
rule as math.

How a step runs (the phases of :mod:`hf_tuningfree.optim.base`)::

    statistics  one read-only pass per tensor, before anything changes, returns this rank's
                contributions to every model-wide sum of the step: ``||g||^2`` (the non-finite
                guard; SGD's ``||g_0||``), the numerator terms, which the papers define on the
                state BEFORE the update (``<g_k, s_k>`` and its variants), and the norm of the
                UPDATED ``s``. The last one needs no second pass: ``s_{k+1}`` is an elementwise
                function of ``s_k``, ``g_k`` and scalars that are all known before the step
                (``d_k``, ``lr``, the bias correction), so the pass evaluates it without storing
                it. The sums go through the base's single stacked all-reduce
                (``_local_statistics``): ONE collective per step when the parameters are sharded
                (FSDP2 / FSDP1 / ``global_reduce``), none under DDP or in one process; every rank
                reaches it, also one whose shard received no gradient.
    update      one pass per tensor updates the state and the parameters with this step's ``d``
                (pure elementwise: nothing is reduced, so the compiled loop runs in place), then
                ``d`` is updated from the reduced sums.

Where no collective is made (one process, DDP) and the C kernels take every group (below), a
step runs in a FUSED form with the same results::

    guard       one read of the gradients: ``||g||^2`` per group, the non-finite guard's sum
                (and SGD's ``||g_0||``); a NaN/Inf anywhere still cancels the step before the
                first write;
    update      one C kernel per group computes the other sums from the state before the step
                while it updates that state (``_fused_update``), then ``d`` as above.

Every sum is an elementwise function of the old state, the gradient and scalars known before the
step, so evaluating it inside the update changes nothing but the memory traffic: the statistics
pass reads ``g`` and most of the state a second time (DAdaptAdam: ``g, v, s``; Prodigy: ``x, g,
s, x0``), the guard reads only ``g``. Sharded runs keep the two passes, because the sums must be
reduced across ranks in the step's one collective before ``d`` is updated. Both forms evaluate
the same expressions over the same blocks (tests/test_dadapt_native.py: equal to rounding of the
fp64 sums, bit-identical as measured).

Nothing in ``step()`` reads a device value on the host: ``d``, the numerator and the step counter
are 0-dim tensors in ``self.global_state`` (saved with the optimizer's state dict). The one
exception is Prodigy's ``implicit_zero_x0``: one batched read, at the step that creates a
parameter's state, of whether each new tensor is all zero.

Memory options (issue 17; the class docstrings give each one's effect on ``d``): ``betas[0] = 0``
keeps no first-moment buffer (DAdaptAdam, Prodigy); ``slice_p = k`` stores ``s`` (and Prodigy's
``x0``) on every k-th element only, the estimate's sums taken there (DAdaptSGD, DAdaptAdam,
Prodigy, schedule-free Prodigy; not AdaGrad, whose ``s`` is part of its iterate); Prodigy's
``implicit_zero_x0`` (on) stores no ``x0`` for tensors that start at zero. State per fp32
element: DAdaptAdam 12 bytes, 8 with ``beta1 = 0``, 4 + 4/k with ``slice_p = k`` as well;
Prodigy 16, 12, 4 + 8/k (LoRA's zero B: 4 less each, 4 + 4/k); DAdaptSGD 4 (8 with momentum),
4/k (4 + 4/k).

Code paths. Each pass is one function of one tensor and its state, run eagerly (``"loop"``, the
reference) or compiled (``"compiled"``: one fused loop per tensor, Triton on GPU, inductor's C++ on
CPU; see :mod:`hf_tuningfree.optim.kernels`). Every per-step coefficient enters those functions as
a 0-dim tensor computed outside them, so one compiled kernel serves every hyperparameter value and
schedule; only booleans (``maximize``, coupled weight decay, momentum on/off) select variants. On
CPU (fp32/fp64 contiguous tensors), ``"auto"`` and ``"native"`` run each pass (or the fused update)
as C loops of :mod:`hf_tuningfree.optim._native`, ONE call per group for all its tensors: the
``torch.compile``d kernel made one call per tensor (147 for the benchmark's model), each paying
dynamo's guards, and two passes over memory, and measured 1.7-2.7x fused AdamW; the C path measures
1.0-1.9x (README "Step time"). The C code reads the coefficients and ``ok`` from tensor memory (no
host read) and follows the per-element functions operation by operation: results match the loop
path to rounding (its sqrt is correctly rounded, torch's vectorised CPU sqrt not always: ~1e-7
relative in fp32, ~1e-16 in fp64; DAdaptSGD, without a sqrt, bit-identical in the tests). Without a
C compiler (one warning), for 16-bit parameters and on GPUs the torch paths run.

Hyperparameters that define the model-wide estimate (``d0``, ``growth_rate``, ``betas`` of the
Adam variants' ``s``, ...) must be equal in every param group (checked); ``lr``, weight decay,
``eps``, momentum and ``maximize`` may differ per group. A group's ``lr`` scales both its step and
its contribution to the estimate, so ``lr = 0`` freezes a group and keeps it out of ``d``.
Parameters without a gradient in a step keep their ``s``, and it still counts in ``||s||`` (the
authors' code leaves them out of the norm for that step, which can raise ``d`` for good).
"""

from __future__ import annotations

from .adagrad import DAdaptAdaGrad, dadapt_adagrad_statistics, dadapt_adagrad_tensor_update
from .adam import DAdaptAdam, dadapt_adam_statistics, dadapt_adam_tensor_update
from .machinery import DAdaptationBase
from .passes import TensorPass
from .sgd import DAdaptSGD, dadapt_sgd_statistics, dadapt_sgd_tensor_update

__all__ = [
    "DAdaptAdaGrad",
    "DAdaptAdam",
    "DAdaptSGD",
    "DAdaptationBase",
    "TensorPass",
    "dadapt_adagrad_statistics",
    "dadapt_adagrad_tensor_update",
    "dadapt_adam_statistics",
    "dadapt_adam_tensor_update",
    "dadapt_sgd_statistics",
    "dadapt_sgd_tensor_update",
]
