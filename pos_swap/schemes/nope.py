"""``nope``: no positional signal at all, only the causal mask (the NoPE baseline, Kazemnejad et al. 2023).

With ``layers`` or ``every`` only the chosen attention layers lose their rotation and the others keep the native
RoPE: the interleaved NoPE layers of Llama 4 (iRoPE) and SmolLM3, which make every fourth layer position-free.
"""

import dataclasses

from .. import archs
from ..errors import InvalidParameterError
from ..registry import Scheme, SchemeConfig, greater_than, param, register


def every_kth(num_layers: int, k: int) -> list[int]:
    """Layers ``k-1, 2k-1, ...``: every k-th layer counted from one, the ones Llama 4 and SmolLM3 leave without
    RoPE (their ``(layer_idx + 1) % k == 0``)."""
    return [index for index in range(num_layers) if (index + 1) % k == 0]


@dataclasses.dataclass
class NoPEConfig(SchemeConfig):
    layers: list[int] | None = param(
        None, "only these attention layers (0-based indices) lose their rotation; the others keep RoPE (default: all)"
    )
    every: int | None = param(
        None, "only every k-th layer (k-1, 2k-1, ...: Llama 4 and SmolLM3 use 4) loses its rotation", greater_than(0)
    )

    def validate(self, model):
        if self.layers is None and self.every is None:
            return
        if self.layers is not None and self.every is not None:
            raise InvalidParameterError("nope takes layers or every, not both: give the layer list or the interval.")
        if archs.lookup(model).family != archs.ROTARY:
            raise InvalidParameterError(
                "nope's layers and every need a rotary model: a learned position table is added once, before the "
                "first layer, so no single layer can be made position-free. Drop them to switch the table off."
            )
        count = len(archs.attention_modules(model))
        chosen = self.chosen(count)
        outside = sorted({index for index in chosen if not 0 <= index < count})
        if outside:
            raise InvalidParameterError(
                f"nope's layers name {outside}, but this model has {count} attention layers: 0 to {count - 1}."
            )
        if len(set(chosen)) != len(chosen):
            raise InvalidParameterError(f"nope's layers list a layer twice: {chosen}. Name each layer once.")
        if not chosen:
            fix = f"give every <= {count}" if self.every is not None else "name at least one layer"
            raise InvalidParameterError(f"nope's {self.chosen_by} chooses no layer of this model's {count}: {fix}.")

    @property
    def chosen_by(self) -> str:
        return f"every={self.every}" if self.every is not None else f"layers={self.layers}"

    def chosen(self, count: int) -> list[int]:
        """The layers to make position-free, of ``count``."""
        return every_kth(count, self.every) if self.every is not None else list(self.layers)


@register
class NoPE(Scheme):
    name = "nope"
    summary = "no positions: rotary set to the identity or learned table zeroed (NoPE baseline), or on some layers"
    Config = NoPEConfig
    families = (archs.ROTARY, archs.LEARNED)

    def apply(self, patch) -> None:
        c = self.config
        if c.layers is None and c.every is None:
            patch.remove_positions()
            return
        modules = archs.attention_modules(patch.model)
        patch.remove_rotation([modules[index] for index in c.chosen(len(modules))])
