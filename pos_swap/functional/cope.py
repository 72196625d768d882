"""CoPE (Golovneva et al. 2024, "Contextual Position Encoding: Learning to Count What's Important").

A query counts the keys it finds relevant: gate g_ij = sigmoid(score_ij), position p_ij = sum_{t=j..i} g_it, and a
learned table E (npos, head_dim) turns fractional positions into logits by interpolating q . E[floor(p)] and
q . E[ceil(p)]. As in the paper's code, the gates use the scaled scores q . k / sqrt(d). Unlike its code, the
position logits get the same 1/sqrt(d) factor as q . k, so both terms sit on one scale whatever the head size; for a
learned E the factor only rescales E (zeros stay zeros).
"""

import torch


def positions(gates: torch.Tensor, npos: int) -> torch.Tensor:
    """Contextual positions ``(..., Lq, Lk)``: the sum of the gates from key j to the last key (masked gates are 0,
    so for a causal query that is j..i), clamped to ``npos - 1``."""
    return gates.flip(-1).cumsum(-1).flip(-1).clamp(max=npos - 1)


def interpolate(logits_int: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The logit ``(..., Lq, Lk)`` at fractional positions ``pos`` from the per-integer logits ``(..., Lq, npos)``:
    w * logits_int[ceil(p)] + (1 - w) * logits_int[floor(p)], w = p - floor(p)."""
    floor = pos.floor()
    weight = pos - floor  # (..., Lq, Lk)
    low = logits_int.gather(-1, floor.long())  # (..., Lq, Lk)
    high = logits_int.gather(-1, pos.ceil().long())  # (..., Lq, Lk)
    return weight * high + (1 - weight) * low


def logits(query, key, table, mask, scaling: float) -> torch.Tensor:
    """Attention logits ``(B, H, Lq, Lk)`` in float32 (float64 for float64 inputs): scaled q . k plus the CoPE
    position logit.

    query ``(B, H, Lq, D)``, key ``(B, H, Lk, D)``, table ``(npos, D)``; ``mask`` is additive ``(B|1, 1, Lq, Lk)``
    (0 where allowed, a huge negative number elsewhere) or None when every key is allowed.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    scores = (query @ key.transpose(-1, -2)).to(dtype) * scaling  # (B, H, Lq, Lk)
    gates = torch.sigmoid(scores if mask is None else scores + mask)  # (B, H, Lq, Lk), 0 where masked
    logits_int = (query.to(dtype) @ table.to(dtype).T) * scaling  # (B, H, Lq, npos)
    return scores + interpolate(logits_int, positions(gates, table.shape[0]))
