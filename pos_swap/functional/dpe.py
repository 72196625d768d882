"""DPE (Lu et al. 2025, "Effective Length Extrapolation via Dimension-Wise Positional Embeddings Manipulation"):
Self-Extend with a group size per group of rotary planes.

The rotary planes (highest frequency first) are split into equal groups, each with its own Self-Extend group size
G_p. A query at position i and a key at j closer than the window W keep their positions in every plane; farther
pairs see, in plane p, the grouped positions i // G_p + W - W // G_p and j // G_p. The far score is still one dot
product: q and k rotated plane by plane to those positions. A group size of 1 keeps a group's true distances.
"""

import torch

from . import self_extend


def plane_group_sizes(groups, planes: int) -> torch.Tensor:
    """The group size of each of ``planes`` rotary planes ``(F,)``: the planes split into ``len(groups)`` equal
    consecutive groups, the first (highest frequencies) taking ``groups[0]``."""
    return torch.tensor(groups, dtype=torch.long).repeat_interleave(planes // len(groups))


def far_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, plane_sizes: torch.Tensor):
    """Per-plane positions ``(..., Lq, F)`` and ``(..., Lk, F)`` queries and keys rotate to for the pairs at
    distance >= ``window``, for group sizes ``plane_sizes (F,)``."""
    return self_extend.grouped_positions(query_positions[..., None], key_positions[..., None], window, plane_sizes)


def relative_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, groups, planes: int):
    """The relative distance ``(..., Lq, Lk, F)`` each rotary plane sees: i - j inside the window, that plane's
    grouped distance outside."""
    sizes = plane_group_sizes(groups, planes)
    grouped_query, grouped_key = far_positions(query_positions, key_positions, window, sizes)
    near = (query_positions[..., :, None] - key_positions[..., None, :])[..., None]  # (..., Lq, Lk, 1)
    far = grouped_query[..., :, None, :] - grouped_key[..., None, :, :]  # (..., Lq, Lk, F)
    inside = self_extend.in_window(query_positions, key_positions, window)[..., None]  # (..., Lq, Lk, 1)
    return torch.where(inside, near, far)
