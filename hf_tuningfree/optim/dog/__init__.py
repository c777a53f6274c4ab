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
  ``implementation="native"``, the CPU default): four streams read and one written per step,
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

from .core import DoG
from .kernels import dog_tensor_update, taming_factor
from .layerwise import LDoG
from .tamed import TDoG

__all__ = ["DoG", "LDoG", "TDoG", "dog_tensor_update", "taming_factor"]
