"""The pure RoPE functions against transformers' own ROPE_INIT_FUNCTIONS and the papers' formulas."""

import math
import types

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pos_swap.functional import rope

DIM, BASE, L0 = 64, 10000.0, 2048


def hf(rope_type, seq_len=None, **params):
    """transformers' result for a head_dim-64 model trained on L0 positions."""
    config = types.SimpleNamespace(
        head_dim=DIM, hidden_size=DIM * 4, num_attention_heads=4, max_position_embeddings=L0,
        rope_parameters={"rope_type": rope_type, "rope_theta": BASE, **params}, standardize_rope_params=lambda: None,
    )  # fmt: skip
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def assert_same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=0)
    assert ours[1] == pytest.approx(theirs[1], rel=1e-12)


def test_default_matches_formula_in_float64():
    expected = torch.tensor([BASE ** (-2 * i / DIM) for i in range(DIM // 2)], dtype=torch.float64)
    torch.testing.assert_close(rope.default_inv_freq(DIM, BASE).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("factor", [1.5, 4.0, 16.0])
def test_linear_matches_transformers(factor):
    assert_same(rope.linear(DIM, BASE, factor), hf("linear", factor=factor))


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_ntk_stretches_lowest_frequency_by_factor(factor):
    inv_freq, scaling = rope.ntk(DIM, BASE, factor)
    native = rope.default_inv_freq(DIM, BASE)
    assert scaling == 1.0
    assert native[0] == inv_freq[0]  # the highest frequency is kept
    # the lowest frequency theta_{d/2-1} = base^(-(d-2)/d) is divided by exactly `factor`
    assert (native[-1] / inv_freq[-1]).item() == pytest.approx(factor, rel=1e-5)
    assert rope.ntk_base(BASE, factor, DIM) == pytest.approx(BASE * factor ** (DIM / (DIM - 2)))


@pytest.mark.parametrize("seq_len", [100, L0, L0 + 1, 3 * L0, 10 * L0])
def test_dynamic_ntk_matches_transformers(seq_len):
    assert_same(rope.dynamic_ntk(DIM, BASE, 2.0, L0, seq_len), hf("dynamic", seq_len=seq_len, factor=2.0))


def test_dynamic_ntk_is_native_within_trained_context():
    torch.testing.assert_close(rope.dynamic_ntk(DIM, BASE, 4.0, L0, L0)[0], rope.default_inv_freq(DIM, BASE))


@pytest.mark.parametrize(
    "params",
    [
        dict(factor=4.0),
        dict(factor=8.0, beta_fast=16.0, beta_slow=2.0),
        dict(factor=4.0, attention_factor=1.3),
        dict(factor=40.0, mscale=1.0, mscale_all_dim=1.0),
        dict(factor=4.0, truncate=False),
    ],
)
def test_yarn_matches_transformers(params):
    theirs = hf("yarn", original_max_position_embeddings=L0, **params)
    factor = params.pop("factor")
    assert_same(rope.yarn(DIM, BASE, factor, L0, **params), theirs)


def test_yarn_temperature_is_papers_formula():
    # sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 22)
    assert rope.yarn(DIM, BASE, 16.0, L0)[1] == pytest.approx(0.1 * math.log(16.0) + 1)
    assert rope.yarn_mscale(1.0) == 1.0


def test_yarn_keeps_fast_and_interpolates_slow_frequencies():
    inv_freq, _ = rope.yarn(DIM, BASE, 4.0, L0)
    native = rope.default_inv_freq(DIM, BASE)
    low, high = rope.yarn_correction_range(32, 1, DIM, BASE, L0)
    assert torch.equal(inv_freq[: int(low)], native[: int(low)])
    torch.testing.assert_close(inv_freq[int(high) :], native[int(high) :] / 4.0)


@pytest.mark.parametrize("seq_len", [None, L0, L0 + 1])
def test_longrope_matches_transformers(seq_len):
    short = [1.0 + 0.01 * i for i in range(DIM // 2)]
    long = [1.0 + 0.5 * i for i in range(DIM // 2)]
    theirs = hf("longrope", seq_len=seq_len, short_factor=short, long_factor=long, factor=8.0,
                original_max_position_embeddings=L0)  # fmt: skip
    chosen = long if seq_len and seq_len > L0 else short
    assert_same(rope.longrope(DIM, BASE, chosen, rope.longrope_attention_factor(8.0, L0)), theirs)


@pytest.mark.parametrize("factor,low,high", [(8.0, 1.0, 4.0), (4.0, 2.0, 8.0)])
def test_llama3_matches_transformers(factor, low, high):
    theirs = hf("llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=L0)  # fmt: skip
    assert_same(rope.llama3(DIM, BASE, factor, low, high, L0), theirs)


def test_rotation_matches_transformers_apply_rotary_pos_emb():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, DIM), torch.randn(2, 2, 7, DIM)
    positions = torch.arange(7)[None].expand(2, -1) + torch.tensor([[0], [5]])
    cos, sin = rope.cos_sin(positions, rope.default_inv_freq(DIM, BASE), 1.3, torch.float32)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rope.rotate(q, cos, sin), q_ref)
    torch.testing.assert_close(rope.rotate(k, cos, sin), k_ref)


def test_partial_rotation_leaves_the_rest_untouched():
    x = torch.randn(1, 2, 5, DIM)
    cos, sin = rope.cos_sin(torch.arange(5)[None], rope.default_inv_freq(16, BASE), 1.0, torch.float32)
    rotated = rope.rotate(x, cos, sin)
    assert torch.equal(rotated[..., 16:], x[..., 16:])
    torch.testing.assert_close(rotated[..., :16].norm(dim=-1), x[..., :16].norm(dim=-1))  # a rotation


@pytest.mark.parametrize("rotary_dim", [DIM, 16], ids=["full", "partial"])
def test_rotating_into_a_buffer_matches_transformers(rotary_dim):
    torch.manual_seed(1)
    k = torch.randn(2, 2, 7, DIM)
    positions = torch.arange(7)[None].expand(2, -1) + torch.tensor([[0], [5]])
    cos, sin = rope.cos_sin(positions, rope.default_inv_freq(rotary_dim, BASE), 1.3, torch.float32)
    _, k_ref = apply_rotary_pos_emb(k[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
    buffer = torch.full((2, 2, 9, DIM), float("nan"))[:, :, :7]  # a view of a longer buffer, as DeferredRotation's
    out = rope.rotate_into(buffer, k, cos, sin)
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(out, torch.cat([k_ref, k[..., rotary_dim:]], dim=-1))


def test_per_sequence_frequencies_rotate_each_row_with_its_own():
    inv_a, inv_b = rope.default_inv_freq(DIM, BASE), rope.default_inv_freq(DIM, 4 * BASE)
    positions = torch.arange(6)[None].expand(2, -1)
    cos, sin = rope.cos_sin(positions, torch.stack([inv_a, inv_b]), torch.tensor([1.0, 1.2]), torch.float32)
    for row, (inv, scale) in enumerate([(inv_a, 1.0), (inv_b, 1.2)]):
        cos_row, sin_row = rope.cos_sin(positions[:1], inv, scale, torch.float32)
        assert torch.equal(cos[row], cos_row[0]) and torch.equal(sin[row], sin_row[0])


def rotated_pairs_float64(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, pairs) -> torch.Tensor:
    """The definition in float64: feature pair ``pairs[i] = (a, b)`` turned by angle position * theta_i,
    (x_a, x_b) -> (x_a cos - x_b sin, x_b cos + x_a sin); features in no pair pass through."""
    out = x.double().clone()
    angles = positions.double()[:, None, :, None] * inv_freq.double()  # (B, 1, L, F)
    for i, (a, b) in enumerate(pairs):
        cos, sin = angles[..., i].cos(), angles[..., i].sin()
        out[..., a] = x[..., a].double() * cos - x[..., b].double() * sin
        out[..., b] = x[..., b].double() * cos + x[..., a].double() * sin
    return out


@pytest.mark.parametrize("rotary_dim", [DIM, 16], ids=["full", "partial"])
@pytest.mark.parametrize(
    "pairing, pairs",
    [
        (rope.HALF, lambda r: [(i, i + r // 2) for i in range(r // 2)]),
        (rope.INTERLEAVED, lambda r: [(2 * i, 2 * i + 1) for i in range(r // 2)]),  # GPT-J, Cohere, GLM
        (rope.HALF_SWAPPED, lambda r: [(i + r // 2, i) for i in range(r // 2)]),  # NanoChat: rotate-half by -theta
    ],
)
def test_each_pairing_rotates_as_its_definition(pairing, pairs, rotary_dim):
    """Reordered into rotate-half pairs, pos_swap's rotation turns each of the model's pairs by position * theta_i
    (float64 reference from the definition); dot products of queries and keys reordered alike are unchanged."""
    torch.manual_seed(2)
    q, k = torch.randn(2, 4, 7, DIM, dtype=torch.float64), torch.randn(2, 4, 7, DIM, dtype=torch.float64)
    positions = torch.arange(7)[None].expand(2, -1) + torch.tensor([[0], [5]])
    inv_freq = rope.default_inv_freq(rotary_dim, BASE).double()
    angles = positions.double()[..., None] * inv_freq  # (B, L, F); rope.cos_sin computes in float32, as transformers
    cos, sin = torch.cat((angles, angles), dim=-1).cos(), torch.cat((angles, angles), dim=-1).sin()
    for x in (q, k):
        expected = rotated_pairs_float64(x, positions, inv_freq, pairs(rotary_dim))
        got = rope.rotate(rope.to_half_pairs(x, rotary_dim, pairing), cos, sin)
        torch.testing.assert_close(got, rope.to_half_pairs(expected, rotary_dim, pairing), rtol=1e-12, atol=1e-12)
        assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])  # features past the rotary part stay put
    reordered = [rope.to_half_pairs(x, rotary_dim, pairing) for x in (q, k)]
    torch.testing.assert_close(reordered[0] @ reordered[1].transpose(-1, -2), q @ k.transpose(-1, -2))


def test_interleaved_pairs_match_transformers_cohere():
    """transformers' own interleaved rotation (Cohere's apply_rotary_pos_emb and its repeat-interleaved tables)."""
    from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_rotary

    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 6, DIM), torch.randn(1, 2, 6, DIM)
    positions = torch.arange(6)[None]
    inv_freq = rope.default_inv_freq(DIM, BASE)
    freqs = positions[..., None].float() * inv_freq
    q_ref, k_ref = cohere_rotary(q, k, freqs.repeat_interleave(2, -1).cos(), freqs.repeat_interleave(2, -1).sin())
    cos, sin = rope.cos_sin(positions, inv_freq, 1.0, torch.float32)
    for x, ref in ((q, q_ref), (k, k_ref)):
        got = rope.rotate(rope.to_half_pairs(x, DIM, rope.INTERLEAVED), cos, sin)
        torch.testing.assert_close(got, rope.to_half_pairs(ref, DIM, rope.INTERLEAVED))


def test_an_unknown_pairing_is_an_error():
    with pytest.raises(ValueError, match="unknown rotary pairing 'diagonal'"):
        rope.to_half_pairs(torch.zeros(1, 4), 4, "diagonal")


def test_row_rules_match_transformers_row_by_row():
    """The tensor forms behind per-position decoding (a length or a factor per sequence) against transformers'
    scalar rules, one row per length."""
    lengths = [100, L0, L0 + 1, 3 * L0, 10 * L0]
    inv_freq, scaling = rope.dynamic_ntk_rows(DIM, BASE, 2.0, L0, torch.tensor(lengths))
    assert scaling.tolist() == [1.0] * len(lengths)
    for row, length in zip(inv_freq, lengths):
        torch.testing.assert_close(row, hf("dynamic", seq_len=length, factor=2.0)[0], rtol=1e-6, atol=0)
    factors = [1.5, 4.0, 16.0]
    for row, factor in zip(rope.yarn_rows(DIM, BASE, torch.tensor(factors), L0), factors):
        theirs = hf("yarn", factor=factor, original_max_position_embeddings=L0)[0]
        torch.testing.assert_close(row, theirs, rtol=1e-6, atol=0)
    temperatures = rope.yarn_mscale_rows(torch.tensor([0.5, 1.0, 4.0, 32.0], dtype=torch.float64), 0.707)
    assert temperatures.tolist() == pytest.approx([1.0, 1.0, 0.1 * 0.707 * math.log(4) + 1, 0.1 * 0.707 * math.log(32) + 1])
