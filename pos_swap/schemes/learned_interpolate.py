"""``learned-interpolate``: stretch a learned absolute table over ``factor`` times as many positions.

Position p reads the table at p / factor, interpolating linearly between neighbouring rows, so a 1024-position
GPT-2 runs at 4096 with factor 4. The rows stay the model's own parameters (trainable, saved as usual).
"""

import dataclasses

from .. import archs
from ..functional import learned
from ..registry import Scheme, SchemeConfig, greater_than, param


@dataclasses.dataclass
class LearnedInterpolateConfig(SchemeConfig):
    factor: float = param(
        None, "stretch factor s > 1: the table then covers s times its positions", greater_than(1), required=True
    )


class LearnedInterpolate(Scheme):
    name = "learned-interpolate"
    summary = "stretch a learned position table by linear interpolation (GPT-2 at 4x its n_positions)"
    Config = LearnedInterpolateConfig
    families = (archs.LEARNED,)

    def apply(self, patch) -> None:
        table = archs.position_table(patch.model)
        offset = archs.lookup(patch.model).table_offset
        # OPT's first rows are not positions: read the positional rows only
        patch.replace_table(lambda positions: learned.interpolate(table.weight[offset:], positions / self.config.factor))
