"""``yarn`` and ``dynamic-yarn``: YaRN (Peng et al. 2023), frequency-dependent interpolation plus temperature.

``dynamic-yarn`` lets the factor follow the length: native up to the trained context L0, factor L / L0 beyond.
"""

import dataclasses

import torch

from ..errors import InvalidParameterError
from ..functional import rope
from ..registry import MAX_FACTOR, greater_than, param, positive, register
from .rope_scaling import FollowsLengthConfig, RopeScaling, RopeScalingConfig, factor_param


@dataclasses.dataclass
class YarnRampConfig(RopeScalingConfig):
    beta_fast: float = param(32.0, "rotations over the trained context above which frequencies are kept", positive)
    beta_slow: float = param(1.0, "rotations below which frequencies are fully interpolated", positive)
    truncate: bool = param(True, "round the ramp bounds to whole dimensions, as the paper's code does")

    def validate(self, model):
        if self.beta_fast <= self.beta_slow:
            raise InvalidParameterError(
                f"yarn needs beta_fast > beta_slow (fast rotations are kept, slow ones interpolated); "
                f"got beta_fast={self.beta_fast}, beta_slow={self.beta_slow}."
            )


@dataclasses.dataclass
class YarnConfig(YarnRampConfig):
    factor: float = factor_param()
    attention_factor: float | None = param(None, "cos/sin multiplier (default: 0.1 ln(factor) + 1)", positive)
    mscale: float | None = param(None, "DeepSeek-style mscale (with mscale_all_dim)", positive)
    mscale_all_dim: float | None = param(None, "DeepSeek-style mscale_all_dim (with mscale)", positive)


@register
class Yarn(RopeScaling):
    name = "yarn"
    summary = "YaRN: ramp between interpolated and original frequencies, plus attention temperature"
    Config = YarnConfig

    @classmethod
    def candidates(cls, trained, target):
        """Factors s, 1.5 s and 2 s for s = target / trained (at least 1.25)."""
        ratio = max(target / trained, 1.25)
        return [{"factor": round(ratio * m, 2)} for m in (1.0, 1.5, 2.0)]

    def frequencies(self, dim, base, seq_len=None):
        c = self.config
        return rope.yarn(
            dim, base, c.factor, self.original_length, c.beta_fast, c.beta_slow,
            c.attention_factor, c.mscale, c.mscale_all_dim, c.truncate,
        )  # fmt: skip

    def hf_rope_parameters(self, config, slot):
        optional = ("attention_factor", "mscale", "mscale_all_dim")
        params = {k: v for k, v in vars(self.config).items() if v is not None or k not in optional}
        return {"rope_type": "yarn", **params}


@dataclasses.dataclass
class DynamicYarnConfig(YarnRampConfig, FollowsLengthConfig):
    max_factor: float | None = param(
        None, "upper bound for the factor, > 1 (default: none)",
        greater_than(1, " (a factor below 1 would compress positions inside the trained context too)", at_most=MAX_FACTOR),
    )  # fmt: skip
    mscale: float = param(
        1.0, "temperature coefficient: cos/sin multiplier 0.1 mscale ln(s) + 1 at factor s (YaRN's is 1)", positive
    )


@register
class DynamicYarn(RopeScaling):
    name = "dynamic-yarn"
    summary = "YaRN whose factor follows the length: native up to the trained context, L/L0 beyond"
    Config = DynamicYarnConfig
    follows_length = True

    @classmethod
    def candidates(cls, trained, target):
        """Its defaults (per-position frequencies), then whole-window ones (``per_position=False``)."""
        return [{}, {"per_position": False}]

    def per_sequence(self, dim, base, seq_lens):
        c = self.config
        factors = (seq_lens.double() / self.original_length).clamp(min=1.0, max=c.max_factor)
        scaled = rope.yarn_rows(dim, base, factors, self.original_length, c.beta_fast, c.beta_slow, c.truncate)
        native = rope.default_inv_freq(dim, base, seq_lens.device).expand_as(scaled)
        inv_freq = torch.where(factors[:, None] > 1, scaled, native)  # exactly native inside the trained context
        return inv_freq, rope.yarn_mscale_rows(factors, c.mscale).float()
