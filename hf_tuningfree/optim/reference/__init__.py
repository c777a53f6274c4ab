"""The papers' algorithms, one element at a time: what each optimizer of hf_tuningfree.optim is
held to.

Each module states one family as the papers write it, in plain Python floats (the hypergradient
towers by autograd through the update, as the paper does), citing the paper and the algorithm.
They share nothing with the implementation modules: the only package imports here are of this
package's own modules (``tests/test_references.py`` checks it), so an error in the fast code
cannot hide in its own reference. ``tests/test_references.py`` runs every registered optimizer
against its entry of :data:`BY_NAME` at fp64, on every CPU code path.

Calling convention (every function of :data:`BY_NAME`)::

    params, trace = reference(init, gradient, steps, groups, **model_wide)

* ``init``: ``[group][tensor] -> list[float]``, the initial weights, flattened (not modified);
* ``gradient(t, x)``: the gradient oracle of step ``t`` at the reference's own iterate ``x``
  (same layout; for schedule-free, the point ``y`` where the gradient is taken): returns
  ``[group][tensor] -> list[float] | None``, None for a tensor without a gradient at that step.
  An oracle that ignores ``x`` is a fixed gradient stream (:func:`problems.gradient_stream`);
  the D-Adaptation quadratic (:func:`problems.noisy_quadratic`) uses it;
* ``steps``: the number of steps;
* ``groups``: one dict of hyperparameters per param group, under the optimizer's group keys;
* ``model_wide``: the hyperparameters that define one estimate for the whole model, under the
  optimizer's constructor names (``d0``, ``growth_rate``, ``betas`` of D-Adapt Adam, ``delta``,
  ``height``, ...);
* ``params``: the weights after ``steps`` steps, in ``init``'s layout;
* ``trace``: one entry per step, after it: the adapted scalar (D-Adaptation and Prodigy ``d``,
  DoG and T-DoG ``eta``), ``{(group, tensor): eta}`` for L-DoG, ``{"level{j}/{name}": value}``
  for the hypergradient towers, None for ADOPT (nothing is adapted).

Modules: :mod:`.adopt`, :mod:`.dadapt` (SGD, Adam, AdaGrad, Prodigy), :mod:`.schedule_free`
(Prodigy schedule-free, with its three sequences), :mod:`.dog` (DoG, L-DoG, T-DoG),
:mod:`.hypergradient` (SGD, Adam, AdaGrad, RMSProp under towers of hyperoptimizers),
:mod:`.problems` (the test problems).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import adopt, dadapt, dog, hypergradient, problems, schedule_free

#: Registry name -> its reference, in the calling convention above.
BY_NAME: dict[str, Callable[..., tuple[Any, list]]] = {
    "adopt": adopt.adopt,
    "dadapt_sgd": dadapt.sgd,
    "dadapt_adam": dadapt.adam,
    "dadapt_adagrad": dadapt.adagrad,
    "prodigy": dadapt.prodigy,
    "prodigy_sf": schedule_free.prodigy_sf,
    "dog": dog.dog,
    "ldog": dog.ldog,
    "tdog": dog.tdog,
    "hyper_sgd": hypergradient.hyper_sgd,
    "hyper_adam": hypergradient.hyper_adam,
    "hyper_adagrad": hypergradient.hyper_adagrad,
    "hyper_rmsprop": hypergradient.hyper_rmsprop,
}

__all__ = ["BY_NAME", "adopt", "dadapt", "dog", "hypergradient", "problems", "schedule_free"]
