"""Parse what users type: lengths such as ``2k,8k,16k`` and scheme lists such as
``native,dynamic-yarn,yarn:factor=4,self-extend:window=1024:group=8``."""

import ast
import dataclasses
import json
import math
import typing

from ..errors import PosSwapError
from ..registry import get_scheme, parameter_hints

MIN_LENGTH = 2  # a window needs a token to predict and one before it
NATIVE = "native"  # the model without any pos_swap patch
SAVED = "saved"  # the model as loaded: with the patch its folder was saved with
SCHEME_FORM = "NAME[:PARAM=VALUE[:PARAM=VALUE...]], comma-separated, e.g. native,yarn:factor=4,self-extend:window=1024:group=8"


def parse_length(text) -> int:
    """``"16k"`` -> 16384 (k = 1024), ``"1500"`` -> 1500, ``"0.5k"`` -> 512."""
    raw = str(text).strip().lower()
    try:
        value = float(raw[:-1]) * 1024 if raw.endswith("k") else float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PosSwapError(f"Cannot read length '{text}': give tokens as a number or with a k suffix (16k = 16384).")
    if value < MIN_LENGTH or value != int(value):
        raise PosSwapError(f"Length '{text}' must be a whole number of tokens >= {MIN_LENGTH} (16k = 16384).")
    return int(value)


def parse_lengths(text) -> list[int]:
    """``"2k,8k,16k"`` (or a list of such items) -> ``[2048, 8192, 16384]``, sorted, without repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    lengths = sorted({parse_length(item) for item in items if str(item).strip()})
    if not lengths:
        raise PosSwapError("No lengths given: pass e.g. --lengths 2k,8k,16k.")
    return lengths


def parse_depths(text) -> tuple[float, ...]:
    """``"0,0.5,1"`` (or a list of numbers) -> ``(0.0, 0.5, 1.0)``: needle depths, each a finite number in 0..1."""
    items = text.split(",") if isinstance(text, str) else list(text)
    depths = []
    for item in items:
        try:
            depth = float(item)
        except (TypeError, ValueError):
            depth = math.nan
        if not 0.0 <= depth <= 1.0:  # also refuses nan
            raise PosSwapError(
                f"Cannot use needle depth '{str(item).strip()}': give numbers in 0..1 (0 = start of the haystack, "
                f"1 = its end), e.g. --depths 0,0.5,1."
            )
        depths.append(depth)
    if not depths:
        raise PosSwapError("No needle depths given: pass e.g. --depths 0,0.5,1.")
    return tuple(dict.fromkeys(depths))


def format_length(tokens: int) -> str:
    """16384 -> ``"16k"``, 1500 -> ``"1500"``."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def parse_value(annotation, text: str):
    """A parameter value typed by a user, read as ``annotation`` (float, int, bool, list[float], dict, str, or an
    optional of those). Lists take commas or ``;`` (``1,1.5,2``); dicts are JSON or Python literals. Raises
    ValueError saying what was expected."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = options[0] if typing.get_origin(annotation) is not list else annotation
    if typing.get_origin(base) is list:
        (element,) = typing.get_args(base)
        try:
            return [element(v) for v in text.strip("[]").replace(";", ",").split(",")]
        except ValueError:
            example = "3,7,11" if element is int else "1,1.5,2"
            raise ValueError(f"expected comma-separated numbers such as {example}, got {text!r}") from None
    if base is dict:
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = None
        if not isinstance(value, dict):
            raise ValueError(f"expected a dictionary such as '{{\"factor\": 4.0}}', got {text!r}")
        return value
    if base is bool:
        choices = {"true": True, "false": False}
        if text.lower() not in choices:
            raise ValueError(f"expected true or false, got {text!r}")
        return choices[text.lower()]
    try:
        return base(text)
    except ValueError:
        raise ValueError(f"expected {getattr(base, '__name__', base)}, got {text!r}") from None


def split_outside_brackets(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` where it is not inside (), [] or {} (dict and list values keep theirs)."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == separator and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return parts + [text[start:]]


@dataclasses.dataclass(frozen=True)
class SchemeSpec:
    """One entry of a scheme list: a label for tables, and the scheme name and parameters (None for native)."""

    label: str
    name: str | None
    params: dict


def parse_scheme(text: str) -> SchemeSpec:
    """``"yarn:factor=4"`` -> SchemeSpec("yarn:factor=4", "yarn", {"factor": 4.0}); ``"native"`` -> no patch."""
    label = text.strip()
    name, *pairs = split_outside_brackets(label, ":")
    if name in (NATIVE, SAVED):
        if pairs:
            raise PosSwapError(f"'{name}' takes no parameters; got '{label}'. Expected form: {SCHEME_FORM}.")
        return SchemeSpec(name, None if name == NATIVE else SAVED, {})
    scheme = get_scheme(name)  # unknown names: an error with the closest name
    hints = parameter_hints(scheme)  # the scheme's parameters and the modifiers' keywords
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value:
            raise PosSwapError(f"Cannot read '{pair}' in '{label}'. Expected form: {SCHEME_FORM}.")
        if key not in hints:
            raise PosSwapError(
                f"Scheme '{name}' has no parameter '{key}' (in '{label}'). Its parameters: {', '.join(hints)}."
            )
        try:
            params[key] = parse_value(hints[key], value)
        except (ValueError, SyntaxError) as error:
            raise PosSwapError(f"Cannot read {key}={value!r} in '{label}' ({error}). Expected form: {SCHEME_FORM}.")
    return SchemeSpec(label, name, params)


def label(name: str, params: dict) -> str:
    """The scheme-list entry for a setting, as a user types it and :func:`parse_scheme` reads it: ``yarn:factor=4``,
    ``dpe:window=1024:groups=[4;8;8;8]`` (list values with ``;``, no spaces, so a shell passes them unquoted)."""
    def text(value):
        if isinstance(value, list):
            return "[" + ";".join(text(item) for item in value) + "]"
        return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)

    return name + "".join(f":{key}={text(value)}" for key, value in params.items())


def parse_schemes(text) -> list[SchemeSpec]:
    """A comma-separated scheme list (or a list of entries) -> SchemeSpecs. A list-valued parameter takes ``;``
    between its values (``longrope:long_factor=1;1.5;2``) or brackets (``long_factor=[1,1.5,2]``)."""
    items = split_outside_brackets(text, ",") if isinstance(text, str) else list(text)
    items = [item for item in items if str(item).strip()]
    if not items:
        raise PosSwapError(f"No schemes given. Expected form: {SCHEME_FORM}.")
    specs = [parse_scheme(item) for item in items]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise PosSwapError(f"A scheme is listed twice in '{','.join(labels)}'; list each once.")
    return specs
