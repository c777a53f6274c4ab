"""The hypergradient tower: :class:`HypergradientOptimizer`, the base of every optimizer here.

It holds the tower's configuration (``learn``, ``height``, the hyperoptimizers and their step
sizes, the parametrisation), the learned values and the hyperoptimizers' state in
``global_state``, the hypergradients of every level and the top-down hyper-updates, and the order
of a step. The base optimizer's passes over the parameters (the dots, the update) and the choice
of their path are :mod:`.passes`'; the per-element functions are :mod:`.kernels`'. See
:mod:`hf_tuningfree.optim.hypergradient` for the algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch.optim.optimizer import ParamsT

from ..base import (
    GroupBatch,
    ReducePlan,
    StepBatch,
    TuningFreeOptimizer,
    real_dtype,
)
from ..validation import (
    check_bool,
    check_choice,
    check_in_range,
    check_nonnegative,
    check_positive,
    scalar_value,
)
from .kernels import (
    _LOG_LIMIT,
    DEFAULT_HYPER_LR,
    HYPER_OPTIMIZERS,
    STEP_PARAMETRIZATIONS,
    _derivative,
    _project,
    _raw_from_value,
    _value,
)
from .passes import ParameterPasses


# ---------------------------------------------------------------------- argument parsing
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


class HypergradientOptimizer(ParameterPasses, TuningFreeOptimizer):
    """Base class of the hypergradient optimizers (the algorithm:
    :mod:`hf_tuningfree.optim.hypergradient`).

    Subclasses declare ``LEARNABLE`` (their learnable hyperparameters, step size ``"lr"`` first),
    ``SQUASHED`` (those living in (0, 1)), and implement ``_init_param_state`` and
    ``_group_update`` (the passes' hooks: :class:`~.passes.ParameterPasses`). Where the update
    stores ``du/dh`` per element, ``STORED_DERIVATIVES`` names the state key of each, and the
    default ``_dot_names`` / ``_group_dots`` dot the gradient with them; HyperAdam recomputes its
    step-size derivative from the moments and overrides both.
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
        per_tensor: bool = False,
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
        self.per_tensor = check_bool("per_tensor", per_tensor)
        if self.per_tensor and self.per_group:
            raise ValueError(
                "per_group=True and per_tensor=True are exclusive; allowed: one of them "
                "(per_tensor already gives every tensor of every group its own step size)"
            )
        if self.per_tensor and self.learn not in ((), ("lr",)):
            raise ValueError(
                f"{name}: per_tensor=True learns the step size only; got learn="
                f"{'+'.join(self.learn)!r}, allowed with per_tensor: learn='lr' (or pass "
                "per_tensor=False)"
            )
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

    #: Whether ``_group_update`` takes ``lr`` as one step size per tensor of the batch (a
    #: vector, ``per_tensor``); else the tower runs it one tensor at a time.
    TENSOR_STEP_SIZES = False

    #: The C loops, the compiled kernels and the loop; HyperSGD and HyperAdam add ``"foreach"``
    #: (torch's fused multi-tensor kernel for their update).
    PATHS = ("native", "compiled", "loop")

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
        "per_tensor",
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
        "per_tensor",
    )

    def _reset_transient(self) -> None:
        super()._reset_transient()
        self._finite_term: torch.Tensor | None = None
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._step_cache: dict[str, Any] = {}
        self._layout_checked = False

    # ------------------------------------------------------------------ configuration helpers
    @property
    def _own_start(self) -> bool:
        """Whether each param group's learned step size starts at its own ``lr`` (per group or
        per tensor) rather than at the constructor's (one model-wide value)."""
        return self.per_group or self.per_tensor

    def _group_offsets(self) -> list[int]:
        """Index of each param group's first tensor in the per-tensor vectors (group order)."""
        offsets, n = [], 0
        for group in self.param_groups:
            offsets.append(n)
            n += len(group["params"])
        return offsets

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # The learned step size starts at lr_ref; group["lr"] / lr_ref is the schedule multiplier.
        group.setdefault("lr_ref", group["lr"] if self._own_start else self.defaults["lr"])
        sharing = None if self._own_start else list(range(len(self.param_groups)))
        self._check_initial_values(group, sharing)

    def _fill_group(self, group: dict[str, Any]) -> None:
        super()._fill_group(group)
        group.setdefault("lr_ref", group["lr"] if self._own_start else self.defaults["lr"])
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
        if self.per_tensor:
            self._ensure_tensor_towers(device, dtype, n_params)
            return
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
                if raw.dim() != 0:
                    raise ValueError(
                        f"{type(self).__name__}: the loaded state holds one {key} per tensor "
                        "(saved with per_tensor=True); allowed: resume it with per_tensor=True"
                    )
                self.global_tensor(key, device, lambda d, r=raw, k=kind: _value(k, r.to(d)))
                for suffix in ("grad", "dir", "exp_avg", "exp_avg_sq"):
                    self.global_tensor(f"{key}/{suffix}", device, const(0.0))

    def _ensure_tensor_towers(self, device: torch.device, dtype: torch.dtype, n: int) -> None:
        """``per_tensor``: every value of the tower below its fixed top is a vector with one
        entry per tensor (group order). Entries for tensors of a group added since are
        appended at their starting values; a state saved with one model-wide tower (0-dim
        values) resumes with that value for every tensor."""
        gs = self.global_state
        starts = [g["lr_ref"] for g in self.param_groups for _ in g["params"]]
        for level, name, key in self._tower_keys("hyper/"):
            if level == self.height:  # the fixed top step size
                top = self.hyper_lr[level - 1]
                self.global_tensor(
                    key, device, lambda d, v=top: torch.tensor(v, dtype=dtype, device=d)
                )
                continue
            kind = self._kind(level, name)
            firsts = starts if level == 0 else [self.hyper_lr[level - 1]] * n
            first_raw = torch.tensor(
                [_raw_from_value(kind, float(v)) for v in firsts], dtype=dtype, device=device
            )
            entries = {key + "/raw": first_raw}
            for suffix in ("grad", "dir", "exp_avg", "exp_avg_sq"):
                entries[f"{key}/{suffix}"] = torch.zeros(n, dtype=dtype, device=device)
            for k, first in entries.items():
                t = gs.get(k)
                if t is None:
                    t = first
                t = t.to(device)
                if t.dim() == 0:  # saved by a model-wide tower
                    t = t.expand(n).to(first.dtype).clone()
                if t.numel() < n:  # a param group was added
                    t = torch.cat([t, first[t.numel() :].to(t.dtype)])
                gs[k] = t
            value = gs.get(key)
            if value is None or value.dim() == 0 or value.numel() != n:
                gs[key] = _value(kind, gs[key + "/raw"])
            else:
                gs[key] = value.to(device)

    # ------------------------------------------------------------------ subclass hook
    def _lr_dot(
        self, group: dict[str, Any], dots: dict[str, torch.Tensor], prev_lr: torch.Tensor
    ) -> torch.Tensor:
        """``<g, du/d(effective step size)>`` from the group's dots (``prev_lr``: the effective
        step size of the last update)."""
        return dots["lr"]

    # ------------------------------------------------------------------ values of this step
    def _values(self, gi: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Hyperparameter values for group ``gi``: learned ones from the global state, fixed ones
        from the param group (as 0-dim tensors)."""
        group = self.param_groups[gi]
        prefix = self._prefix(gi)
        dtype = self._hyper_dtype()
        out: dict[str, torch.Tensor] = {}
        for name in self.LEARNABLE:
            if name in self.learn and self.per_tensor:  # the step size: this group's entries
                start = self._group_offsets()[gi]
                out[name] = self._g(f"{prefix}level0/{name}")[start : start + len(group["params"])]
            elif name in self.learn:
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
        offsets = self._group_offsets()
        for gi, gb in enumerate(batch.groups):
            names = self._dot_names(gb.group)
            n = len(gb.params)
            if self.per_tensor:
                # one dot per tensor of the group (0 for those without a gradient): every rank
                # holds the same vectors, summed over the shards by the reduction
                full = torch.zeros(len(gb.group["params"]), len(names), dtype=dtype, device=device)
                if n:
                    dots = self._batch_dots(gb, gi, device, dtype)
                    here = idx[pos : pos + n] - offsets[gi]
                    dots = dots * valid[pos : pos + n].unsqueeze(1)
                    full = full.index_put((here,), dots.to(dtype))
                    if gb.group["maximize"]:  # the loss is -objective
                        full = -full
                    finite.append(full.sum())
                pos += n
                for k, name in enumerate(names):
                    out[f"dot/{gi}/{name}"] = full[:, k]
                continue
            if n:
                dots = self._batch_dots(gb, gi, device, dtype)
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

    def _reduce(
        self, local: dict[str, torch.Tensor], plan: ReducePlan, device: torch.device
    ) -> dict[str, torch.Tensor]:
        if self.per_tensor and plan.kind == "explicit" and not self._layout_checked:
            self._check_same_tensors_everywhere(plan, device)
        return super()._reduce(local, plan, device)

    def _check_same_tensors_everywhere(self, plan: ReducePlan, device: torch.device) -> None:
        """``per_tensor`` sums each tensor's dot over the ranks entry by entry, which is right
        where every rank holds a part of the same tensors in the same order (FSDP; DeepSpeed
        ZeRO's flat partitions, one per group on every rank). With ``global_reduce`` given
        explicitly that cannot be seen from the tensors: the first step compares the counts
        (one collective and one host read, once)."""
        n = float(sum(len(g["params"]) for g in self.param_groups))
        counts = torch.tensor([n, -n], dtype=torch.float64, device=device)
        for group in plan.groups:
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
        most, fewest = float(counts[0]), -float(counts[1])
        if most != fewest:
            raise ValueError(
                f"{type(self).__name__}: per_tensor=True with global_reduce="
                f"{self.global_reduce!r}, but the ranks hold {fewest:g} to {most:g} tensors; "
                "allowed: the same tensors in the same order on every rank (FSDP, DeepSpeed "
                "ZeRO); for parameters split between ranks by hand use per_tensor=False"
            )
        self._layout_checked = True

    def _batch_dots(
        self, gb: Any, gi: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """``(tensors of gb, dot names)``: each tensor's dots, on ``device``."""
        values = self._values(gi, device)
        if self._native_ok(gb):
            return self._native_dots(gb, values).to(device)  # fp64 on the CPU
        impl = self._impl(gb, device, update=False)
        return torch.stack(self._group_dots(gb, values, impl)).to(device, dtype)

    def _update(self, batch: StepBatch, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        device = batch.device
        dtype = self._hyper_dtype()
        if self.learning:
            for prefix, members in self._sets():
                self._hyper_step(prefix, members, stats, ok, device)
        offsets = self._group_offsets()
        pos = 0
        # per_tensor: the single-tensor batches stay alive for the whole update, so that no
        # two of them share an id() (the key of the C path's per-step plan cache)
        singles: list[GroupBatch] = []
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
            n = len(gb.params)
            if not n:
                continue
            if self.per_tensor and self.learning:
                # each tensor by its own step size: the C loops take one per tensor in one call
                # per bucket; the torch paths run the group's update one tensor at a time
                here = self._step_cache["idx"][pos : pos + n] - offsets[gi]
                lrs = lr.to(device)[here]
                plan = self._native_plan(gb)
                if plan is not None:
                    for addrs, bucket in plan:
                        part = lrs if len(plan) == 1 else lrs[torch.tensor(bucket)]
                        self._native_update(gb, addrs, values, part.contiguous(), ok)
                    pos += n
                    continue
                if self.TENSOR_STEP_SIZES:  # the torch paths take the vector themselves
                    impl = self._impl(gb, device, update=True)
                    self._group_update(gb, values, lrs, ok, impl)
                    pos += n
                    continue
                for i in range(n):
                    single = GroupBatch(
                        group=gb.group,
                        params=gb.params[i : i + 1],
                        grads=gb.grads[i : i + 1],
                        states=gb.states[i : i + 1],
                        originals=gb.originals[i : i + 1],
                        fresh=gb.fresh[i : i + 1],
                    )
                    singles.append(single)
                    self._run_update(single, values, lrs[i], ok, device)
            else:
                self._run_update(gb, values, lr.to(device), ok, device)
            pos += n
        if self.learning:
            idx = self._step_cache["idx"]
            step = self._g("hyper/step")
            last = self._g("hyper/last_update")
            new_last = torch.where(ok, (step + 1.0).to(last.dtype), last[idx])
            self.global_state["hyper/last_update"] = last.index_put((idx,), new_last)
            self.global_state["hyper/step"] = step + ok.to(step.dtype)
        self._step_cache = {}

    def _run_update(
        self,
        gb: GroupBatch,
        values: dict[str, torch.Tensor],
        lr: torch.Tensor,
        ok: torch.Tensor,
        device: torch.device,
    ) -> None:
        """The base update of ``gb`` with effective step size ``lr``, on its path."""
        plan = self._native_plan(gb)
        if plan is not None:
            for addrs, _ in plan:
                self._native_update(gb, addrs, values, lr, ok)
        else:
            impl = self._impl(gb, device, update=True)
            self._group_update(gb, values, lr, ok, impl)

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
        offsets = self._group_offsets()
        for gi in members:
            group = self.param_groups[gi]
            names = self._dot_names(group)
            dots = {n: stats[f"dot/{gi}/{n}"] for n in names}
            prev_scale = gs[f"hyper/group{gi}/prev_scale"]
            a, r = alpha, raw_lr
            if self.per_tensor:  # this group's entries (learn is "lr" alone)
                here = slice(offsets[gi], offsets[gi] + len(group["params"]))
                a, r = alpha[here], raw_lr[here]
            prev_lr = prev_scale * a if a is not None else prev_scale
            for name in names0:
                if name == "lr":
                    d = self._lr_dot(group, dots, prev_lr)
                    terms[name].append(prev_scale * _derivative(self._kind(0, name), r) * d)
                else:
                    raw = gs[f"{prefix}level0/{name}/raw"]
                    terms[name].append(prev_lr * _derivative("squash", raw) * dots[name])
        if self.per_tensor:  # one hypergradient per tensor: (1, tensors)
            h = [-torch.cat(terms["lr"]).unsqueeze(0)]
        else:
            h = [-torch.stack([torch.stack(terms[n]).sum() for n in names0])]
        # ---- levels 1..H-1: chain rule through the last hyper-update, d theta_{j-1}/d theta_j
        for j in range(1, H):
            below = self._level_names(j - 1)
            direction = torch.stack([gs[f"{prefix}level{j - 1}/{n}/dir"] for n in below])
            raw_j = gs[f"{prefix}level{j}/lr/raw"]
            pj = _derivative(self.lr_parametrization, raw_j)
            # summed over the names of the level below (per tensor: each tensor's own)
            h.append((-(pj * (h[j - 1] * direction).sum(0))).unsqueeze(0))
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
        one fixed); ``hyper/group{i}/...`` with ``per_group=True``; with ``per_tensor=True`` the
        median over the tensors (torch's: the lower of the two middle values) under that key and
        ``{key}_min``, ``{key}_max`` beside it (every tensor's value: ``global_state[key]``, in
        group order). Reads device memory."""
        out = super().stats()
        if not self.learning:
            return out
        for prefix, _ in self._sets():
            for _, _, key in self._tower_keys(prefix):
                value = self.global_state.get(key)
                if value is None or value.numel() == 0:
                    continue
                if value.dim() == 0:
                    out[key] = float(value)
                else:
                    out[key] = float(value.median())
                    out[f"{key}_min"] = float(value.min())
                    out[f"{key}_max"] = float(value.max())
        return out

    def hypergradients(self) -> dict[str, float | list[float]]:
        """The hypergradients used by the last successful step, ``dL/d(learned variable)`` in
        the parametrised coordinates (e.g. ``d L / d log(alpha)``); with ``per_tensor=True`` a
        list, one per tensor. For tests and debugging."""
        return {
            k[: -len("/grad")]: float(v) if v.dim() == 0 else v.tolist()
            for k, v in self.global_state.items()
            if k.endswith("/grad")
        }
