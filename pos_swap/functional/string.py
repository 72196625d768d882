"""STRING (An et al. 2024, "Why Does the Effective Context Length of LLMs Fall Short?"): shifted rotary positions.

Large relative positions were rare in pretraining and are used poorly; STRING overwrites them with well-trained
ones. A query at position i and a key at j with distance d = i - j below the shift S keep their positions; farther
pairs see d - S + W, a local window W above zero so the shifted diagonal never reads as the query itself. The far
pairs are one RoPE rotation: the query at i - S + W, the key at j.
"""

import math

import torch

ATTENTION_FACTOR = 0.1 * math.log(2) + 1  # the reference's cos/sin multiplier (YaRN's temperature at factor 2)


def far_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, shift: int, local_window: int):
    """The positions ``(..., Lq)`` and ``(..., Lk)`` queries and keys rotate to for pairs at distance >= ``shift``."""
    return query_positions - shift + local_window, key_positions


def relative_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, shift: int, local_window: int):
    """The relative distance ``(..., Lq, Lk)`` RoPE sees: d = i - j below the shift S, d - S + W from it on."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]  # (..., Lq, Lk)
    return torch.where(distance < shift, distance, distance - shift + local_window)
