"""``dual-chunk``: Dual Chunk Attention (An et al. 2024, ChunkLlama), training-free context extension for RoPE
models.

Queries attend to keys of their own chunk, of the chunk just before and of older chunks with three position
assignments (:mod:`pos_swap.functional.dual_chunk`) that keep every relative distance below ``chunk_size``. The
model's rotary becomes the identity, keys enter the KV cache unrotated, and each call rotates the keys once (at
their place in their chunk) and the queries three times. Without a padding mask, where a kernel applies
(:func:`pos_swap.fused.kernel_for`: the CPU's in inference, flex on CUDA), each chunk of queries attends in at most
three fused passes (:func:`pos_swap.fused.dual_chunk_attention`: own chunk causal, previous chunk, older chunks)
merged by log-sum-exp; otherwise (padding, CPU training, eager weights, a softcap, other devices) the chunked path
merges the three score matrices pair by pair.
"""

import dataclasses

import torch
from torch import nn

from .. import archs, fused
from ..attention import (
    causal_only, chunked_attention, first_query_slot, notify_blocks, positions, scaled_scores, sink_logits,
)  # fmt: skip
from ..errors import InvalidParameterError
from ..functional import dual_chunk, rope
from ..registry import MAX_POSITIONS, greater_than, param, register
from .self_extend import SelfExtend, WindowedConfig, _slots


@dataclasses.dataclass
class DualChunkConfig(WindowedConfig):
    chunk_size: int = param(
        None,
        "c: no relative distance reaches c (e.g. 3/4 of the trained context, as ChunkLlama uses)",
        greater_than(1, at_most=MAX_POSITIONS),
        required=True,
    )
    local_window: int = param(
        None, "w: the first w queries of a chunk see the previous chunk at true distances (chunks are c - w long)",
        greater_than(0, at_most=MAX_POSITIONS), required=True,
    )  # fmt: skip

    def validate(self, model):
        if self.local_window >= self.chunk_size:
            raise InvalidParameterError(
                f"dual-chunk cuts the sequence into chunks of chunk_size - local_window tokens, so it needs "
                f"local_window < chunk_size; got chunk_size={self.chunk_size}, local_window={self.local_window}. "
                f"ChunkLlama uses chunk_size = 3/4 and local_window = 1/16 of the trained context."
            )


def _chunks_on_slots(query_positions: torch.Tensor) -> bool:
    """Whether the queries' positions follow their cache slots and start at one position in every sequence: then
    each chunk is a run of key slots, the same for the whole batch, and the fused passes apply."""
    return _slots(query_positions) and bool((query_positions[:, 0] == query_positions[0, 0]).all())


class DualChunkAttention(nn.Module):
    """The attention hook of one rotary table: keys rotated at their place in their chunk, queries at their
    intra-, successive- and inter-chunk positions, the three scores merged by how many chunks lie between."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, chunk_size: int, local_window: int):
        super().__init__()
        self.inv_freq = inv_freq  # (F,) float32, the model's own frequencies; a plain tensor so dtype casts skip it
        self.attention_scaling, self.chunk_size, self.local_window = attention_scaling, chunk_size, local_window

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, local_window={self.local_window}, rotary_dim={2 * self.inv_freq.numel()}"

    def _rotate(self, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return rope.rotate_at(x, at, self.inv_freq.to(x.device), self.attention_scaling)

    def forward(self, inner, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        sizes = self.chunk_size, self.local_window
        q_pos, k_pos = positions(kwargs, query, key, attention_mask)  # (B, Lq), (B, Lk)
        intra, successive, inter = (self._rotate(query, at) for at in dual_chunk.chunk_query_positions(q_pos, *sizes))

        def logits(rows, cols, q_rows, k_cols, mask):
            apart = dual_chunk.chunks_apart(q_pos[:, rows], k_pos[:, cols], *sizes)[:, None]  # (B, 1, C, W)
            scores = (q[:, :, rows] @ k_cols.transpose(-1, -2) for q in (intra, successive, inter))  # (B, H, C, W)
            return scaled_scores(dual_chunk.pick(apart, *scores), scaling)

        chunk_keys = self._rotate(key, dual_chunk.chunk_key_positions(k_pos, *sizes))  # (B, Hkv, Lk, D)
        kernel = fused.kernel_for(module, query, kwargs.get("softcap"), dropout=dropout)
        first = first_query_slot(attention_mask, query.shape[2], key.shape[2])
        if kernel is not None and _chunks_on_slots(q_pos) and causal_only(attention_mask, first):
            length = self.chunk_size - self.local_window
            output = fused.dual_chunk_attention(
                kernel, intra, successive, inter, chunk_keys, value, scaling, first, int(q_pos[0, 0]), length,
                sinks=sink_logits(module),
            )
            notify_blocks(module, intra, chunk_keys, attention_mask, scaling, logits=logits)  # observers, if any
            return output, None
        return chunked_attention(
            module, intra, chunk_keys, value, attention_mask, scaling, logits=logits, dropout=dropout,
            softcap=kwargs.get("softcap"),
        )  # fmt: skip


@register
class DualChunk(SelfExtend):
    name = "dual-chunk"
    summary = "Dual Chunk Attention: intra-, successive- and inter-chunk positions; training-free (An et al. 2024)"
    Config = DualChunkConfig
    families = (archs.ROTARY,)

    @classmethod
    def candidates(cls, trained, target):
        """ChunkLlama's: chunk_size 3/4 and local_window 1/16 of the trained context."""
        chunk = max(2, trained * 3 // 4)
        return [{"chunk_size": chunk, "local_window": min(chunk - 1, max(1, trained // 16))}]

    def hook(self, inv_freq, attention_scaling):
        return DualChunkAttention(inv_freq, attention_scaling, self.config.chunk_size, self.config.local_window)
