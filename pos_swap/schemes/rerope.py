"""``rerope``: ReRoPE and leaky ReRoPE (Su 2023), training-free context extension for RoPE models.

Neighbours closer than ``window`` attend with their normal RoPE positions; farther pairs see the relative position
``window`` (ReRoPE) or one growing by 1/``leaky_factor`` per token beyond it (leaky ReRoPE), see
:mod:`pos_swap.functional.rerope`. It is Self-Extend's two-pass attention with other far positions: keys enter the
cache unrotated and each call rotates queries and keys at near and far positions and merges the two score matrices.
"""

import dataclasses
import math

import torch

from .. import archs
from ..functional import rerope
from ..registry import MAX_FACTOR, MAX_POSITIONS, greater_than, param, register
from .self_extend import GroupedAttention, SelfExtend, WindowedConfig


@dataclasses.dataclass
class ReropeConfig(WindowedConfig):
    window: int = param(
        512, "window W: keys closer than W keep their normal positions", greater_than(0, at_most=MAX_POSITIONS)
    )
    leaky_factor: float | None = param(
        None,
        "leaky ReRoPE's k > 1: distances beyond W grow by 1/k per token (default: none, every one is W)",
        greater_than(1, " (1 leaves the model unchanged)", at_most=MAX_FACTOR),
    )


class CappedAttention(GroupedAttention):
    """Self-Extend's hook with ReRoPE's far positions (float, so leaky distances keep their fractions)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, window: int, leaky_factor: float | None):
        super().__init__(inv_freq, attention_scaling, window, group=None)
        self.leaky_factor = leaky_factor

    def extra_repr(self) -> str:
        return f"window={self.window}, leaky_factor={self.leaky_factor}, rotary_dim={2 * self.inv_freq.numel()}"

    def far_positions(self, q_pos, k_pos):
        return rerope.far_positions(q_pos, k_pos, self.window, self.leaky_factor)


@register
class Rerope(SelfExtend):
    name = "rerope"
    summary = "ReRoPE: normal RoPE within a window, relative positions capped (or leaky) beyond it (Su 2023)"
    Config = ReropeConfig
    families = (archs.ROTARY,)

    @classmethod
    def candidates(cls, trained, target):
        """Leaky, then capped, with window W = trained / 2; leaky factor k = 16 (Su's), raised when needed so that
        the farthest distance, W + (target - W) / k, stays within the trained context."""
        window = max(1, trained // 2)
        leaky = max(16, math.ceil((target - window) / max(1, trained - window)))
        return [{"window": window, "leaky_factor": float(leaky)}, {"window": window}]

    def hook(self, inv_freq, attention_scaling):
        return CappedAttention(inv_freq, attention_scaling, self.config.window, self.config.leaky_factor)
