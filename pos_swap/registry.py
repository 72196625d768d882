"""Schemes and their configs: the base classes every positional scheme builds on, and the look-up by name.

A scheme is one class: a ``Config`` dataclass whose fields carry help text and checks, the positional families
it can patch, and ``apply(patch)`` which makes its changes through the patch handle so they can be undone.
Each scheme module registers its class with :func:`register`; importing ``pos_swap.schemes`` loads them all.
"""

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any, Callable, ClassVar

from .errors import IncompatibleSchemeError, InvalidParameterError, UnknownSchemeError, did_you_mean


def param(default: Any = None, help: str = "", check: Callable[[Any], str | None] | None = None, required=False):
    """A config field with help text (shown by ``pos-swap schemes``), a check returning an error or None, and
    whether the user must give it."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "required": required})


MAX_FACTOR = 2**16  # a context extension beyond this leaves float32 frequencies and positions meaningless
MAX_POSITIONS = 2**24  # positions (contexts, windows) one run can hold


def greater_than(bound: float, why: str = "", at_most: float | None = None):
    """A check for ``bound < value`` (and ``value <= at_most``: every parameter is bounded to what can run)."""

    def check(value):
        if not value > bound:
            return f"must be > {bound}{why}"
        if at_most is not None and value > at_most:
            return f"must be at most {at_most:.12g} (larger values cannot run)"
        return None

    return check


def positive(value):
    return None if value > 0 else "must be > 0"


def all_positive(values):
    return None if all(v > 0 for v in values) else "must hold only values > 0"


@dataclasses.dataclass
class SchemeConfig:
    """Base of every scheme's config; subclasses add fields made with :func:`param`."""

    def validate(self, model) -> None:
        """Cross-field and model-dependent checks; raise :class:`InvalidParameterError`."""


def _matches(value, annotation) -> bool:
    """Whether ``value`` fits a simple annotation (float, int, bool, str, list[float], X | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if annotation is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _finite(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def build_config(owner: str, config_class, params: dict, defaults: dict, model) -> SchemeConfig:
    """``config_class`` from ``params`` over ``defaults``, after checking names, types, finiteness and ranges, then
    its ``validate(model)``. ``owner`` names whose parameters they are in errors (``"scheme 'yarn'"``)."""
    owner_of, owner = owner, owner[0].upper() + owner[1:]
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for key in params:
        if key not in fields:
            raise InvalidParameterError(
                f"{owner} has no parameter '{key}'.{did_you_mean(key, fields)} Its parameters: {', '.join(fields) or 'none'}."
            )
    values = {**defaults, **{k: v for k, v in params.items() if v is not None}}
    for name, field in fields.items():
        if field.metadata["required"] and values.get(name) is None:
            raise InvalidParameterError(f"{owner} needs parameter '{name}': {field.metadata['help']}")
    hints = typing.get_type_hints(config_class)
    for key, value in values.items():
        type_name = getattr(hints[key], "__name__", str(hints[key]))
        if not _matches(value, hints[key]):
            raise InvalidParameterError(f"Parameter '{key}' of {owner_of} must be {type_name}, got {reprlib.repr(value)}.")
        if not _finite(value):
            raise InvalidParameterError(f"Parameter '{key}' of {owner_of} must be finite, got {reprlib.repr(value)}.")
        problem = value is not None and fields[key].metadata["check"] and fields[key].metadata["check"](value)
        if problem:
            raise InvalidParameterError(f"Parameter '{key}' of {owner_of} {problem}; got {reprlib.repr(value)}.")
    config = config_class(**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
    config.validate(model)
    return config


class Configured:
    """What schemes and modifiers share: a name, a summary, a ``Config`` dataclass of parameters, and the config
    an instance was made with."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[SchemeConfig]]

    def __init__(self, config: SchemeConfig):
        self.config = config

    @classmethod
    def defaults(cls, model) -> dict:
        """Values that depend on the model, used where the user gave none (e.g. the trained context)."""
        return {}

    @classmethod
    def parameters(cls) -> list[tuple[str, str, Any, bool]]:
        """(name, help, default, required) for each parameter."""
        return config_parameters(cls.Config)


