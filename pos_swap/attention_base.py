"""What pos_swap's attention function (:mod:`pos_swap.attention`) and its fused passes (:mod:`pos_swap.fused`)
both build on: the backend a module is routed to, the memory budget of a block of query rows, and masks cut to
a block. Neither of those modules is imported here, so both can import this one.
"""

import torch

PREFIX = "pos_swap_"  # the attention implementation names pos_swap registers: PREFIX + a transformers backend
SINKS = "_pos_swap_sinks"  # the attribute naming an attention module's learned sink logits (:func:`sink_logits`)
BLOCK_MIB = 64  # memory for the float32 scores of one block of query rows on the blockwise paths


def sink_logits(module) -> torch.Tensor | None:
    """The learned per-head sink logits ``(H,)`` the module's softmax adds as one more column (GPT-OSS's ``sinks``),
    or None: the parameter a patch recorded on the module under :data:`SINKS` (from ``archs.sink_attention``)."""
    name = module.__dict__.get(SINKS)
    return None if name is None else getattr(module, name)


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """``softmax(scores (B, H, C, W))`` over the keys and, with ``sinks (H,)``, one more column of each head's sink
    logit, which is dropped afterwards: the rows then sum to less than 1, as in GPT-OSS's eager attention."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    column = sinks.to(scores.dtype)[:, None, None].expand(*scores.shape[:-1], 1)  # (B, H, C, 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]


def with_sinks(output: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention ``output (B, H, L, D)`` with the log-sum-exp ``lse (B, H, L)`` of its scores, as with learned sink
    logits ``sinks (H,)`` in its softmax: ``output * exp(lse) / (exp(lse) + exp(sink)) = output * sigmoid(lse -
    sink)``. Apply it once per row, after every merge of passes; ``sinks`` None: ``output`` itself."""
    if sinks is None:
        return output
    share = torch.sigmoid(lse - sinks.to(lse.dtype)[:, None])  # (B, H, L)
    return (output.to(share.dtype) * share[..., None]).to(output.dtype)


def backend_of(module) -> str:
    """The transformers backend pos_swap's attention function wraps for ``module``."""
    return (module.config._attn_implementation or "eager").removeprefix(PREFIX)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention scores and their softmax are computed in for inputs of ``dtype``: float64 for float64,
    float32 for every other (half precision included)."""
    return torch.promote_types(dtype, torch.float32)


def rows_per_block(budget_bytes: float, batch: int, heads: int, key_length: int) -> int:
    """How many query rows fit ``budget_bytes`` of float32 scores ``(B, H, rows, Lk)`` (at least one)."""
    return max(1, int(budget_bytes) // (4 * batch * heads * key_length))


def row_indices(rows, device) -> torch.Tensor:
    """Query rows given as a slice or as indices, as indices ``(C,)``."""
    return torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows.to(device)


def additive_mask(attention_mask, module, rows, cols: slice, first_query: int, device):
    """The attention mask's ``rows`` (a slice or indices) x ``cols`` block as an additive float32 tensor ``(B|1, 1, C, W)``, or None.

    ``None`` from transformers means "causal, no padding" for a causal module (sdpa's ``is_causal``, with the
    first query at key slot ``first_query``) and "no mask" otherwise; boolean masks mark allowed keys; float masks
    are additive already. Disallowed entries get the float32 minimum rather than -inf, so a fully masked padding
    row stays finite, as in eager attention.
    """
    floor = torch.finfo(torch.float32).min
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):  # flex's BlockMask
        return torch.where(_allowed_by_block_mask(attention_mask, rows, cols, device), 0.0, floor)
    if attention_mask is None:
        if not getattr(module, "is_causal", True):
            return None
        query_index = row_indices(rows, device)[:, None] + first_query
        allowed = torch.arange(cols.start, cols.stop, device=device)[None, :] <= query_index
        return torch.where(allowed, 0.0, floor)[None, None]
    mask = attention_mask[:, :, rows, cols]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, floor)
    return mask.float().clamp(min=floor)


def _allowed_by_block_mask(block_mask, rows, cols: slice, device) -> torch.Tensor:
    """Which keys ``cols`` the query rows ``rows`` may see under flex's ``block_mask``, asked of its ``mask_mod``
    on broadcast indices (transformers' mask functions are elementwise): boolean ``(B, 1, C, W)``."""
    batch = block_mask.shape[0]
    query_index = row_indices(rows, device)
    if block_mask.mask_mod is None:
        return torch.ones(batch, 1, len(query_index), cols.stop - cols.start, dtype=torch.bool, device=device)
    allowed = block_mask.mask_mod(
        torch.arange(batch, device=device)[:, None, None, None], torch.zeros((), dtype=torch.long, device=device),
        query_index[None, None, :, None], torch.arange(cols.start, cols.stop, device=device)[None, None, None, :],
    )  # fmt: skip
    return allowed.expand(batch, 1, len(query_index), cols.stop - cols.start)
