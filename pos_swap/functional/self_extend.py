"""Self-Extend (Jin et al. 2024): grouped attention positions that keep every relative distance within the range a
RoPE model was trained on.

A query at position i and a key at position j closer than the window W (i - j < W) keep their own positions.
Farther pairs use grouped positions, i // G + W - W // G for the query and j // G for the key: distances beyond
the window shrink G times and, when G divides W, start at W exactly where the neighbour window ends.
"""

import math

import torch


def grouped_positions(query_positions, key_positions, window: int, group: int):
    """Self-Extend's grouped query and key positions (tensors or ints, any shape)."""
    return query_positions // group + window - window // group, key_positions // group


def in_window(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Which pairs keep their own positions: i - j < W, as a boolean ``(..., Lq, Lk)`` for positions
    ``(..., Lq)`` and ``(..., Lk)``."""
    return query_positions[..., :, None] - key_positions[..., None, :] < window


def relative_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, group: int):
    """The merged relative distance ``(..., Lq, Lk)`` RoPE sees: i - j inside the window, the grouped distance
    outside."""
    grouped_query, grouped_key = grouped_positions(query_positions, key_positions, window, group)
    near = query_positions[..., :, None] - key_positions[..., None, :]  # (..., Lq, Lk)
    far = grouped_query[..., :, None] - grouped_key[..., None, :]  # (..., Lq, Lk)
    return torch.where(in_window(query_positions, key_positions, window), near, far)


def longlm_setting(trained: int, target: int, window: int) -> dict | None:
    """LongLM's rule for a neighbour window near ``window``: the smallest group G >= 2 with (trained - W) G + W >=
    target, W rounded up to a multiple of G; ``{"window": W, "group": G}``, or None when no W below ``trained``
    satisfies it."""
    while 0 < window < trained:
        group = max(2, math.ceil((target - window) / (trained - window)))
        rounded = math.ceil(window / group) * group
        if rounded == window:
            return {"window": window, "group": group}
        window = rounded
    return None