class Scheme(Configured):
    """A positional scheme. Subclasses set ``name``, ``summary``, ``Config``, ``families`` and ``apply``."""

    families: ClassVar[tuple[str, ...]]  # positional families (archs.ROTARY, ...) this scheme can patch
    # whether scaling a query row scales only its logits (a temperature): False where the query also decides the
    # positions (CoPE's gates), so the attention-temperature modifier would change more than the temperature
    temperature_applies: ClassVar[bool] = True

    @classmethod
    def candidates(cls, trained: int, target: int) -> list[dict]:
        """The settings ``pos-swap recommend`` measures for a model trained on ``trained`` tokens and used at
        ``target``, by a rule the scheme's docstring states; the first is the one a ``--quick`` run keeps. A scheme
        that needs training, or does not extend a context, has none."""
        return []

    @classmethod
    def check_family(cls, model, family: str) -> None:
        if family not in cls.families:
            raise IncompatibleSchemeError(
                f"Scheme '{cls.name}' works on models with {' or '.join(cls.families)} positions, but this "
                f"'{model.config.model_type}' model has {family} positions. `pos-swap schemes` lists what fits each."
            )

    @classmethod
    def configure(cls, model, params: dict) -> "Scheme":
        """Validate ``params`` against ``Config`` (names, types, finiteness, ranges) and fill model defaults."""
        return cls(build_config(f"scheme '{cls.name}'", cls.Config, params, cls.defaults(model), model))

    def apply(self, patch) -> None:
        """Change the model through ``patch`` (``patch.set``, ``patch.set_rotary``, ...) so it can be undone."""
        raise NotImplementedError

    def causal_consistent(self) -> bool:
        """Whether a token's output depends only on the tokens up to it, as in the unpatched model. Then the losses
        of a window [0, L) are the first L of one longer forward from the same start, and a cached prefix can be
        reused for any continuation (the evaluation relies on both; ``tests/test_evaluate.py`` checks every scheme's
        answer against separate forwards). False for rules that rotate a whole window by its current length."""
        return True

    def hf_rope_parameters(self, config, slot) -> dict | None:
        """The plain transformers ``rope_parameters`` equal to this patch for one rotary table, or None."""
        return None


def config_parameters(config_class) -> list[tuple[str, str, Any, bool]]:
    return [(f.name, f.metadata["help"], f.default, f.metadata["required"]) for f in dataclasses.fields(config_class)]


SCHEMES: dict[str, type[Scheme]] = {}  # name -> scheme class, in registration order


def register(scheme: type[Scheme]) -> type[Scheme]:
    """Class decorator: make ``scheme`` known under ``scheme.name`` (names are unique)."""
    if scheme.name in SCHEMES and SCHEMES[scheme.name] is not scheme:
        clash = f"{SCHEMES[scheme.name].__name__} and {scheme.__name__}"
        raise ValueError(f"Two schemes are named '{scheme.name}': {clash}.")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> type[Scheme]:
    """The scheme class registered under ``name``, or an error suggesting the closest name."""
    if not isinstance(name, str):
        raise UnknownSchemeError(
            f"A scheme is named by a string such as 'yarn'; got {reprlib.repr(name)}. "
            f"Known schemes: {', '.join(SCHEMES)}."
        )
    if name not in SCHEMES:
        raise UnknownSchemeError(
            f"Unknown scheme '{name}'.{did_you_mean(name, SCHEMES)} Known schemes: {', '.join(SCHEMES)}."
        )
    return SCHEMES[name]


def list_schemes() -> list[str]:
    """Names of every registered scheme."""
    return list(SCHEMES)


class Modifier(Configured):
    """An option every scheme can take (a per-row attention temperature, Resonance's integer wavelengths), applied
    once by the engine around the scheme instead of being copied into each scheme. Its ``Config`` fields are patch
    keywords beside the scheme's (``pos_swap.patch(model, "rerope", temperature="logn")``); the field named like
    the modifier switches it on, the others are prefixed with that name."""

    @classmethod
    def configure(cls, model, params: dict) -> "Modifier | None":
        """The modifier for ``params`` (its own keywords), or None when its switch is off and nothing else is set."""
        if params.get(cls.name) in (None, False):
            extra = [key for key, value in params.items() if value is not None and key != cls.name]
            if extra:
                raise InvalidParameterError(
                    f"{', '.join(extra)} configure the {cls.name} modifier, which is off: pass {cls.name}=... as "
                    f"well (`pos-swap schemes -v` lists its values)."
                )
            return None
        return cls(build_config(f"modifier '{cls.name}'", cls.Config, params, cls.defaults(model), model))

    def before(self, patch) -> None:
        """Changes made before the scheme applies (a frequency rule the scheme's rotary passes through)."""

    def after(self, patch) -> None:
        """Changes made after the scheme applied, and checks of what it did; raise when the modifier cannot apply."""


MODIFIERS: dict[str, type[Modifier]] = {}  # name -> modifier class


def register_modifier(modifier: type[Modifier]) -> type[Modifier]:
    """Class decorator: make ``modifier``'s keywords known to every scheme (tests check that no scheme parameter
    has one of their names)."""
    if modifier.name in MODIFIERS and MODIFIERS[modifier.name] is not modifier:
        raise ValueError(f"Two modifiers are named '{modifier.name}'.")
    MODIFIERS[modifier.name] = modifier
    return modifier


def split_modifiers(params: dict) -> tuple[dict, dict[type[Modifier], dict]]:
    """``params`` of a patch call split into the scheme's and each modifier's own."""
    owner = {f.name: m for m in MODIFIERS.values() for f in dataclasses.fields(m.Config)}
    scheme_params = {k: v for k, v in params.items() if k not in owner}
    own = {m: {k: v for k, v in params.items() if owner.get(k) is m} for m in MODIFIERS.values()}
    return scheme_params, own


def parameter_hints(scheme: type[Scheme]) -> dict[str, Any]:
    """The annotation of every keyword a patch with ``scheme`` takes: its own and the modifiers'."""
    hints = dict(typing.get_type_hints(scheme.Config))
    for modifier in MODIFIERS.values():
        hints.update(typing.get_type_hints(modifier.Config))
    return hints
