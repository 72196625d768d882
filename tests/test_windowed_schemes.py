"""rerope (ReRoPE and leaky ReRoPE, Su 2023), dual-chunk (Dual Chunk Attention, An et al. 2024), string (STRING,
An et al. 2024) and dpe (DPE, Lu et al. 2025): their distances
against the papers' rules written out by hand, the patched attention against an independent float64 computation,
and the life cycle every scheme must survive (KV caches, left padding, backends, bad input, save and load)."""

import functools
import warnings

import pytest
import torch

import pos_swap
from pos_swap.errors import InvalidParameterError
from pos_swap.functional import dpe, dual_chunk, rerope, string
from conftest import (
    assert_cached_generation_equals_recomputation,
    assert_every_backend_gives_the_same_logits,
    assert_left_padded_batch_equals_each_sequence_alone,
    eager_weights_and_float64_reference,
    tiny,
)

IDS = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))  # past the 32 trained positions
SETTINGS = [
    ("rerope", dict(window=8)),
    ("rerope", dict(window=8, leaky_factor=4.0)),
    ("rerope", dict(window=5, leaky_factor=1.5)),
    ("dual-chunk", dict(chunk_size=12, local_window=3)),
    ("dual-chunk", dict(chunk_size=10, local_window=4)),
    ("string", dict(shift=10, local_window=3)),
    ("string", dict(shift=25, local_window=1)),
    ("string", dict(shift=10, local_window=3, leaky_factor=4.0)),
    ("dpe", dict(window=8, groups=[1, 2, 4, 8])),
    ("dpe", dict(window=6, groups=[3, 2])),
]
SHORT = [SETTINGS[i] for i in (1, 3, 5, 7, 8)]  # most pairs of IDS fall beyond the window, or chunks apart
PLANES = 8  # rotary planes of the tiny LLaMA (head dim 16)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def su_distance(i: int, j: int, window: int, leaky_factor: float | None = None) -> float:
    """The relative position ReRoPE gives query i and key j: i - j inside the window; beyond it the window itself,
    or for leaky ReRoPE the window plus the excess shrunk by the leaky factor."""
    if i - j < window:
        return i - j
    return window if leaky_factor is None else window + (i - j - window) / leaky_factor


def an_distance(i: int, j: int, chunk_size: int, local_window: int) -> int:
    """The relative position Dual Chunk Attention gives query i and key j, chunks being s = c - w long: the true
    distance in the same chunk; from the chunk before, query s + i mod s capped at c - 1; from older chunks,
    query c - 1; keys always at j mod s."""
    s = chunk_size - local_window
    if i // s == j // s:
        return i - j
    query = min(s + i % s, chunk_size - 1) if i // s == j // s + 1 else chunk_size - 1
    return query - j % s


def string_distance(i: int, j: int, shift: int, local_window: int, leaky_factor: float | None = None) -> float:
    """The relative position STRING gives query i and key j: the true distance below the shift S, the distance
    minus S plus the local window W from S on; with a leaky factor k, W plus the distance beyond S shrunk by k."""
    if i - j < shift:
        return i - j
    return i - j - shift + local_window if leaky_factor is None else local_window + (i - j - shift) / leaky_factor


