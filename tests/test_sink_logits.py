"""Learned attention sinks (GPT-OSS's ``sinks``, handed to attention as ``s_aux``) under the attention-time schemes:
the sink correction against its formula, one layer's attention against float64 with the sink column added by hand,
the fused passes against the chunked path, cached generation and left padding, and discovery recording them."""

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

import pos_swap
from pos_swap import archs, fused
from pos_swap.errors import IncompatibleSchemeError
from pos_swap.attention_base import softmax_with_sinks, with_sinks
from pos_swap.functional import string
from conftest import (
    assert_cached_generation_equals_recomputation,
    assert_left_padded_batch_equals_each_sequence_alone,
    eager_weights_and_float64_reference,
)
from test_discovery import coverage
from test_self_extend import paper_distance as self_extend_distance
from test_sinks import by_hand as streaming_by_hand
from test_windowed_schemes import string_distance, su_distance

IDS = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))  # past the 32 trained positions
SCHEMES = [
    ("rerope", dict(window=8, leaky_factor=4.0)),
    ("self-extend", dict(window=8, group=4)),
    ("string", dict(shift=10, local_window=3)),
    ("alibi", {}),
    ("sinks", dict(sink_tokens=2, window=6)),
    ("dynamic-yarn", dict(block=4)),
    ("dual-chunk", dict(chunk_size=12, local_window=3)),
    ("cope", dict(init="normal")),
]


def tiny_gpt_oss(attn_implementation: str = "eager", seed: int = 0):
    """A tiny GPT-OSS (every layer full attention, 32 trained positions, default RoPE) whose sink logits are far
    from zero, so that leaving them out or adding them twice moves every output."""
    config = GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        layer_types=["full_attention"] * 2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GptOssForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(4) + 1.0)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_the_sink_correction_is_a_softmax_with_one_more_column():
    """o * sigmoid(lse - s) and the softmax with the sink column both equal exp(x_j) / (sum_k exp(x_k) + exp(s))."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 7, generator=generator, dtype=torch.float64) * 3
    value = torch.randn(2, 3, 7, 4, generator=generator, dtype=torch.float64)
    sinks = torch.randn(3, generator=generator, dtype=torch.float64) * 3
    by_hand = scores.exp() / (scores.exp().sum(-1, keepdim=True) + sinks.exp()[:, None, None])  # (B, H, C, W)
    torch.testing.assert_close(softmax_with_sinks(scores, sinks), by_hand, rtol=0, atol=1e-12)
    plain = torch.softmax(scores, -1) @ value
    corrected = with_sinks(plain, torch.logsumexp(scores, -1), sinks)
    torch.testing.assert_close(corrected, by_hand @ value, rtol=0, atol=1e-12)
    assert with_sinks(plain, torch.logsumexp(scores, -1), None) is plain


def hand_reference(scheme: str, params: dict, length: int):
    """The scheme's relative distance ``(L, L)``, allowed keys and per-head bias, from the papers' rules."""
    positions = torch.arange(length)
    causal = positions[:, None] >= positions[None, :]
    if scheme == "rerope":
        return torch.tensor([[su_distance(i, j, **params) for j in range(length)] for i in range(length)]), None, None
    if scheme == "self-extend":
        distance = [[self_extend_distance(i, j, **params) for j in range(length)] for i in range(length)]
        return torch.tensor(distance), None, None
    if scheme == "string":
        distance = [[string_distance(i, j, **params) for j in range(length)] for i in range(length)]
        return torch.tensor(distance), None, None
    if scheme == "sinks":
        seen, distance = streaming_by_hand(length, **params)
        return distance, seen, None
    slopes = torch.tensor([2.0 ** (-8 * k / 4) for k in range(1, 5)], dtype=torch.float64)  # Press et al., 4 heads
    bias = -slopes[:, None, None] * (positions[:, None] - positions[None, :]).double()  # (H, L, L)
    return torch.zeros(length, length), causal, bias


BY_HAND = [s for s in SCHEMES if s[0] in ("rerope", "self-extend", "string", "alibi", "sinks")]


@pytest.mark.parametrize("scheme, params", BY_HAND)
def test_attention_weights_match_float64_with_the_sink_column(scheme, params):
    """One layer's eager weights (pos_swap's chunked path) against float64 math from the layer's own q and k, with
    each head's sink logit as one more softmax column: they sum to less than 1 where the sinks take their share."""
    model = tiny_gpt_oss()
    pos_swap.patch(model, scheme, **params)
    distance, allowed, bias = hand_reference(scheme, params, IDS.shape[1])
    scale = string.ATTENTION_FACTOR**2 if scheme == "string" else 1.0  # STRING's default cos/sin multiplier
    sinks = model.model.layers[1].self_attn.sinks.detach()
    weights, expected = eager_weights_and_float64_reference(
        model, 1, IDS, distance, allowed=allowed, bias=bias, logit_scale=scale, sinks=sinks
    )  # fmt: skip
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)
    assert float(weights.sum(-1).min()) < 0.9


@pytest.mark.parametrize("scheme, params", SCHEMES)
def test_fused_passes_equal_the_chunked_path(monkeypatch, scheme, params):
    """Routed to sdpa (a GPT-OSS loaded with flex_attention), the schemes run their fused passes on the CPU kernel
    and apply the sink correction after merging them: the logits of the chunked path, which adds the sink column."""
    model = tiny_gpt_oss("flex_attention")
    pos_swap.patch(model, scheme, **params)
    calls = []
    original = fused.CPU_KERNEL
    monkeypatch.setattr(fused, "CPU_KERNEL", lambda *a, **k: calls.append(1) or original(*a, **k))
    got = logits(model, IDS)
    assert calls or scheme == "cope", "the fused passes did not run"  # CoPE's blocks call no kernel
    monkeypatch.setenv(fused.SETTING, "chunked")
    expected = logits(model, IDS)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    eager = tiny_gpt_oss("eager")
    pos_swap.patch(eager, scheme, **params)
    torch.testing.assert_close(logits(eager, IDS), expected, rtol=0, atol=2e-5)  # eager routing: chunked, weights


