"""``self-extend``: training-free grouped attention for RoPE models (Jin et al. 2024, "LLM Maybe LongLM").

Neighbours closer than ``window`` attend with their normal RoPE positions; farther keys attend with grouped
positions (:mod:`pos_swap.functional.self_extend`), so no relative distance grows past what the model was trained
on by more than the group factor. The model's rotary becomes the identity, keys enter the KV cache unrotated, and
each call rotates queries and keys twice (neighbour and grouped positions) and merges the two score matrices.
"""

import dataclasses
import warnings

import torch
from torch import nn

from .. import archs, fused
from ..attention import (
    causal_only, chunked_attention, chunked_backend, first_query_slot, notify_blocks, positions, scaled_scores,
    sink_logits,
)  # fmt: skip
from ..errors import InvalidParameterError
from ..functional import rope, self_extend
from ..registry import MAX_FACTOR, MAX_POSITIONS, Scheme, SchemeConfig, greater_than, param, register


@dataclasses.dataclass
class WindowedConfig(SchemeConfig):
    """What the schemes that keep near distances and change far ones share: the frequencies they rotate with."""

    rope_factor: float | None = param(
        None,
        "rotate with YaRN's frequencies and temperature for this factor instead of the model's own (default: none)",
        greater_than(1, " (1 leaves the model's frequencies)", at_most=MAX_FACTOR),
    )


@dataclasses.dataclass
class SelfExtendConfig(WindowedConfig):
    window: int = param(
        512, "neighbour window W: keys closer than W keep their normal positions", greater_than(0, at_most=MAX_POSITIONS)
    )
    group: int = param(
        None,
        "group size G: positions beyond the window are divided by G (e.g. 4 for about 4x the trained context)",
        greater_than(1, " (1 leaves the model unchanged)", at_most=MAX_FACTOR),
        required=True,
    )

    def validate(self, model):
        if self.window % self.group:
            raise InvalidParameterError(
                f"self-extend needs the window divisible by the group so grouped distances continue where the "
                f"window ends; got window={self.window}, group={self.group}. Use a window that is a multiple of "
                f"{self.group}, or a group that divides {self.window}."
            )
        trained = archs.trained_context(model.config)
        if self.window >= trained:
            warnings.warn(
                f"self-extend's window {self.window} covers the whole trained context ({trained}): positions within "
                f"it are unchanged and no grouping happens before {self.window}. Use a window below {trained}, "
                f"e.g. {trained // 4 // self.group * self.group or self.group}.",
                stacklevel=4,
            )


def _slots(query_positions: torch.Tensor) -> bool:
    """Whether the queries' positions follow their cache slots (one apart, as without padding or packing): then
    neighbours are a band of slots and the fused passes apply."""
    return bool((query_positions.diff(dim=-1) == 1).all())


class GroupedAttention(nn.Module):
    """The attention hook of one rotary table: rotates queries and cached keys at neighbour and grouped positions
    and attends with the merged scores (in chunks of query rows, never an L x L tensor per head)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, window: int, group: int):
        super().__init__()
        self.inv_freq = inv_freq  # (F,) float32, the model's own frequencies; a plain tensor so dtype casts skip it
        self.attention_scaling, self.window, self.group = attention_scaling, window, group

    def extra_repr(self) -> str:
        return f"window={self.window}, group={self.group}, rotary_dim={2 * self.inv_freq.numel()}"

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where queries ``(B, Lq)`` and keys ``(B, Lk)`` rotate to for the pairs beyond the window."""
        return self_extend.grouped_positions(q_pos, k_pos, self.window, self.group)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rope.rotate_at(x, positions, self.inv_freq.to(x.device), self.attention_scaling)

    def forward(self, inner, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        heads = query.shape[1]
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        q_pos, k_pos = positions(kwargs, query, key, attention_mask)  # (B, Lq), (B, Lk)
        q_group, k_group = self.far_positions(q_pos, k_pos)
        near_query, near_key = self._rotate(query, q_pos), self._rotate(key, k_pos)  # (B, H, Lq, D), (B, Hkv, Lk, D)
        far_query = self._rotate(query, q_group)
        far_key = near_key if k_group is k_pos else self._rotate(key, k_group)  # STRING keeps the keys in place

        def logits(rows, cols, near_rows, near_cols, mask):
            far_cols = far_key[:, :, cols].repeat_interleave(heads // far_key.shape[1], dim=1)  # (B, H, W, D)
            near = near_rows @ near_cols.transpose(-1, -2)  # (B, H, C, W)
            far = far_query[:, :, rows] @ far_cols.transpose(-1, -2)  # (B, H, C, W)
            neighbours = self_extend.in_window(q_pos[:, rows], k_pos[:, cols], self.window)[:, None]  # (B, 1, C, W)
            return scaled_scores(torch.where(neighbours, near, far), scaling)

        kernel = fused.kernel_for(module, query, kwargs.get("softcap"), dropout=dropout)
        first = first_query_slot(attention_mask, query.shape[2], key.shape[2])
        if kernel is not None and _slots(q_pos) and causal_only(attention_mask, first):  # also a prefill on a cache
            near, far = (near_query, near_key), (far_query, far_key)
            sinks = sink_logits(module)
            output = fused.windowed_attention(kernel, near, far, value, scaling, first, self.window, sinks)
            notify_blocks(module, near_query, near_key, attention_mask, scaling, logits=logits)  # observers, if any
            return output, None
        return chunked_attention(
            module, near_query, near_key, value, attention_mask, scaling, logits=logits, dropout=dropout,
            softcap=kwargs.get("softcap"),
        )  # fmt: skip


@register
class SelfExtend(Scheme):
    name = "self-extend"
    summary = "Self-Extend: normal RoPE within a window, grouped positions beyond it; training-free (Jin et al. 2024)"
    Config = SelfExtendConfig
    families = (archs.ROTARY,)

    @classmethod
    def candidates(cls, trained, target):
        """LongLM's rule for neighbour windows near trained / 8 and trained / 4: the smallest group G >= 2 with
        (trained - W) G + W >= target, W rounded up to a multiple of G (the hook needs it) and below trained."""
        settings = []
        for wanted in (trained // 8, trained // 4):
            setting = self_extend.longlm_setting(trained, target, max(1, wanted))
            if setting is not None and setting not in settings:
                settings.append(setting)
        return settings

    def hook(self, inv_freq: torch.Tensor, attention_scaling: float) -> GroupedAttention:
        """The attention hook of one rotary table with frequencies ``inv_freq``."""
        return GroupedAttention(inv_freq, attention_scaling, self.config.window, self.config.group)

    def rotary(self, slot, model) -> tuple[torch.Tensor, float]:
        """The frequencies and cos/sin scaling the hook rotates with: the model's own, or YaRN's for ``rope_factor``
        (from the default RoPE of the slot's base and the trained context)."""
        if self.config.rope_factor is None:
            return slot.inv_freq.float().clone(), slot.attention_scaling
        base = slot.rope_parameters(model.config)["rope_theta"]
        return rope.yarn(slot.dim, base, self.config.rope_factor, archs.trained_context(model.config))

    def apply(self, patch) -> None:
        model = patch.model
        backend = chunked_backend(model)
        for slot in archs.rotary_slots(model):  # Gemma 3's sliding layers keep their native RoPE
            inv_freq, attention_scaling = self.rotary(slot, model)
            hook = self.hook(patch.tune(inv_freq), attention_scaling)
            patch.set_rotary_identity(slot)  # keys enter the cache unrotated
            patch.hook_attention(archs.attention_modules(model, slot.layer_type), hook, backend=backend)
