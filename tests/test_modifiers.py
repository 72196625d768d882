"""The modifiers every scheme takes (pos_swap.modifiers): attention temperature by query position (LogN, Llama 4,
Scalable-Softmax) and Resonance RoPE's integer wavelengths. Their math against the published formulas written out
by hand, composed models against float64 computations, caches, padding, backends, save/load and bad input."""

import math

import pytest
import torch

import pos_swap
from pos_swap import registry
from pos_swap.errors import IncompatibleSchemeError, InvalidParameterError
from pos_swap.evaluate import specs
from pos_swap.functional import rope, string, temperature
from conftest import (
    assert_cached_generation_equals_recomputation,
    assert_every_backend_gives_the_same_logits,
    assert_left_padded_batch_equals_each_sequence_alone,
    eager_weights_and_float64_reference,
    tiny,
)

IDS = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))  # past the 32 trained positions
TEMPERATURES = [  # short lengths, so that most rows of IDS are scaled
    dict(temperature="logn", temperature_length=6),
    dict(temperature="llama4", temperature_length=4, temperature_beta=0.5),
    dict(temperature="ssmax", temperature_length=8),
]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def paper_factor(rule: str, position: int, length: int, beta: float = 0.1) -> float:
    """The published factors for the query at 0-based ``position`` (the row's n = position + 1 keys): Qwen's
    logn_list, Llama 4's attn_scales, Scalable-Softmax's s log n with s = 1 / log L."""
    n = position + 1
    if rule == "logn":
        return math.log(n, length) if n > length else 1.0
    if rule == "llama4":
        return 1 + beta * math.log(math.floor(n / length) + 1)
    return math.log(n) / math.log(length)


def row_scales(params, length=IDS.shape[1]) -> torch.Tensor:
    rule, span = params["temperature"], params["temperature_length"]
    beta = params.get("temperature_beta", 0.1)
    return torch.tensor([[paper_factor(rule, p, span, beta)] for p in range(length)], dtype=torch.float64)  # (L, 1)


def test_temperature_rules_follow_the_papers():
    positions = torch.arange(0, 70000, 7)
    cases = [("logn", lambda p: temperature.logn(p, 8192), {}), ("ssmax", lambda p: temperature.scalable_softmax(p, 8192), {})]
    cases.append(("llama4", lambda p: temperature.llama4(p, 8192, 0.1), {}))
    for rule, function, _ in cases:
        expected = torch.tensor([paper_factor(rule, p, 8192) for p in positions.tolist()], dtype=torch.float64)
        torch.testing.assert_close(function(positions), expected, rtol=1e-12, atol=1e-12)
    assert temperature.logn(torch.tensor([8191]), 8192).item() == 1.0  # 1 inside the trained context
    assert temperature.llama4(torch.tensor([8190, 8191]), 8192, 0.1).tolist() == [1.0, 1 + 0.1 * math.log(2)]


def test_resonance_follows_the_paper():
    inv_freq = rope.default_inv_freq(64, 10000.0)
    got = rope.resonance(inv_freq, 8192)
    for theta, tuned in zip(inv_freq.double().tolist(), got.double().tolist()):
        wavelength = 2 * math.pi / theta
        expected = 2 * math.pi / round(wavelength) if wavelength < 8192 else theta
        assert tuned == pytest.approx(expected, rel=1e-6)
    rounded = (2 * math.pi / inv_freq.double()) < 8192
    periods = 2 * math.pi / got.double()[rounded]
    torch.testing.assert_close(periods, periods.round(), rtol=1e-5, atol=0)  # integer wavelengths: phases repeat
    assert rope.resonance(torch.zeros(3), 8192).tolist() == [0.0, 0.0, 0.0]  # an identity rotary stays one


