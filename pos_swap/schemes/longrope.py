"""``longrope``: LongRoPE (Ding et al. 2024), one searched rescale factor per frequency.

``short_factor`` applies while a sequence fits the trained context, ``long_factor`` once it is longer, as in
Phi-3. The switch happens at attention time, so keys cached before it are rotated with the long factors too; per
position (the default), rows within the trained context keep the short factors and later rows take the long ones.
"""

import dataclasses

import torch

from .. import archs
from ..errors import InvalidParameterError
from ..functional import rope
from ..registry import all_positive, param, positive, register
from .rope_scaling import FollowsLengthConfig, RopeScaling, factor_param


@dataclasses.dataclass
class LongRopeConfig(FollowsLengthConfig):
    long_factor: list[float] = param(
        None, "per-frequency rescale factors beyond the trained context (rotary_dim/2 values)", all_positive,
        required=True,
    )  # fmt: skip
    short_factor: list[float] = param(None, "rescale factors within the trained context (default: all 1)", all_positive)
    factor: float = factor_param()
    attention_factor: float | None = param(None, "cos/sin multiplier (default: sqrt(1 + ln s / ln L0))", positive)

    def validate(self, model):
        (expected,) = {slot.dim // 2 for slot in archs.rotary_slots(model)}
        for name in ("long_factor", "short_factor"):
            if len(getattr(self, name)) != expected:
                raise InvalidParameterError(
                    f"longrope's {name} needs one value per rotary frequency: {expected} for this model, "
                    f"got {len(getattr(self, name))}."
                )


@register
class LongRope(RopeScaling):
    name = "longrope"
    summary = "LongRoPE: searched per-frequency factors, short within the trained context and long beyond"
    Config = LongRopeConfig
    follows_length = True

    @classmethod
    def defaults(cls, model):
        dims = {slot.dim for slot in archs.rotary_slots(model)}
        short = [1.0] * (min(dims) // 2) if dims else None
        return {**super().defaults(model), "short_factor": short}

    def per_sequence(self, dim, base, seq_lens):
        c = self.config
        attention = c.attention_factor or rope.longrope_attention_factor(c.factor, self.original_length)
        short, long = (rope.longrope(dim, base, factors, attention, seq_lens.device)[0] for factors in
                       (c.short_factor, c.long_factor))  # fmt: skip
        inv_freq = torch.where((seq_lens > self.original_length)[:, None], long, short)
        return inv_freq, torch.full((len(seq_lens),), attention, device=seq_lens.device)

    def hf_rope_parameters(self, config, slot):
        if self.block is not None:
            return None  # transformers switches factors for the whole window
        params = {k: v for k, v in vars(self.config).items() if v is not None and k not in ("per_position", "block")}
        return {"rope_type": "longrope", **params}
