"""Dual Chunk Attention (An et al. 2024, ChunkLlama): position indices that keep every relative distance below
``chunk_size`` (c), for RoPE models, training-free.

The sequence is cut into chunks of s = c - w tokens (w the local window). A key at j sits at j mod s. A query at i
sits at i mod s against keys of its own chunk (intra-chunk: the true distance i - j), at s + (i mod s) capped at
c - 1 against the chunk just before (successive: the true distance for the first w queries of a chunk), and at
c - 1 against older chunks (inter-chunk).
"""

import torch


def chunk_key_positions(k_pos: torch.Tensor, chunk_size: int, local_window: int) -> torch.Tensor:
    """Every key's position within its chunk, j mod s."""
    return k_pos % (chunk_size - local_window)


def chunk_query_positions(q_pos: torch.Tensor, chunk_size: int, local_window: int):
    """The intra-chunk, successive-chunk and inter-chunk positions of each query (tensors of its shape)."""
    length = chunk_size - local_window
    within = q_pos % length
    return within, (within + length).clamp(max=chunk_size - 1), torch.full_like(q_pos, chunk_size - 1)


def chunks_apart(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_size: int, local_window: int) -> torch.Tensor:
    """How many chunks lie between query and key, ``(..., Lq, Lk)``: 0 intra, 1 successive, 2 or more inter."""
    length = chunk_size - local_window
    return q_pos[..., :, None] // length - k_pos[..., None, :] // length


def pick(apart: torch.Tensor, intra: torch.Tensor, successive: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
    """Per pair, the value of the pass its chunk distance ``apart`` selects (broadcast to ``apart``'s shape)."""
    return torch.where(apart == 0, intra, torch.where(apart == 1, successive, inter))


def relative_positions(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_size: int, local_window: int) -> torch.Tensor:
    """The relative distance ``(..., Lq, Lk)`` RoPE sees under Dual Chunk Attention."""
    intra, successive, inter = (p[..., :, None] for p in chunk_query_positions(q_pos, chunk_size, local_window))
    query = pick(chunks_apart(q_pos, k_pos, chunk_size, local_window), intra, successive, inter)
    return query - chunk_key_positions(k_pos, chunk_size, local_window)[..., None, :]
