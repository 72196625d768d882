"""``alibi``: linear attention biases (Press et al. 2022) in place of the checkpoint's own positions.

Each head adds -slope * (i - j) to its logits (or -slope * |i - j| for encoders). The bias never exists as an
L x L tensor per head on the long path: with flex_attention it is a ``score_mod`` inside the kernel; with eager
or sdpa it is built for a chunk of query rows at a time.
"""

import dataclasses

import torch
from torch import nn

from .. import archs, fused
from ..attention import (
    backend_of, chunked_attention, chunked_backend, first_query_slot, notify_blocks, observers_of, positions,
    sink_logits,
)  # fmt: skip
from ..attention_base import BLOCK_MIB, score_dtype
from ..errors import InvalidParameterError
from ..functional import alibi
from ..registry import Scheme, SchemeConfig, greater_than, param, register


@dataclasses.dataclass
class AlibiConfig(SchemeConfig):
    slopes: list[float] | None = param(None, "one slope per head (default: the paper's geometric slopes)", None)
    trainable: bool = param(False, "make the slopes trainable parameters, one set per layer")
    symmetric: bool | None = param(None, "-slope*|i-j| for both directions (default: True for encoders)")
    chunk_mib: int = param(
        BLOCK_MIB, "memory for the bias of one chunk of query rows (eager / sdpa)", greater_than(0, at_most=2**20)
    )

    def validate(self, model):
        heads = model.config.num_attention_heads
        if self.slopes is not None and len(self.slopes) != heads:
            raise InvalidParameterError(
                f"alibi needs one slope per attention head: {heads} for this model, got {len(self.slopes)}."
            )


class AlibiBias(nn.Module):
    """The per-layer attention hook: adds the ALiBi bias on the way to the backend."""

    def __init__(self, slopes: torch.Tensor, trainable: bool, symmetric: bool, chunk_mib: int):
        super().__init__()
        if trainable:
            self.slopes = nn.Parameter(slopes.clone())
        else:
            self.register_buffer("slopes", slopes.clone(), persistent=False)
        self.symmetric, self.chunk_mib = symmetric, chunk_mib

    def extra_repr(self) -> str:
        return f"heads={self.slopes.numel()}, symmetric={self.symmetric}, trainable={self.slopes.requires_grad}"

    def forward(self, inner, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        sinks = sink_logits(module)  # learned sink logits (GPT-OSS), which the folded and chunked paths add
        if backend_of(module) == "flex_attention" and not observers_of(module):  # observers need the chunked path
            shift = first_query_slot(attention_mask, query.shape[2], key.shape[2])
            return self._flex(query, key, value, attention_mask, scaling, shift)
        q_pos, k_pos = positions(kwargs, query, key, attention_mask)

        def bias(rows, cols):
            return alibi.bias(q_pos[:, rows], k_pos[:, cols], self.slopes, self.symmetric, score_dtype(query.dtype))

        attend = fused.folded_attend_for(
            module, query, kwargs.get("softcap"), self.slopes, dropout=dropout, sinks=sinks is not None
        )
        if attend is not None and getattr(module, "is_causal", True):
            first = first_query_slot(attention_mask, query.shape[2], key.shape[2])
            output = fused.alibi_attention(
                attend, query, key, value, self.slopes, q_pos, k_pos, scaling, first_query=first, mask=attention_mask,
                sinks=sinks,
            )
            notify_blocks(module, query, key, attention_mask, scaling, bias=bias)  # observers, if any
            return output, None

        return chunked_attention(
            module, query, key, value, attention_mask, scaling, bias=bias, dropout=dropout,
            softcap=kwargs.get("softcap"), budget_mib=self.chunk_mib,
        )  # fmt: skip

    def _flex(self, query, key, value, block_mask, scaling, shift):
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        slopes, symmetric = self.slopes.float(), self.symmetric
        shift = torch.tensor(shift, device=query.device)  # a tensor, so decode steps reuse the compiled kernel

        def score_mod(score, batch_idx, head_idx, q_idx, kv_idx):
            distance = (q_idx + shift - kv_idx).float()
            return score - slopes[head_idx] * (distance.abs() if symmetric else distance)

        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        output = compile_friendly_flex_attention(
            query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, training=self.training
        )
        return output.transpose(1, 2).contiguous(), None


@register
class Alibi(Scheme):
    name = "alibi"
    summary = "ALiBi: per-head linear distance bias replaces the checkpoint's positions (Press et al. 2022)"
    Config = AlibiConfig
    families = (archs.ROTARY, archs.LEARNED)

    def apply(self, patch) -> None:
        model, c = patch.model, self.config
        dtype = score_dtype(model.dtype)  # float64 slopes for a float64 model, float32 otherwise
        slopes = torch.tensor(c.slopes, dtype=dtype) if c.slopes else alibi.slopes(model.config.num_attention_heads, dtype)
        symmetric = (not archs.is_causal(model)) if c.symmetric is None else c.symmetric
        patch.remove_positions()
        if c.trainable:
            make = lambda module: AlibiBias(slopes, True, symmetric, c.chunk_mib)  # noqa: E731 - one set per layer
        else:
            make = AlibiBias(slopes, False, symmetric, c.chunk_mib)
        # flex's score_mod cannot add learned sink logits (GPT-OSS), and flash-attn kernels take no additive bias
        # through transformers: such models run the folded passes on sdpa (its flash or efficient kernel on CUDA)
        reroute = archs.sink_attention(model) or backend_of(model.base_model).startswith("flash")
        backend = chunked_backend(model) if reroute else None
        patch.hook_attention(archs.attention_modules(model), make, backend=backend)