@pytest.mark.parametrize("attn_implementation", ["eager", "flex_attention"])
@pytest.mark.parametrize("scheme, params", SCHEMES[:6])
def test_generate_with_cache_equals_recomputation(attn_implementation, scheme, params):
    model = tiny_gpt_oss(attn_implementation)
    pos_swap.patch(model, scheme, **params)
    assert_cached_generation_equals_recomputation(model, "dynamic")


@pytest.mark.parametrize("scheme, params", [SCHEMES[0], SCHEMES[3], SCHEMES[5]])
def test_left_padded_batch_equals_each_sequence_alone(scheme, params):
    """Padding sends the sdpa-routed passes to the blockwise path and per-position spans to the model's inner
    attention, which for sdpa is pos_swap's, with the sinks."""
    model = tiny_gpt_oss("flex_attention")
    pos_swap.patch(model, scheme, **params)
    assert_left_padded_batch_equals_each_sequence_alone(model, IDS)


def test_native_positions_give_transformers_own_attention_with_sinks():
    """rerope with a window covering the input and dynamic-yarn within the trained context rotate at attention
    time with the native frequencies: on the sdpa route (fused, and chunked for padding) the logits equal
    transformers' own eager GPT-OSS attention, which adds the sinks itself."""
    native = logits(tiny_gpt_oss("eager"), IDS[:, :30])
    for scheme, params in [("rerope", dict(window=30)), ("dynamic-yarn", dict(block=4))]:
        model = tiny_gpt_oss("flex_attention")
        pos_swap.patch(model, scheme, **params)
        torch.testing.assert_close(logits(model, IDS[:, :30]), native, rtol=0, atol=2e-5)


def test_discovery_records_the_sink_parameter_of_every_attention_module():
    """GPT-OSS and Flint (whose no-RoPE layers keep sinks too, and are routed through pos_swap's attention
    unhooked) are covered, attention-time schemes included."""
    model = tiny_gpt_oss()
    assert archs.lookup(model).sink_logits == (("layers.0.self_attn", "sinks"), ("layers.1.self_attn", "sinks"))
    assert "attention_time_schemes" not in archs.summarize(model)
    flint = coverage.build("flint")
    spec = archs.lookup(flint)
    assert spec.attention == ("layers.2.self_attn", "layers.3.self_attn") and not spec.hook_refusals
    assert [path for path, _ in spec.sink_logits] == [f"layers.{i}.self_attn" for i in range(4)]


def test_flint_no_rope_layers_keep_their_sinks_on_the_sdpa_route():
    """Flint's no-RoPE layers are not hooked; routed to sdpa for a scheme, they still add their sinks: rerope
    covering the input equals transformers' own eager Flint."""
    config = coverage.tiny_config("flint")
    native_model = coverage.build("flint", config)
    with torch.no_grad():
        for layer in native_model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape) + 1.0)
    ids = IDS[:, :10] % config.vocab_size
    native = logits(native_model, ids)
    native_model.config._attn_implementation = "flex_attention"  # pos_swap then routes to sdpa
    pos_swap.patch(native_model, "rerope", window=10)
    assert native_model.config._attn_implementation == "pos_swap_sdpa"
    torch.testing.assert_close(logits(native_model, ids), native, rtol=0, atol=2e-5)


def test_sink_logits_that_are_no_parameter_of_the_module_are_refused_by_name():
    """Sinks handed to attention from elsewhere (a plain tensor here) cannot be read by pos_swap's own attention:
    the attention-time schemes are refused, naming why, and the model is left unchanged."""
    model = tiny_gpt_oss()
    attention = model.model.layers[1].self_attn
    sinks = attention.sinks.detach().clone()
    del attention.sinks
    attention.sinks = sinks  # an attribute, not a parameter
    native = logits(model, IDS)
    with pytest.raises(IncompatibleSchemeError, match="layers.1.self_attn' adds learned sink logits"):
        pos_swap.patch(model, "rerope", window=8)
    assert pos_swap.describe(model) is None and torch.equal(logits(model, IDS), native)


class RowSums:
    """An observer that keeps, per attention module, the sum of each shown row's probabilities ``(B, H, C)``."""

    def __init__(self):
        self.sums = {}

    def queries_keys(self, module, query, key):
        pass

    def probabilities(self, module, probs, rows, cols, shape):
        self.sums.setdefault(module, []).append(probs.sum(-1))


def test_observers_see_the_weights_of_the_real_keys_on_the_fused_path():
    """Observers of the fused passes (flex-loaded GPT-OSS under rerope) are shown rows that sum to what the eager
    route returns as weights: less than 1, the sink taking the rest."""
    eager = tiny_gpt_oss("eager")
    pos_swap.patch(eager, "rerope", window=8)
    with torch.no_grad():
        weights = eager(IDS, output_attentions=True).attentions[1]  # (B, H, L, L)
    model = tiny_gpt_oss("flex_attention")
    pos_swap.patch(model, "rerope", window=8)
    observer = RowSums()
    with pos_swap.observe(model, observer):
        logits(model, IDS)
    shown = torch.cat(observer.sums[model.model.layers[1].self_attn], dim=-1)  # (B, H, L)
    torch.testing.assert_close(shown, weights.sum(-1), rtol=0, atol=1e-5)
    assert float(shown.min()) < 0.9
