"""``dpe``: dimension-wise Self-Extend (Lu et al. 2025, DPE), training-free.

The rotary planes split into equal groups, highest frequencies first, and each group gets its own Self-Extend
group size (:mod:`pos_swap.functional.dpe`): low-frequency planes, which leave their trained range long before
high-frequency ones, can be grouped more coarsely than the planes that tell neighbours apart. Neighbours closer than
``window`` keep their exact positions. It runs on Self-Extend's windowed hook: the far pass rotates queries and
keys plane by plane to their grouped positions, still one dot product, fused and merged by log-sum-exp.
``pos-swap calibrate MODEL --scheme dpe`` chooses the group sizes from measurements
(:mod:`pos_swap.evaluate.calibrate`). The reference's optional top-k selection of dimensions per head (only the
planes with the largest q/k norms grouped) is not implemented.
"""

import dataclasses
import math

from .. import archs
from ..errors import InvalidParameterError
from ..functional import dpe
from ..registry import MAX_FACTOR, MAX_POSITIONS, greater_than, param, register
from .self_extend import GroupedAttention, SelfExtend, WindowedConfig

CANDIDATE_GROUPS = 4  # plane groups of the setting `recommend` measures (4 divides the planes of nearly every model)


def group_sizes_check(values):
    """Every group size a whole number from 1 to MAX_FACTOR, at least one group."""
    if not values:
        return "must name at least one group size"
    if not all(1 <= v <= MAX_FACTOR for v in values):
        return f"must hold only group sizes from 1 to {MAX_FACTOR}"
    return None


@dataclasses.dataclass
class DpeConfig(WindowedConfig):
    window: int = param(
        None, "neighbour window W: keys closer than W keep their exact positions (default: trained context / 8)",
        greater_than(0, at_most=MAX_POSITIONS),
    )  # fmt: skip
    groups: list[int] = param(
        None,
        "Self-Extend group size per group of rotary planes, highest frequencies first, e.g. 2,4,4,8 (the planes "
        "split evenly; 1 keeps a group's exact positions)",
        group_sizes_check,
        required=True,
    )

    def validate(self, model):
        for planes in sorted({slot.dim // 2 for slot in archs.rotary_slots(model)}):
            if planes % len(self.groups):
                fits = [n for n in range(1, planes + 1) if planes % n == 0]
                raise InvalidParameterError(
                    f"dpe splits this model's {planes} rotary planes into {len(self.groups)} equal groups (one per "
                    f"group size), and {len(self.groups)} does not divide {planes}. Give a number of group sizes that "
                    f"divides {planes}: {', '.join(map(str, fits))}."
                )
        uneven = [g for g in self.groups if self.window % g]
        if uneven:
            step = math.lcm(*self.groups)
            raise InvalidParameterError(
                f"dpe needs the window divisible by every group size so grouped distances continue where the window "
                f"ends; window={self.window} is not divisible by {', '.join(map(str, sorted(set(uneven))))}. Use a "
                f"window that is a multiple of {step}, e.g. {self.window // step * step or step}."
            )


class DimensionWiseAttention(GroupedAttention):
    """Self-Extend's hook with a group size per rotary plane: far positions ``(B, L, F)``, one per plane."""

    def __init__(self, inv_freq, attention_scaling: float, window: int, groups: list[int]):
        super().__init__(inv_freq, attention_scaling, window, group=None)
        self.groups = list(groups)
        self.plane_sizes = dpe.plane_group_sizes(groups, inv_freq.numel())  # (F,)

    def extra_repr(self) -> str:
        return f"window={self.window}, groups={self.groups}, rotary_dim={2 * self.inv_freq.numel()}"

    def far_positions(self, q_pos, k_pos):
        return dpe.far_positions(q_pos, k_pos, self.window, self.plane_sizes.to(q_pos.device))


def power_of_two_below(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return 1 << (n.bit_length() - 1)


@register
class Dpe(SelfExtend):
    name = "dpe"
    summary = "DPE: Self-Extend with its own group size per group of rotary planes (Lu et al. 2025)"
    Config = DpeConfig
    families = (archs.ROTARY,)

    @classmethod
    def defaults(cls, model) -> dict:
        return {"window": max(1, archs.trained_context(model.config) // 8)}

    @classmethod
    def candidates(cls, trained, target):
        """One setting without measurements: the window W a power of two near trained / 8 (or trained / 4 when
        that is too small), G the smallest power of two >= 2 with (trained - W) G + W >= target (LongLM's rule, so
        every group size divides W), and four plane groups [G / 2, G, G, G]: the highest-frequency quarter, whose
        wavelengths are far below the trained context so that every phase it meets was seen in training, keeps a
        finer grouping. ``pos-swap calibrate`` measures a model's own."""
        for wanted in (trained // 8, trained // 4):
            window = power_of_two_below(max(1, wanted))
            group = 2
            while (trained - window) * group + window < target:
                group *= 2
            if window < trained and group <= window:
                return [{"window": window, "groups": [group // 2] + [group] * (CANDIDATE_GROUPS - 1)}]
        return []

    def hook(self, inv_freq, attention_scaling):
        return DimensionWiseAttention(inv_freq, attention_scaling, self.config.window, self.config.groups)
