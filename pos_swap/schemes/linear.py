"""``linear``: position interpolation (Chen et al. 2023), every position divided by the factor."""

import dataclasses

from ..functional import rope
from ..registry import register
from .rope_scaling import RopeScaling, RopeScalingConfig, factor_param


@dataclasses.dataclass
class LinearConfig(RopeScalingConfig):
    factor: float = factor_param()


@register
class Linear(RopeScaling):
    name = "linear"
    summary = "position interpolation: positions / factor (Chen et al. 2023)"
    Config = LinearConfig

    def frequencies(self, dim, base, seq_len=None):
        return rope.linear(dim, base, self.config.factor)

    def hf_rope_parameters(self, config, slot):
        return {"rope_type": "linear", "factor": self.config.factor}
