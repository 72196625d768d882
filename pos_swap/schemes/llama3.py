"""``llama3``: Llama 3.1's frequency-band scaling (low frequencies divided by the factor, high ones kept)."""

import dataclasses

from ..errors import InvalidParameterError
from ..functional import rope
from ..registry import param, positive, register
from .rope_scaling import RopeScaling, RopeScalingConfig, factor_param


@dataclasses.dataclass
class Llama3Config(RopeScalingConfig):
    factor: float = factor_param(8.0)
    low_freq_factor: float = param(1.0, "wavelengths above L0/low_freq_factor are divided by factor", positive)
    high_freq_factor: float = param(4.0, "wavelengths below L0/high_freq_factor are kept", positive)

    def validate(self, model):
        if self.high_freq_factor <= self.low_freq_factor:
            raise InvalidParameterError(
                f"llama3 needs high_freq_factor > low_freq_factor; got {self.high_freq_factor} <= {self.low_freq_factor}."
            )


@register
class Llama3(RopeScaling):
    name = "llama3"
    summary = "Llama 3.1 scaling: low-frequency band interpolated, high band kept, smooth in between"
    Config = Llama3Config

    def frequencies(self, dim, base, seq_len=None):
        c = self.config
        return rope.llama3(dim, base, c.factor, c.low_freq_factor, c.high_freq_factor, self.original_length)

    def hf_rope_parameters(self, config, slot):
        return {"rope_type": "llama3", **vars(self.config)}
