"""ReRoPE and leaky ReRoPE (Su 2023, "Rectified Rotary Position Embeddings"): relative positions capped at a window.

A query at position i and a key at j closer than the window W (i - j < W) keep their own positions. Farther pairs
see the relative position W (ReRoPE) or W + (i - j - W) / k (leaky ReRoPE with ``leaky_factor`` k), so no distance
grows past the trained range. Both are one RoPE rotation of the query and key at far positions: q at
i / k + W (1 - 1 / k), k at j / k (ReRoPE is the limit k -> infinity: q at W, k at 0).
"""

import torch


def far_positions(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, leaky_factor: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float positions ``(..., Lq)`` and ``(..., Lk)`` queries and keys rotate to for pairs beyond the window."""
    if leaky_factor is None:
        return torch.full_like(query_positions, window, dtype=torch.float32), torch.zeros_like(key_positions, dtype=torch.float32)
    return leaky_far_positions(query_positions, key_positions, window, window, leaky_factor)


def leaky_far_positions(
    query_positions: torch.Tensor, key_positions: torch.Tensor, start: int, offset: int, leaky_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Far positions for pairs whose distance d >= ``start`` is seen as ``offset`` + (d - start) / k: the query at
    i / k + offset - start / k, the key at j / k (float). Leaky ReRoPE has start = offset = W; leaky STRING has
    start = S, offset = W."""
    grown = 1.0 / leaky_factor
    return query_positions.float() * grown + (offset - start * grown), key_positions.float() * grown


def relative_positions(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, leaky_factor: float | None = None
) -> torch.Tensor:
    """The relative distance ``(..., Lq, Lk)`` RoPE sees: i - j inside the window, W or W + (i - j - W) / k beyond."""
    distance = (query_positions[..., :, None] - key_positions[..., None, :]).double()  # (..., Lq, Lk)
    far = window if leaky_factor is None else window + (distance - window) / leaky_factor
    return torch.where(distance < window, distance, far)