@pytest.mark.parametrize("params", TEMPERATURES)
@pytest.mark.parametrize(
    "scheme, scheme_params", [("rerope", dict(window=8)), ("nope", {}), ("string", dict(shift=10, local_window=3))]
)
def test_temperature_on_rotary_schemes_matches_float64(scheme, scheme_params, params):
    model = tiny("llama", attn_implementation="eager")
    pos_swap.patch(model, scheme, **scheme_params, **params)
    length = IDS.shape[1]
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    distance = {
        "rerope": torch.where(i - j < 8, i - j, 8),
        "nope": torch.zeros(length, length),
        "string": torch.where(i - j < 10, i - j, i - j - 10 + 3),
    }[scheme]
    scale = row_scales(params) * (string.ATTENTION_FACTOR**2 if scheme == "string" else 1.0)
    weights, expected = eager_weights_and_float64_reference(model, 1, IDS, distance, logit_scale=scale)
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("params", TEMPERATURES)
def test_temperature_on_alibi_scales_the_content_logits_and_keeps_the_bias(params):
    model = tiny("llama", attn_implementation="eager")
    pos_swap.patch(model, "alibi", **params)
    length = IDS.shape[1]
    slopes = torch.tensor([2 ** (-8 * h / 4) for h in range(1, 5)], dtype=torch.float64)  # Press et al., 4 heads
    distance = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).double()
    bias = -slopes[:, None, None] * distance  # (H, L, L)
    weights, expected = eager_weights_and_float64_reference(
        model, 1, IDS, torch.zeros(length, length), logit_scale=row_scales(params), bias=bias
    )
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)


COMPOSED = [
    ("rerope", dict(window=8, **TEMPERATURES[0])),
    ("yarn", dict(factor=2.0, **TEMPERATURES[2])),  # a static rotary scheme: routed for the temperature alone
    ("alibi", dict(TEMPERATURES[1])),
    ("string", dict(shift=10, local_window=3, **TEMPERATURES[1])),
    ("dynamic-yarn", dict(resonance=True, resonance_length=32)),
    ("rerope", dict(window=8, leaky_factor=2.0, resonance=True, **TEMPERATURES[0])),
]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("scheme, params", COMPOSED)
def test_generate_with_cache_equals_recomputation(scheme, params, cache):
    model = tiny("llama")
    pos_swap.patch(model, scheme, **params)
    assert_cached_generation_equals_recomputation(model, cache)


@pytest.mark.parametrize("scheme, params", COMPOSED[:3])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_left_padded_batch_equals_each_sequence_alone(attn_implementation, scheme, params):
    model = tiny("llama", attn_implementation=attn_implementation)
    pos_swap.patch(model, scheme, **params)
    assert_left_padded_batch_equals_each_sequence_alone(model, IDS)


@pytest.mark.parametrize("scheme, params", COMPOSED[:3])
def test_every_backend_gives_the_same_logits(scheme, params):
    assert_every_backend_gives_the_same_logits(scheme, params, IDS)


def test_temperature_inside_its_length_changes_nothing_and_beyond_it_does():
    model = tiny("llama")
    expected = logits(model, IDS)
    with pos_swap.patched(model, "yarn", factor=2.0):
        yarn = logits(model, IDS)
    with pos_swap.patched(model, "yarn", factor=2.0, temperature="logn", temperature_length=40):
        torch.testing.assert_close(logits(model, IDS), yarn, rtol=0, atol=0)  # LogN is 1 up to its length
    with pos_swap.patched(model, "yarn", factor=2.0, temperature="logn"):  # 32: rows 32..39 are scaled
        changed = logits(model, IDS)
        torch.testing.assert_close(changed[:, :32], yarn[:, :32], rtol=0, atol=0)
        assert not torch.allclose(changed[:, 32:], yarn[:, 32:], atol=1e-3)
    assert torch.equal(logits(model, IDS), expected)


def frequencies_of(model):
    """The inverse frequencies a patched tiny LLaMA rotates with at length 40: its rotary table's, or its hook's."""
    hook = model.model.layers[0].self_attn._modules.get("pos_swap")
    if hook is None:
        return model.model.rotary_emb.inv_freq
    if hasattr(hook, "inv_freq"):
        return hook.inv_freq
    return hook.frequencies(torch.tensor([40]))[0][0]


@pytest.mark.parametrize(
    "scheme, params",
    [
        ("yarn", dict(factor=4.0)),
        ("linear", dict(factor=2.0)),
        ("ntk", dict(factor=4.0)),
        ("llama3", dict(factor=4.0, original_max_position_embeddings=16)),
        ("dynamic-yarn", {}),
        ("rerope", dict(window=8, rope_factor=2.0)),
        ("string", dict(shift=10, local_window=3)),
    ],
)
def test_resonance_rounds_the_frequencies_each_scheme_sets(scheme, params):
    model = tiny("llama")
    with pos_swap.patched(model, scheme, **params):
        plain = frequencies_of(model).clone()
        plain_logits = logits(model, IDS)
    with pos_swap.patched(model, scheme, resonance=True, **params):
        tuned = frequencies_of(model)
        torch.testing.assert_close(tuned, rope.resonance(plain, 32), rtol=0, atol=0)
        assert not torch.equal(tuned, plain)
        assert not torch.allclose(logits(model, IDS), plain_logits, atol=1e-4)


