"""``sinusoidal``: the original Transformer's fixed sin/cos table in place of a learned one, for any position.

By default the table is scaled to the root mean square of the table it replaces, so the residual stream keeps
its scale; ``factor`` > 1 divides positions (an interpolated table).
"""

import dataclasses
import functools

import torch

from .. import archs
from ..functional import sinusoid
from ..registry import MAX_FACTOR, Scheme, SchemeConfig, greater_than, param, register


@dataclasses.dataclass
class SinusoidalConfig(SchemeConfig):
    base: float = param(10000.0, "wavelength base of the table", greater_than(1, at_most=1e12))
    match_rms: bool = param(True, "scale the table to the RMS of the learned table it replaces")
    factor: float = param(
        1.0, "divide positions by this (interpolated variant; 1 = plain)", greater_than(0, at_most=MAX_FACTOR)
    )


@register
class Sinusoidal(Scheme):
    name = "sinusoidal"
    summary = "fixed sin/cos table (Vaswani et al. 2017) for any position, RMS-matched to the learned one"
    Config = SinusoidalConfig
    families = (archs.LEARNED,)

    def apply(self, patch) -> None:
        c = self.config
        weight = archs.position_table(patch.model).weight
        dim = weight.shape[-1]
        scale = 1.0
        if c.match_rms:
            reference = sinusoid.table(torch.arange(weight.shape[0]), dim, c.base)
            scale = (weight.detach().float().pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()

        patch.replace_table(functools.partial(sinusoid_rows, dim=dim, base=c.base, factor=c.factor, scale=scale))


def sinusoid_rows(table, positions, dim: int, base: float, factor: float, scale: float):
    """The fixed table's rows at ``positions / factor``, times ``scale``, in the learned table's dtype."""
    weight = table.weight
    return (sinusoid.table(positions.to(weight.device) / factor, dim, base) * scale).to(weight.dtype)
