"""Stochastic rounding of fp32 results into bf16/fp16 parameters.

A bf16 parameter holds 8 significant bits: near 1.0 its spacing (one ulp) is 2^-7 ~ 0.0078. An
update smaller than half an ulp is lost entirely by round-to-nearest, so a bf16 model trained with
small steps stops moving (the stall users of bf16 LoRA / full fine-tuning report: OneTrainer
#739/#994, SimpleTuner PR #1294; prodigy-plus-schedule-free rounds stochastically by default).
Stochastic rounding picks the upper neighbour with probability equal to the distance from the
lower one, in ulps, so the rounded value equals the exact one in expectation and many small
updates add up as in fp32 (Gupta et al., "Deep Learning with Limited Numerical Precision", ICML
2015; Zamirai et al., "Revisiting BFloat16 Training", 2020).

:func:`stochastic_round` does it for one tensor: for bf16 by adding 16 random low bits to the fp32
bit pattern and truncating (exactly the rule above, one integer add per element); for fp16 from the
two neighbours (``torch.nextafter``). A value that is already representable is returned unchanged
(a skipped step leaves a parameter bit-identical), and NaN/Inf pass through.

:class:`RoundingStream` makes the random bits reproducible: the bits of a step come from a
generator reseeded with ``(seed, step call)``, so a run is the same under the same seed and a
resumed run continues exactly (only the two integers are saved), on every device, without a host
sync. Data-parallel ranks that construct the optimizer under the same seed (the Trainer seeds every
rank alike) round identically and their replicas stay equal.
"""

from __future__ import annotations

import torch

__all__ = ["LOW_PRECISION", "RoundingStream", "stochastic_round"]

#: Parameter dtypes that stochastic rounding applies to.
LOW_PRECISION = (torch.bfloat16, torch.float16)
_LOW_BITS = 1 << 16  # the fp32 mantissa bits a bf16 drops
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as an int32


def stochastic_round(
    value: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``value`` (fp32) rounded to ``dtype`` (bf16 or fp16) stochastically: each element goes to
    one of its two neighbours in ``dtype`` with the probability that makes the result equal to
    ``value`` in expectation. Representable values, NaN and Inf are returned unchanged."""
    if value.dtype != torch.float32:
        raise ValueError(f"stochastic_round: value must be fp32, got {value.dtype}")
    if dtype == torch.bfloat16:
        bits = value.view(torch.int32)
        noise = torch.randint(
            0, _LOW_BITS, value.shape, dtype=torch.int32, device=value.device, generator=generator
        )
        rounded = ((bits + noise) & _HIGH_MASK).view(torch.float32)
        return torch.where(torch.isfinite(value), rounded, value).to(torch.bfloat16)
    if dtype == torch.float16:
        nearest = value.to(torch.float16)
        near = nearest.to(torch.float32)
        away = torch.where(near < value, torch.inf, -torch.inf).to(torch.float16)
        other = torch.nextafter(nearest, away)
        gap = (other.to(torch.float32) - near).abs()
        chance = torch.where(gap > 0, (value - near).abs() / gap, 0.0)
        draw = torch.rand(value.shape, device=value.device, generator=generator)
        pick = (draw < chance) & torch.isfinite(value) & torch.isfinite(other)
        return torch.where(pick, other, nearest)
    raise ValueError(f"stochastic_round: dtype must be one of {list(LOW_PRECISION)}, got {dtype}")


class RoundingStream:
    """Reproducible random bits for the stochastic rounding of each ``step()`` call: one
    generator per device, reseeded at every call from ``seed`` and the call's number."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) % (1 << 62)
        self.calls = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def begin_step(self) -> None:
        """Start the bits of a new ``step()`` call (host integers only)."""
        self.calls += 1
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of this call on ``device``."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            # a fixed odd multiplier spreads consecutive calls over the seed space
            gen.manual_seed((self.seed + self.calls * 0x9E3779B97F4A7C15) % (1 << 63))
            self._generators[device] = gen
        return gen

    def state(self) -> dict[str, int]:
        return {"seed": self.seed, "calls": self.calls}

    @classmethod
    def from_state(cls, state: dict[str, int]) -> RoundingStream:
        stream = cls(state["seed"])
        stream.calls = int(state["calls"])
        return stream
