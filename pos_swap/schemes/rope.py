"""``rope``: rotary positions on a model trained with a learned absolute table (GPT-2, OPT, BERT).

The table is switched off and queries and keys are rotated at attention time (keys enter the cache unrotated),
with a chosen base and rotary fraction. A RoPE-scaling rule of the core family can stretch it further.
"""

import dataclasses
import functools

import torch

from .. import archs
from ..attention import DeferredRotation
from ..errors import InvalidParameterError
from ..functional import rope
from ..registry import Scheme, SchemeConfig, get_scheme, greater_than, param, register

SCALINGS = ("linear", "ntk", "dynamic", "yarn", "dynamic-yarn", "llama3")


def _fraction(value):
    return None if 0 < value <= 1 else "must be in (0, 1]"


@dataclasses.dataclass
class RopeConfig(SchemeConfig):
    base: float = param(10000.0, "RoPE base theta", greater_than(1, at_most=1e12))
    fraction: float = param(1.0, "share of each head's features that rotate (GPT-NeoX style partial rotary)", _fraction)
    scaling: str | None = param(None, f"a RoPE-scaling rule on top: one of {', '.join(SCALINGS)}")
    scaling_params: dict | None = param(None, 'parameters of that rule, e.g. {"factor": 4.0}')

    def validate(self, model):
        if self.scaling is not None and self.scaling not in SCALINGS:
            raise InvalidParameterError(f"rope's scaling must be one of {', '.join(SCALINGS)}; got {self.scaling!r}.")
        if self.scaling_params and self.scaling is None:
            raise InvalidParameterError("rope got scaling_params but no scaling; name the rule, e.g. scaling='yarn'.")
        if rotary_dim(model, self.fraction) < 2:
            raise InvalidParameterError(f"rope's fraction {self.fraction} rotates no feature pair of this model's heads.")


def rotary_dim(model, fraction: float) -> int:
    return int(archs.head_dim(model.config) * fraction) // 2 * 2


@register
class Rope(Scheme):
    name = "rope"
    summary = "rotary positions on a learned-position model (table off), optional RoPE scaling on top"
    Config = RopeConfig
    families = (archs.LEARNED,)

    def apply(self, patch) -> None:
        c, model = self.config, patch.model
        scaling = get_scheme(c.scaling).configure(model, c.scaling_params or {}) if c.scaling else None
        patch.remove_positions()
        dim = rotary_dim(model, c.fraction)
        frequencies = patch.tuned(functools.partial(self._frequencies, scaling, dim))
        hook = scaling.rotation(frequencies) if scaling else DeferredRotation(frequencies)
        backend = scaling.backend(model) if scaling else None
        patch.hook_attention(archs.attention_modules(model), hook, backend=backend)

    def causal_consistent(self) -> bool:
        """As the scaling rule on top (plain rotary positions are)."""
        if self.config.scaling is None:
            return True
        rule = get_scheme(self.config.scaling)
        return rule(rule.Config(**(self.config.scaling_params or {}))).causal_consistent()

    def _frequencies(self, scaling, dim: int, seq_lens: torch.Tensor):
        if scaling is not None:
            return scaling.per_sequence(dim, self.config.base, seq_lens)
        inv_freq = rope.default_inv_freq(dim, self.config.base, seq_lens.device)
        return inv_freq.expand(len(seq_lens), -1), torch.ones(len(seq_lens), device=seq_lens.device)
