"""Attention sinks (StreamingLLM, Xiao et al. 2024): a query attends to the first S tokens of its sequence (the
sinks) and to the W tokens before it, at positions inside that bounded cache.

Tokens are counted by rank: a token's position among its sequence's real tokens (padding has rank -1). A query of
rank i sees a key of rank j when j <= i and (j < S or i - j <= W): the cache of sinks plus W recent tokens that
StreamingLLM holds when token i arrives. In that cache the query sits at min(i, S + W), a sink at its own rank, and
a recent key as far before the query as it truly is, so no distance exceeds S + W.
"""

import torch


def ranks(valid: torch.Tensor) -> torch.Tensor:
    """Each slot's position among the real tokens of its row, -1 for padding: ``valid (B, L)`` bool -> ``(B, L)``."""
    return torch.where(valid, valid.long().cumsum(-1) - 1, -1)


def visible(query_ranks: torch.Tensor, key_ranks: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    """Which keys each query sees, ``(..., Lq, Lk)`` for ranks ``(..., Lq)`` and ``(..., Lk)``: real, not in the
    future, and a sink or at most ``window`` tokens back. Padding queries see nothing."""
    i, j = query_ranks[..., :, None], key_ranks[..., None, :]
    return (j >= 0) & (j <= i) & ((j < sink_tokens) | (i - j <= window))


def in_window(query_ranks: torch.Tensor, key_ranks: torch.Tensor, window: int) -> torch.Tensor:
    """Which pairs are recent (at most ``window`` tokens apart) and keep their true distance: ``(..., Lq, Lk)``."""
    return query_ranks[..., :, None] - key_ranks[..., None, :] <= window


def cache_query_positions(query_ranks: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    """Where a query sits in the cache when it attends to the sinks: its rank, capped at S + W."""
    return query_ranks.clamp(max=sink_tokens + window)


def relative_positions(query_ranks, key_ranks, sink_tokens: int, window: int) -> torch.Tensor:
    """The distance RoPE sees between each query and key, ``(..., Lq, Lk)``: the true one for recent keys, the
    query's place in the cache minus the sink's rank for sinks (meaningful where :func:`visible`)."""
    near = query_ranks[..., :, None] - key_ranks[..., None, :]
    far = cache_query_positions(query_ranks, sink_tokens, window)[..., :, None] - key_ranks[..., None, :]
    return torch.where(in_window(query_ranks, key_ranks, window), near, far)


def kept_slots(key_ranks: torch.Tensor, real_tokens: torch.Tensor, sink_tokens: int, window: int):
    """What a bounded cache keeps of the slots with ranks ``key_ranks (B, L)`` once each row has seen
    ``real_tokens (B,)``: the sinks and the ``window`` latest real tokens, in slot order. Returns the slot indices
    ``(B, M)`` and their ranks ``(B, M)``; rows that keep fewer than M slots are filled with slots marked -1."""
    keep = (key_ranks >= 0) & ((key_ranks < sink_tokens) | (key_ranks >= real_tokens[:, None] - window))
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    first_kept = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]  # kept slots first
    slots = first_kept.sort(dim=-1).values
    return slots, torch.where(keep.gather(-1, slots), key_ranks.gather(-1, slots), -1)