def test_resonance_on_rope_for_a_learned_position_model():
    model = tiny("gpt2")
    with pos_swap.patched(model, "rope", scaling="yarn", scaling_params={"factor": 2.0}, resonance=True):
        hook = model.transformer.h[0].attn.pos_swap
        inv_freq, _ = hook.frequencies(torch.tensor([40]))
    with pos_swap.patched(model, "rope", scaling="yarn", scaling_params={"factor": 2.0}):
        plain, _ = model.transformer.h[0].attn.pos_swap.frequencies(torch.tensor([40]))
    torch.testing.assert_close(inv_freq, rope.resonance(plain, 32), rtol=0, atol=0)


@pytest.mark.parametrize(
    "arch, scheme, params, error, message",
    [
        ("llama", "cope", dict(temperature="logn"), IncompatibleSchemeError, "reads its positions from the queries"),
        ("bert", "alibi", dict(temperature="logn"), IncompatibleSchemeError, "bidirectional"),
        ("llama", "alibi", dict(resonance=True), IncompatibleSchemeError, "no rotary frequencies"),
        ("llama", "nope", dict(resonance=True), IncompatibleSchemeError, "no rotary frequencies"),
        ("gpt2", "sinusoidal", dict(resonance=True), IncompatibleSchemeError, "no rotary frequencies"),
        ("llama", "rerope", dict(window=8, temperature="log"), InvalidParameterError, "must be one of logn, llama4"),
        ("llama", "rerope", dict(window=8, temperature_beta=0.2), InvalidParameterError, "pass temperature="),
        ("llama", "yarn", dict(factor=2.0, temperature="logn", temperature_beta=0.2), InvalidParameterError, "llama4"),
        ("llama", "yarn", dict(factor=2.0, temperature="ssmax", temperature_length=1), InvalidParameterError, "> 1"),
        ("llama", "yarn", dict(factor=2.0, resonance_length=8), InvalidParameterError, "pass resonance="),
        ("llama", "yarn", dict(factor=2.0, resonance="yes"), InvalidParameterError, "must be bool"),
    ],
)
def test_bad_modifiers_raise_and_leave_the_model_alone(arch, scheme, params, error, message):
    model = tiny(arch)
    ids = IDS[:, :20]
    with torch.no_grad():
        before = model(ids)[0]
    with pytest.raises(error, match=message):
        pos_swap.patch(model, scheme, **params)
    assert pos_swap.describe(model) is None
    with torch.no_grad():
        assert torch.equal(model(ids)[0], before)


@pytest.mark.parametrize(
    "scheme, params",
    [
        ("rerope", dict(window=8, temperature="llama4", temperature_length=4)),
        ("yarn", dict(factor=2.0, resonance=True, temperature="ssmax")),
        ("string", dict(shift=10, local_window=3, resonance=True, resonance_length=20)),
    ],
)
def test_save_and_load_round_trip(tmp_path, scheme, params):
    model = tiny("llama")
    pos_swap.patch(model, scheme, **params)
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded) == pos_swap.describe(model)
    assert pos_swap.describe(loaded)["modifiers"].items() >= {k: v for k, v in params.items() if "temp" in k or "reson" in k}.items()
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    with pytest.raises(pos_swap.PosSwapError, match="no plain transformers"):
        pos_swap.export_hf(model, tmp_path / "hf")  # transformers has no form of a modifier


def test_modifier_keywords_clash_with_no_scheme_parameter():
    scheme_names = {name for scheme in registry.list_schemes() for name, *_ in registry.get_scheme(scheme).parameters()}
    modifier_names = {name for modifier in registry.MODIFIERS.values() for name, *_ in modifier.parameters()}
    assert modifier_names and not scheme_names & modifier_names


def test_scheme_lists_take_modifier_keywords():
    spec = specs.parse_scheme("rerope:window=8:temperature=llama4:temperature_beta=0.2:resonance=true")
    assert spec.params == dict(window=8, temperature="llama4", temperature_beta=0.2, resonance=True)
    model = tiny("llama")
    with pos_swap.patched(model, spec.name, **spec.params):
        assert pos_swap.describe(model)["modifiers"]["temperature_beta"] == 0.2
