"""``ntk``: NTK-aware scaling, a larger RoPE base so low frequencies stretch and high ones stay (bloc97)."""

import dataclasses

from ..functional import rope
from ..registry import register
from .rope_scaling import RopeScaling, RopeScalingConfig, factor_param


@dataclasses.dataclass
class NTKConfig(RopeScalingConfig):
    factor: float = factor_param()


@register
class NTK(RopeScaling):
    name = "ntk"
    summary = "NTK-aware base change: base * factor^(d/(d-2)), no fine-tuning needed (bloc97)"
    Config = NTKConfig

    def frequencies(self, dim, base, seq_len=None):
        return rope.ntk(dim, base, self.config.factor)

    def hf_rope_parameters(self, config, slot):
        dim, base = slot.dim, slot.rope_parameters(config)["rope_theta"]
        return {"rope_type": "default", "rope_theta": rope.ntk_base(base, self.config.factor, dim)}