def lu_distance(i: int, j: int, window: int, groups: list[int]) -> list[int]:
    """The relative position DPE gives query i and key j in each of the PLANES rotary planes (split into equal
    groups, highest frequency first): i - j inside the window; beyond it Self-Extend's grouped distance with the
    plane's own group size g, (i // g + W - W // g) - j // g."""
    sizes = [g for g in groups for _ in range(PLANES // len(groups))]
    return [i - j if i - j < window else i // g + window - window // g - j // g for g in sizes]


RULES = {
    "rerope": (su_distance, rerope.relative_positions),
    "dual-chunk": (an_distance, dual_chunk.relative_positions),
    "string": (string_distance, string.relative_positions),
    "dpe": (lu_distance, functools.partial(dpe.relative_positions, planes=PLANES)),
}


def paper_distances(scheme, params, length):
    rule = RULES[scheme][0]
    return torch.tensor([[rule(i, j, **params) for j in range(length)] for i in range(length)], dtype=torch.float64)


@pytest.mark.parametrize("scheme, params", SETTINGS)
def test_distances_follow_the_paper(scheme, params):
    positions = torch.arange(30)
    got = RULES[scheme][1](positions, positions, **params)
    causal = positions[:, None] >= positions[None, :]
    expected = paper_distances(scheme, params, 30)
    torch.testing.assert_close(got.double()[causal], expected[causal], rtol=0, atol=1e-12)
    assert expected[causal].max() < params.get("chunk_size", 30)


@pytest.mark.parametrize(
    "rule, window, params",
    [(rerope, 8, (None,)), (rerope, 5, (1.5,)), (string, 10, (3, None)), (string, 10, (3, 4.0))],
)  # fmt: skip
def test_far_positions_give_the_distances_beyond_the_window(rule, window, params):
    """The one rotation of the far pass (query and key at their far positions) gives each far pair its distance."""
    positions = torch.arange(30)
    far_query, far_key = rule.far_positions(positions, positions, window, *params)
    beyond = positions[:, None] - positions[None, :] >= window
    expected = rule.relative_positions(positions, positions, window, *params)[beyond].double()
    torch.testing.assert_close((far_query[:, None] - far_key[None, :]).double()[beyond], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme, params", SETTINGS)
def test_attention_weights_match_float64_reference(scheme, params):
    model = tiny("llama", attn_implementation="eager")
    pos_swap.patch(model, scheme, **params)
    scale = string.ATTENTION_FACTOR**2 if scheme == "string" else 1.0  # STRING's default cos/sin multiplier
    distances = paper_distances(scheme, params, IDS.shape[1])
    weights, expected = eager_weights_and_float64_reference(model, 1, IDS, distances, logit_scale=scale)
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)


def test_string_attention_factor_scales_the_logits():
    model = tiny("llama", attn_implementation="eager")
    params = dict(shift=10, local_window=3)
    pos_swap.patch(model, "string", attention_factor=1.3, **params)
    distances = paper_distances("string", params, IDS.shape[1])
    weights, expected = eager_weights_and_float64_reference(model, 1, IDS, distances, logit_scale=1.3**2)
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)


def test_string_with_a_shift_beyond_the_input_and_no_factor_changes_nothing():
    model = tiny("llama")
    ids = IDS[:, :31]
    expected = logits(model, ids)
    with pos_swap.patched(model, "string", shift=31, local_window=4, attention_factor=1.0):
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    with pos_swap.patched(model, "string", shift=12, local_window=4, attention_factor=1.0):
        assert not torch.allclose(logits(model, ids), expected, atol=1e-2)
    with pos_swap.patched(model, "yarn", factor=2.0):  # and with rope_factor it is YaRN at that factor
        yarn = logits(model, ids)
    with pos_swap.patched(model, "string", shift=31, local_window=4, attention_factor=1.0, rope_factor=2.0):
        torch.testing.assert_close(logits(model, ids), yarn, rtol=0, atol=1e-5)


def test_dpe_with_one_group_size_is_self_extend_and_with_ones_is_the_model():
    model = tiny("llama")
    expected = logits(model, IDS)
    with pos_swap.patched(model, "dpe", window=8, groups=[1, 1]):
        torch.testing.assert_close(logits(model, IDS), expected, rtol=0, atol=1e-5)
    with pos_swap.patched(model, "self-extend", window=8, group=4):
        grouped = logits(model, IDS)
    with pos_swap.patched(model, "dpe", window=8, groups=[4, 4, 4, 4]):
        torch.testing.assert_close(logits(model, IDS), grouped, rtol=0, atol=1e-6)
    with pos_swap.patched(model, "dpe", window=8, groups=[2, 4, 4, 4]):  # one group apart: a different model
        assert not torch.allclose(logits(model, IDS), grouped, atol=1e-2)


@pytest.mark.parametrize(
    "scheme, covering, short", [("rerope", dict(window=40), SHORT[0][1]), ("dual-chunk", dict(chunk_size=41, local_window=1), SHORT[1][1])]
)
def test_a_window_covering_the_input_changes_nothing(scheme, covering, short):
    model = tiny("llama")
    expected = logits(model, IDS)
    with pos_swap.patched(model, scheme, **covering):
        torch.testing.assert_close(logits(model, IDS), expected, rtol=0, atol=1e-5)
    with pos_swap.patched(model, scheme, **short):  # and a short one does change the model
        assert not torch.allclose(logits(model, IDS), expected, atol=1e-2)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("scheme, params", SHORT)
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma3_text"])
def test_generate_with_cache_equals_recomputation(arch, scheme, params, cache):
    model = tiny(arch)
    pos_swap.patch(model, scheme, **params)
    assert_cached_generation_equals_recomputation(model, cache)


@pytest.mark.parametrize("scheme, params", SHORT)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_left_padded_batch_equals_each_sequence_alone(attn_implementation, scheme, params):
    model = tiny("llama", attn_implementation=attn_implementation)
    pos_swap.patch(model, scheme, **params)
    assert_left_padded_batch_equals_each_sequence_alone(model, IDS)


@pytest.mark.parametrize("scheme, params", SHORT)
def test_every_backend_gives_the_same_logits(scheme, params):
    """eager and sdpa run as chosen; flex_attention is routed to sdpa's masks (the blockwise attention reads them)."""
    assert_every_backend_gives_the_same_logits(scheme, params, IDS)


@pytest.mark.parametrize(
    "scheme, params, message",
    [
        ("rerope", dict(window=0), "must be > 0"),
        ("rerope", dict(window=8.0), "must be int"),
        ("rerope", dict(window=8, leaky_factor=1.0), "must be > 1"),
        ("rerope", dict(window=8, leaky_factor=0.5), "must be > 1"),
        ("rerope", dict(window=8, leaky_factor=float("inf")), "finite"),
        ("dual-chunk", dict(chunk_size=8, local_window=8), "local_window < chunk_size"),
        ("dual-chunk", dict(chunk_size=8, local_window=0), "must be > 0"),
        ("dual-chunk", dict(chunk_size=1, local_window=1), "must be > 1"),
        ("dual-chunk", dict(chunk_size=8), "needs parameter 'local_window'"),
        ("sinks", dict(window=0), "must be > 0"),
        ("sinks", dict(window=6.0), "must be int"),
        ("sinks", dict(sink_tokens=-1, window=6), "must be >= 0"),
        ("sinks", dict(sink_tokens=True, window=6), "must be int"),
        ("string", dict(shift=32, local_window=4), "below the trained context"),
        ("string", dict(shift=8, local_window=8), "local_window < shift"),
        ("string", dict(shift=12), "local_window < shift"),  # the default W = 128 on a 32-token model
        ("string", dict(shift=12, local_window=0), "must be > 0"),
        ("string", dict(shift=12, local_window=3, attention_factor=0.0), "must be > 0"),
        ("dpe", dict(window=8, groups=[1, 2, 4]), "3 does not divide 8"),
        ("dpe", dict(window=6, groups=[4, 2]), "window=6 is not divisible by 4"),
        ("dpe", dict(groups=[3, 3]), "multiple of 3, e.g. 3"),  # the default window, 32 // 8 = 4
        ("dpe", dict(window=8, groups=[0, 2]), "group sizes from 1"),
        ("dpe", dict(window=8, groups=[]), "at least one group size"),
        ("dpe", dict(window=8, groups=[2.0, 2.0]), "must be list"),
        ("dpe", dict(window=8), "needs parameter 'groups'"),
    ],
)
def test_bad_parameters_raise_and_leave_the_model_alone(scheme, params, message):
    model = tiny("llama")
    expected = logits(model, IDS)
    with pytest.raises(InvalidParameterError, match=message):
        pos_swap.patch(model, scheme, **params)
    assert pos_swap.describe(model) is None
    assert torch.equal(logits(model, IDS), expected)


@pytest.mark.parametrize("scheme, params", SHORT)
def test_save_and_load_round_trip(tmp_path, scheme, params):
    model = tiny("llama")
    pos_swap.patch(model, scheme, rope_factor=2.0, **params)
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded)["params"] == pos_swap.describe(model)["params"]
    assert pos_swap.describe(loaded)["params"].items() >= {**params, "rope_factor": 2.0}.items()
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


@pytest.mark.parametrize(
    "scheme, params",
    [
        ("self-extend", dict(window=40, group=4)),
        ("rerope", dict(window=40)),
        ("dual-chunk", dict(chunk_size=48, local_window=4)),
        ("dpe", dict(window=40, groups=[4, 8])),
    ],
)
def test_rope_factor_rotates_with_yarn_frequencies(scheme, params):
    """With every pair inside the window (or one chunk), a windowed scheme with rope_factor is YaRN at that factor."""
    model = tiny("llama")
    with pos_swap.patched(model, "yarn", factor=2.0):
        expected = logits(model, IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a window covering the trained context warns
        with pos_swap.patched(model, scheme, rope_factor=2.0, **params):
            torch.testing.assert_close(logits(model, IDS), expected, rtol=0, atol=1e-5)
