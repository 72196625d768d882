"""``dynamic``: dynamic NTK, native up to the trained context and a base that grows with the length beyond it.

Keys are rotated at attention time, so a generation that grows past the trained context keeps every cached key
consistent with the current base (transformers' own ``dynamic`` keeps keys rotated under the old base).
"""

import dataclasses

from ..functional import rope
from ..registry import register
from .rope_scaling import FollowsLengthConfig, RopeScaling, factor_param


@dataclasses.dataclass
class DynamicConfig(FollowsLengthConfig):
    factor: float = factor_param(2.0)


@register
class Dynamic(RopeScaling):
    name = "dynamic"
    summary = "dynamic NTK: base grows with the current length past the trained context; cache-consistent"
    Config = DynamicConfig
    follows_length = True

    @classmethod
    def candidates(cls, trained, target):
        """Factor target / trained (at least 1.25)."""
        return [{"factor": round(max(target / trained, 1.25), 2)}]

    def per_sequence(self, dim, base, seq_lens):
        return rope.dynamic_ntk_rows(dim, base, self.config.factor, self.original_length, seq_lens)

    def hf_rope_parameters(self, config, slot):
        # transformers uses whole-window frequencies and measures growth from max_position_embeddings
        if self.block is not None or self.original_length != config.max_position_embeddings:
            return None
        return {"rope_type": "dynamic", "factor": self.config.factor}
