"""``p-rope``: only the highest fraction ``p`` of rotary frequencies rotate; the lowest planes carry no position
(Barbero et al. 2024, "Round and round we go! What makes Rotary Positional Encodings useful?", ICLR 2025).

A static change of the model's own frequencies (those of a scaled checkpoint included): written into the rotary
module once, so it runs on every backend and cache at no cost. On Gemma 3 it changes the global (full-attention)
layers and leaves the sliding-window ones rotating, as Gemma 4 uses it (p = 0.25 there). Not training-free: the
paper trains with it.
"""

import dataclasses

from .. import archs
from ..errors import InvalidParameterError
from ..functional import rope
from ..registry import Scheme, SchemeConfig, param, register


def _fraction(value):
    if value == 0:
        return "must be in (0, 1]: p = 0 rotates no plane, which is the 'nope' scheme (--scheme nope)"
    return None if 0 < value <= 1 else "must be in (0, 1] (1 is the native RoPE)"


@dataclasses.dataclass
class PRopeConfig(SchemeConfig):
    p: float = param(
        None, "fraction of rotary planes that keep rotating, the highest frequencies (floor(p * planes) of them)",
        _fraction, required=True,
    )  # fmt: skip

    def validate(self, model):
        planes = min(slot.dim // 2 for slot in archs.rotary_slots(model))
        if rope.p_rope_planes(planes, self.p) == 0:
            raise InvalidParameterError(
                f"p-rope's p={self.p} rotates floor(p * {planes}) = 0 of this model's {planes} rotary planes, which "
                f"is the 'nope' scheme: use --scheme nope, or p >= {1 / planes:.4g}."
            )


@register
class PRope(Scheme):
    name = "p-rope"
    summary = "p-RoPE: only the highest fraction p of rotary frequencies rotate, the lowest planes carry no position"
    Config = PRopeConfig
    families = (archs.ROTARY,)

    def apply(self, patch) -> None:
        for slot in archs.rotary_slots(patch.model):
            patch.set_rotary(slot, rope.p_rope(slot.inv_freq, self.config.p), slot.attention_scaling)

    def hf_rope_parameters(self, config, slot):
        """transformers' ``proportional`` rope type (Gemma 4) computes the same frequencies for a checkpoint with
        plain RoPE over whole heads."""
        native = slot.rope_parameters(config)
        whole_heads = slot.dim == archs.head_dim(config) and native.get("partial_rotary_factor", 1.0) == 1.0
        if native.get("rope_type", "default") != "default" or not whole_heads:
            return None
        return {"rope_type": "proportional", "partial_rotary_factor": self.config.p}
