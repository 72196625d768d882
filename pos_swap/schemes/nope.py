"""``nope``: no positional signal at all, only the causal mask (the NoPE baseline, Kazemnejad et al. 2023)."""

import dataclasses

from .. import archs
from ..registry import Scheme, SchemeConfig, register


@dataclasses.dataclass
class NoPEConfig(SchemeConfig):
    pass


@register
class NoPE(Scheme):
    name = "nope"
    summary = "no positions: rotary set to the identity or learned table zeroed (NoPE baseline)"
    Config = NoPEConfig
    families = (archs.ROTARY, archs.LEARNED)

    def apply(self, patch) -> None:
        patch.remove_positions()
