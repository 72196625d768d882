"""``cope``: Contextual Position Encoding (Golovneva et al. 2024) in place of the checkpoint's own positions.

Each attention layer gets a learned table E (npos, head_dim), a parameter of the model: it trains with it and
``save_pretrained`` stores it under ``...<attention>.pos_swap.table``. With ``init="zeros"`` the patched model starts
as NoPE. The paper defines CoPE for causal attention only, so encoders are refused.
"""

import dataclasses

import torch
from torch import nn

from .. import archs
from .. import fused
from ..attention import causal_only, chunked_attention, chunked_backend, first_query_slot, observers_of, sink_logits
from ..errors import InvalidParameterError
from ..functional import cope
from ..registry import Scheme, SchemeConfig, greater_than, param, register

INITS = ("zeros", "normal")


def _known_init(value):
    return None if value in INITS else f"must be one of {', '.join(INITS)}"


@dataclasses.dataclass
class CoPEConfig(SchemeConfig):
    npos: int = param(
        64, "contextual positions counted before clamping (rows of each layer's table)", greater_than(0, at_most=2**17)
    )
    init: str = param("zeros", "table init: 'zeros' (starts as NoPE) or 'normal' (N(0, 0.02))", _known_init)

    def validate(self, model):
        if not archs.is_causal(model):
            raise InvalidParameterError(
                f"cope counts positions over the causal past only (Golovneva et al. 2024); this "
                f"'{model.config.model_type}' model is an encoder. Use alibi, sinusoidal or nope for encoders."
            )


class CoPE(nn.Module):
    """The per-layer attention hook: adds CoPE position logits and computes attention over chunks of rows, or, in
    inference without padding or observers, in :func:`pos_swap.fused.cope_attention`'s cache-sized blocks."""

    def __init__(self, npos: int, head_dim: int, init: str, like: torch.Tensor):
        super().__init__()
        table = torch.zeros(npos, head_dim, dtype=like.dtype, device=like.device)  # (npos, D)
        self.table = nn.Parameter(table.normal_(0.0, 0.02) if init == "normal" else table)

    def extra_repr(self) -> str:
        return f"npos={self.table.shape[0]}, head_dim={self.table.shape[1]}"

    def forward(self, inner, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        first = first_query_slot(attention_mask, query.shape[2], key.shape[2])
        if (
            fused.blocks_apply(module, query, kwargs.get("softcap"), self.table) and causal_only(attention_mask, first)
            and not observers_of(module)  # they are shown the chunked path's probabilities
        ):  # fmt: skip
            return fused.cope_attention(query, key, value, self.table, scaling, first, sink_logits(module)), None

        def logits(rows, cols, q_rows, keys, mask):
            return cope.logits(q_rows, keys, self.table, mask, scaling)  # (B, H, C, W); masked gates: 0

        return chunked_attention(
            module, query, key, value, attention_mask, scaling, logits=logits, dropout=dropout,
            softcap=kwargs.get("softcap"),
        )  # fmt: skip


@register
class CoPEScheme(Scheme):
    name = "cope"
    summary = "CoPE: learned contextual positions (gated key counts) replace the checkpoint's (Golovneva et al. 2024)"
    Config = CoPEConfig
    families = (archs.ROTARY, archs.LEARNED)
    temperature_applies = False  # its positions are counted from gates sigmoid(q . k): a query scale moves them

    def apply(self, patch) -> None:
        model, c = patch.model, self.config
        head_dim = archs.head_dim(model.config)
        patch.remove_positions()
        backend = chunked_backend(model)
        make = lambda module: CoPE(c.npos, head_dim, c.init, next(module.parameters()))  # noqa: E731 - one per layer
        patch.hook_attention(archs.attention_modules(model), make, backend=backend)
