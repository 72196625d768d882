"""``string``: STRING, shifted rotary positions within the trained context (An et al. 2024), training-free.

Pairs closer than ``shift`` keep their positions; farther pairs see their distance minus ``shift`` plus
``local_window`` (:mod:`pos_swap.functional.string`), so the rarely trained large distances are replaced by well
trained ones. It runs on Self-Extend's windowed hook (near pass over a band of ``shift`` keys, far pass with the
query re-rotated at its position - S + W), fused and merged by log-sum-exp (CPU, CUDA), two passes over the cache
when decoding. The reference multiplies cos and sin by 0.1 ln 2 + 1 (``attention_factor``). ``leaky_factor``
(not in the paper) grows the shifted distances by 1/k per token, as leaky ReRoPE does, for use past the trained
context.
"""

import dataclasses
import math

from .. import archs
from ..errors import InvalidParameterError
from ..functional import string
from ..registry import MAX_FACTOR, MAX_POSITIONS, greater_than, param, register
from .self_extend import GroupedAttention, SelfExtend, WindowedConfig


@dataclasses.dataclass
class StringConfig(WindowedConfig):
    shift: int = param(
        None, "shift S: distances from S on become d - S + W (default: a third of the trained context)",
        greater_than(0, at_most=MAX_POSITIONS),
    )  # fmt: skip
    local_window: int = param(
        128, "local window W: the smallest distance a shifted pair sees (the reference uses 128, 256 or 512)",
        greater_than(0, at_most=MAX_POSITIONS),
    )  # fmt: skip
    leaky_factor: float | None = param(
        None, "k > 1: shifted distances grow by 1/k per token, W + (d - S) / k, as leaky ReRoPE's do, so they stay "
        "inside the trained context past it (default: none, d - S + W)",
        greater_than(1, " (1 is plain STRING's d - S + W)", at_most=MAX_FACTOR),
    )  # fmt: skip
    attention_factor: float = param(
        string.ATTENTION_FACTOR, "cos/sin multiplier (the reference's 0.1 ln 2 + 1; 1 leaves the logits' scale)",
        greater_than(0, at_most=MAX_FACTOR),
    )  # fmt: skip

    def validate(self, model):
        trained = archs.trained_context(model.config)
        if self.shift >= trained:
            raise InvalidParameterError(
                f"string's shift {self.shift} must be below the trained context ({trained}): it replaces distances "
                f"the model was trained on. Use e.g. shift={trained // 3} (the paper's 0.25-0.4 of the context)."
            )
        if self.local_window >= self.shift:
            raise InvalidParameterError(
                f"string needs local_window < shift (shifted pairs see d - shift + local_window, below d); got "
                f"shift={self.shift}, local_window={self.local_window}. Use a smaller local_window, e.g. "
                f"{max(1, self.shift // 8)}."
            )


class ShiftedAttention(GroupedAttention):
    """Self-Extend's hook with STRING's far positions: the query moved back by S - W, the keys where they are."""

    def __init__(self, inv_freq, attention_scaling: float, shift: int, local_window: int, leaky_factor=None):
        super().__init__(inv_freq, attention_scaling, shift, group=None)
        self.local_window, self.leaky_factor = local_window, leaky_factor

    def extra_repr(self) -> str:
        return (f"shift={self.window}, local_window={self.local_window}, leaky_factor={self.leaky_factor}, "
                f"rotary_dim={2 * self.inv_freq.numel()}")  # fmt: skip

    def far_positions(self, q_pos, k_pos):
        return string.far_positions(q_pos, k_pos, self.window, self.local_window, self.leaky_factor)


@register
class String(SelfExtend):
    name = "string"
    summary = "STRING: distances beyond a shift S replaced by well-trained ones, d - S + W (An et al. 2024)"
    Config = StringConfig
    families = (archs.ROTARY,)

    @classmethod
    def defaults(cls, model) -> dict:
        return {"shift": archs.trained_context(model.config) // 3}

    @classmethod
    def candidates(cls, trained, target):
        """The paper's defaults, shift S = trained / 3 and local window W = 128 (at most S / 2); past the trained
        context, YaRN frequencies (``rope_factor``) stretched so that the farthest shifted distance, target - S + W,
        fits in it."""
        shift = max(2, trained // 3)
        window = max(1, min(128, shift // 2))
        factor = (target - shift + window) / trained
        stretch = {"rope_factor": math.ceil(factor * 100) / 100} if factor > 1 else {}
        return [{"shift": shift, "local_window": window, **stretch}]

    def hook(self, inv_freq, attention_scaling):
        c = self.config
        return ShiftedAttention(inv_freq, attention_scaling * c.attention_factor, c.shift, c.local_window,
                                c.leaky_factor)  # fmt: skip
