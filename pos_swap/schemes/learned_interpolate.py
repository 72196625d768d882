"""``learned-interpolate``: stretch a learned absolute table over ``factor`` times as many positions.

Position p reads the table at p / factor, interpolating linearly between neighbouring rows, so a 1024-position
GPT-2 runs at 4096 with factor 4. The rows stay the model's own parameters (trainable, saved as usual).
"""

import dataclasses
import functools

from .. import archs
from ..functional import learned
from ..registry import MAX_FACTOR, Scheme, SchemeConfig, greater_than, param, register


@dataclasses.dataclass
class LearnedInterpolateConfig(SchemeConfig):
    factor: float = param(
        None, "stretch factor s > 1: the table then covers s times its positions", greater_than(1, at_most=MAX_FACTOR),
        required=True,
    )


@register
class LearnedInterpolate(Scheme):
    name = "learned-interpolate"
    summary = "stretch a learned position table by linear interpolation (GPT-2 at 4x its n_positions)"
    Config = LearnedInterpolateConfig
    families = (archs.LEARNED,)

    @classmethod
    def candidates(cls, trained, target):
        """Factor target / trained (at least 1.25): the stretched table just covers the target."""
        return [{"factor": round(max(target / trained, 1.25), 2)}]

    def apply(self, patch) -> None:
        offset = archs.lookup(patch.model).table_offset
        patch.replace_table(functools.partial(stretched_rows, offset=offset, factor=self.config.factor))


def stretched_rows(table, positions, offset: int, factor: float):
    """Rows at ``positions / factor``; OPT's first ``offset`` rows are not positions, so only the rest are read."""
    return learned.interpolate(table.weight[offset:], positions / factor)
