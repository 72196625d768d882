"""STRING (An et al. 2024, "Why Does the Effective Context Length of LLMs Fall Short?"): shifted rotary positions.

Large relative positions were rare in pretraining and are used poorly; STRING overwrites them with well-trained
ones. A query at position i and a key at j with distance d = i - j below the shift S keep their positions; farther
pairs see d - S + W, a local window W above zero so the shifted diagonal never reads as the query itself. The far
pairs are one RoPE rotation: the query at i - S + W, the key at j. Past the trained context, ``leaky_factor`` k
(ReRoPE's leaky growth, not in the paper) makes the shifted distance W + (d - S) / k, so it stays inside the trained
range without stretching the near distances as YaRN frequencies (``rope_factor``) do.
"""

import math

import torch

from .rerope import leaky_far_positions

ATTENTION_FACTOR = 0.1 * math.log(2) + 1  # the reference's cos/sin multiplier (YaRN's temperature at factor 2)


def far_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, shift: int, local_window: int,
                  leaky_factor: float | None = None):  # fmt: skip
    """The positions ``(..., Lq)`` and ``(..., Lk)`` queries and keys rotate to for pairs at distance >= ``shift``:
    the query at i - S + W; with ``leaky_factor`` k (leaky ReRoPE's growth), the query at i / k + W - S / k and the
    key at j / k, so the shifted distance grows by 1/k per token."""
    if leaky_factor is None:
        return query_positions - shift + local_window, key_positions
    return leaky_far_positions(query_positions, key_positions, shift, local_window, leaky_factor)


def relative_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, shift: int, local_window: int,
                       leaky_factor: float | None = None):  # fmt: skip
    """The relative distance ``(..., Lq, Lk)`` RoPE sees: d = i - j below the shift S, d - S + W from it on, or
    W + (d - S) / k with ``leaky_factor`` k."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]  # (..., Lq, Lk)
    if leaky_factor is None:
        return torch.where(distance < shift, distance, distance - shift + local_window)
    distance = distance.double()
    return torch.where(distance < shift, distance, local_window + (distance - shift) / leaky_factor)
