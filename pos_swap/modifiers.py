"""Modifiers: options that compose with every scheme, applied once by the engine (:class:`~pos_swap.registry.
Modifier`), never copied into a scheme's file.

``temperature``: each query row scaled by a factor of its own position (LogN, Llama 4, Scalable-Softmax;
:mod:`pos_swap.functional.temperature`), in pos_swap's attention function before the scheme's hook, so it stacks on
any scheme and a row depends on its own position only: cached generation equals recomputation.

``resonance``: Resonance RoPE's integer wavelengths (:func:`pos_swap.functional.rope.resonance`) on whatever
frequencies the scheme rotates with (its static rotary table, its length-following frequencies, its windowed hook).
"""

import dataclasses

import torch

from . import archs
from .attention import TEMPERATURE, positions
from .errors import IncompatibleSchemeError, InvalidParameterError
from .functional import rope, temperature
from .registry import MAX_POSITIONS, Modifier, SchemeConfig, greater_than, param, register_modifier

RULES = {"logn": "Qwen's LogN", "llama4": "Llama 4's", "ssmax": "Scalable-Softmax"}


def _rule(value):
    return None if value in RULES else f"must be one of {', '.join(RULES)}"


@dataclasses.dataclass
class TemperatureConfig(SchemeConfig):
    temperature: str | None = param(
        None, "attention temperature by query position on top of the scheme: logn (Qwen), llama4 or ssmax "
        "(Scalable-Softmax)", _rule,
    )  # fmt: skip
    temperature_length: int | None = param(
        None, "L of the temperature rule: LogN's trained context, Llama 4's floor scale F, Scalable-Softmax's "
        "s = 1/ln L (default: the trained context)", greater_than(1, at_most=MAX_POSITIONS),
    )  # fmt: skip
    temperature_beta: float | None = param(
        None, "Llama 4's beta: factor 1 + beta ln(floor((p+1)/F) + 1) (default 0.1)", greater_than(0, at_most=100.0)
    )

    def validate(self, model):
        if self.temperature != "llama4" and self.temperature_beta is not None:
            raise InvalidParameterError(
                f"temperature_beta belongs to temperature='llama4', not {self.temperature!r}; drop it or use llama4."
            )
        if self.temperature == "llama4" and self.temperature_beta is None:
            self.temperature_beta = 0.1


class QueryTemperature:
    """Scales each query row ``(B, H, Lq, D)`` by the rule's factor at the row's position (picklable, so a patched
    model still copies and pickles)."""

    def __init__(self, rule: str, length: int, beta: float | None):
        self.rule, self.length, self.beta = rule, length, beta

    def factors(self, query_positions: torch.Tensor) -> torch.Tensor:
        """The factor per query position ``(B, Lq)``, in float64."""
        if self.rule == "logn":
            return temperature.logn(query_positions, self.length)
        if self.rule == "llama4":
            return temperature.llama4(query_positions, self.length, self.beta)
        return temperature.scalable_softmax(query_positions, self.length)

    def __call__(self, query, key, attention_mask, kwargs):
        query_positions, _ = positions(kwargs, query, key, attention_mask)
        return query * self.factors(query_positions)[:, None, :, None].to(query.dtype)


@register_modifier
class Temperature(Modifier):
    name = "temperature"
    summary = "per-row attention temperature by query position (LogN, Llama 4, Scalable-Softmax), on any scheme"
    Config = TemperatureConfig

    @classmethod
    def defaults(cls, model) -> dict:
        return {"temperature_length": archs.trained_context(model.config)}

    def after(self, patch) -> None:
        scheme, model = patch.scheme, patch.model
        if not scheme.temperature_applies:
            raise IncompatibleSchemeError(
                f"temperature scales query rows, but scheme '{scheme.name}' also reads its positions from the "
                f"queries, so the scale would move them too. Use temperature with another scheme."
            )
        if not archs.is_causal(model):
            raise IncompatibleSchemeError(
                f"temperature scales a causal row by the context it reads; this '{model.config.model_type}' model's "
                f"attention is bidirectional (every row reads every key). Use it on a decoder."
            )
        c = self.config
        patch.route_attention()  # the scheme's routing, or the model's own backend through pos_swap's function
        for module in archs.attention_modules(model):
            patch.set(module, TEMPERATURE, QueryTemperature(c.temperature, c.temperature_length, c.temperature_beta))


@dataclasses.dataclass
class ResonanceConfig(SchemeConfig):
    resonance: bool = param(
        False, "Resonance RoPE: round the wavelengths of the planes shorter than resonance_length to integers"
    )
    resonance_length: int | None = param(
        None, "planes with a wavelength below this many tokens are rounded (default: the trained context)",
        greater_than(0, at_most=MAX_POSITIONS),
    )  # fmt: skip


@register_modifier
class Resonance(Modifier):
    name = "resonance"
    summary = "Resonance RoPE: integer wavelengths for the scheme's rotary planes shorter than the trained context"
    Config = ResonanceConfig

    @classmethod
    def defaults(cls, model) -> dict:
        return {"resonance_length": archs.trained_context(model.config)}

    def before(self, patch) -> None:
        patch.frequency_rules.append(self.round_wavelengths)

    def round_wavelengths(self, inv_freq: torch.Tensor) -> torch.Tensor:
        return rope.resonance(inv_freq, self.config.resonance_length)

    def after(self, patch) -> None:
        if not patch.frequencies_tuned:
            raise IncompatibleSchemeError(
                f"resonance rounds rotary wavelengths, but scheme '{patch.scheme.name}' gives this "
                f"'{patch.model.config.model_type}' model no rotary frequencies. Use it with a scheme that sets "
                f"them: yarn, dynamic-yarn, ntk, linear, the windowed schemes, or rope on a learned-position model."
            )
