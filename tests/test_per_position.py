"""Per-position frequencies for the length-following schemes (dynamic, dynamic-yarn, longrope), the default.

Each query row uses the frequencies of its own position rounded up to a block, for its query and for every key it
scores. A row then depends on its prefix only, so cached generation equals recomputation at any depth: the
whole-window mode (transformers' semantics) cannot, since earlier rows' hidden states were computed at a shorter
length.
"""

import math

import numpy as np
import pytest
import torch
import transformers as T
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import pos_swap
from pos_swap import archs, fused
from pos_swap.archs import CACHE_ARGUMENT
from pos_swap.attention import HOOK
from pos_swap.errors import InvalidParameterError
from pos_swap.functional import rope
from pos_swap.probe.observers import attention_stats
from conftest import COMMON, scheme_params, tiny

SCHEMES = ["dynamic", "dynamic-yarn", "longrope"]
BLOCK = 8
PROMPT, NEW = 20, 24  # generation crosses the 32 trained positions and several blocks


def patched(scheme, layers=2, arch="llama", **overrides):
    model = tiny(arch, num_hidden_layers=layers, **overrides)
    pos_swap.patch(model, scheme, **scheme_params(scheme, model), block=BLOCK)
    return model


def reference_attention(query, key, value, q_pos, k_pos, frequencies, block, scaling):
    """Float64 attention, row by row: query row i and every key rotated (as complex numbers, the first and second
    half of each head paired) with the inverse frequencies of i's block length, causal by position."""
    half = query.shape[-1] // 2
    out = torch.zeros_like(query)
    for i, p in enumerate(q_pos.tolist()):
        length = (p // block + 1) * block
        inv_freq, factor = frequencies(length)
        turn = lambda x, at: torch.polar(torch.full_like(at[:, None] * inv_freq, factor), at[:, None] * inv_freq) * (
            torch.complex(x[..., :half], x[..., half:])
        )  # fmt: skip
        q = turn(query[:, i : i + 1], torch.tensor([p], dtype=torch.float64))  # (H, 1, F)
        k = turn(key, k_pos.double())  # (H, Lk, F)
        scores = (q.conj() @ k.transpose(-1, -2)).real * scaling  # Re(q conj(k)) = rotated q . rotated k
        scores = scores.masked_fill(k_pos > p, -math.inf)
        out[:, i] = (torch.softmax(scores, -1) @ value)[:, 0]
    return out


@pytest.fixture
def fused_calls(monkeypatch):
    """The number of spans the fused causal kernel ran (a list that grows by one per span)."""
    calls, kernel = [], fused.shifted_causal_attention
    monkeypatch.setattr(fused, "shifted_causal_attention", lambda *args: calls.append(1) or kernel(*args))
    return calls


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("offset, q_len", [(0, 21), (13, 21), (40, 1)], ids=["prefill", "after-a-cache", "decode"])
def test_attention_equals_a_float64_reference(offset, q_len, path, fused_calls, monkeypatch):
    if path == "generic":
        monkeypatch.setenv(fused.SETTING, "chunked")
    model = patched("dynamic-yarn", layers=1).double()
    module = model.model.layers[0].self_attn
    hook = module._modules[HOOK]
    dim = 16
    k_len = offset + q_len
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, q_len, dim, generator=g, dtype=torch.float64)
    key, value = (torch.randn(1, 2, k_len, dim, generator=g, dtype=torch.float64) for _ in range(2))  # 2 KV heads
    q_pos, k_pos = torch.arange(offset, k_len), torch.arange(k_len)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # sdpa's boolean causal mask
    out, _ = hook(sdpa_attention_forward, module, query, key, value, mask, scaling=dim**-0.5, position_ids=q_pos[None])

    def frequencies(length):
        inv_freq, factor = hook.frequencies(torch.tensor([length]))
        return inv_freq[0].double(), float(factor[0])

    key, value = (x[0].repeat_interleave(2, dim=0) for x in (key, value))
    expected = reference_attention(query[0], key, value, q_pos, k_pos, frequencies, BLOCK, dim**-0.5)
    torch.testing.assert_close(out[0].transpose(0, 1), expected, rtol=0, atol=1e-6)  # float32 cos/sin tables
    passes = len(set(rope.block_lengths(q_pos, BLOCK, 32).tolist()))
    assert passes > 2 or q_len == 1  # several block lengths, several passes
    assert len(fused_calls) == (passes if path == "fused" else 0)


def chunked_logits(model, ids, chunks):
    """Logits of ``ids (1, L)`` fed through one cache in pieces ending at ``chunks``: a prefill, prefills that
    continue the cache, decode steps."""
    cache, logits, start = DynamicCache(), [], 0
    with torch.no_grad():
        for end in chunks:
            logits.append(model(ids[:, start:end], use_cache=True, **{CACHE_ARGUMENT: cache}).logits)
            start = end
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_fused_path_equals_the_generic_path(scheme, fused_calls, monkeypatch):
    """Prefill, a prefill after a cache and decode steps, across the trained context: the fused spans (causal
    kernel, tables shared by the layers) give the logits of the generic path (sdpa with a mask per span)."""
    model = patched(scheme, layers=3)
    ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(9))
    chunks = [27, 50, 51, 52, 60]
    fast = chunked_logits(model, ids, chunks)
    taken = len(fused_calls)
    assert taken >= 3 * len(chunks)  # every call of every layer took the fused path
    monkeypatch.setenv(fused.SETTING, "chunked")
    torch.testing.assert_close(fast, chunked_logits(model, ids, chunks), rtol=0, atol=1e-5)
    assert len(fused_calls) == taken  # the reference ran the generic path


def test_decode_steps_read_one_table_per_block_length(monkeypatch):
    """Successive decode steps share their frequencies for a block of positions: cos and sin are computed once per
    block length for every layer and step, and the tables read from it give the logits of fresh tables."""
    model = patched("dynamic-yarn", layers=3)
    ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(11))
    cache, builds, cos_sin = DynamicCache(), [], rope.cos_sin
    with torch.no_grad():
        model(ids[:, :20], use_cache=True, **{CACHE_ARGUMENT: cache})
        monkeypatch.setattr(rope, "cos_sin", lambda *args: builds.append(1) or cos_sin(*args))
        steps = [model(ids[:, p : p + 1], use_cache=True, **{CACHE_ARGUMENT: cache}).logits for p in range(20, 60)]
        monkeypatch.setattr(rope, "cos_sin", cos_sin)
        recomputed = model(ids).logits[:, 20:]
    new_lengths = set(rope.block_lengths(torch.arange(20, 60), BLOCK, 32).tolist()) - {24}  # 24: the prefill's last
    assert len(builds) == len(new_lengths) == 5  # 40 steps of 3 layers
    torch.testing.assert_close(torch.cat(steps, dim=1), recomputed, rtol=0, atol=1e-5)


def test_observers_see_on_the_fused_path_what_the_generic_path_shows(fused_calls, monkeypatch):
    model = patched("dynamic-yarn", layers=2)
    ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(10))

    def observed():
        with torch.no_grad(), attention_stats(model) as stats:
            model(ids)
        return stats.result()

    fast = observed()
    assert fused_calls
    monkeypatch.setenv(fused.SETTING, "chunked")
    generic = observed()
    for name in ("distance_profile", "sink_mass", "mean_distance", "entropy"):
        np.testing.assert_allclose(fast[name], generic[name], rtol=0, atol=1e-5)


def test_one_layer_rows_equal_transformers_dynamic_on_their_block():
    """On one layer, row i sees only keys, and the frequencies of length ceil((i + 1) / B) * B: what transformers'
    own dynamic NTK gives row i of the input cut at that length."""
    kwargs = {**COMMON, "num_hidden_layers": 1}
    torch.manual_seed(0)
    ours = T.LlamaForCausalLM(T.LlamaConfig(**kwargs)).eval()
    theirs = T.LlamaForCausalLM(
        T.LlamaConfig(**kwargs, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    ).eval()
    theirs.load_state_dict(ours.state_dict())
    pos_swap.patch(ours, "dynamic", factor=2.0, block=BLOCK)
    ids = torch.randint(3, 100, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(ids[:, :75]).logits[0]  # the last block is partial: its rows still use length 80
        for end in range(BLOCK, 80 + BLOCK, BLOCK):
            rows = slice(end - BLOCK, min(end, 75))
            torch.testing.assert_close(got[rows], theirs(ids[:, :end]).logits[0, rows], rtol=0, atol=1e-5)


def generate(model, ids, mask, cache):
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, cache_implementation=cache,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


def recomputed(model, tokens):
    """The logits each generation step would give for one unpadded sequence, recomputed with no cache."""
    with torch.no_grad():
        return torch.stack([model(tokens[None, :t]).logits[0, -1] for t in range(len(tokens) - NEW, len(tokens))])


@pytest.mark.parametrize("padded", [False, True], ids=["single", "left-padded"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cached_generation_equals_recomputation_at_any_depth(scheme, layers, cache, padded):
    model = patched(scheme, layers)
    ids = torch.randint(3, 100, (2 if padded else 1, PROMPT), generator=torch.Generator().manual_seed(layers))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :5], mask[1, :5] = 0, 0
    sequences, cached = generate(model, ids, mask, cache)
    for row, pads in enumerate((0, 5)[: len(ids)]):
        torch.testing.assert_close(cached[row], recomputed(model, sequences[row, pads:]), rtol=0, atol=1e-4)


def test_rope_retrofit_with_a_length_following_rule_is_per_position_too():
    model = tiny("gpt2", n_layer=2)
    pos_swap.patch(model, "rope", scaling="dynamic", scaling_params=dict(factor=2.0, block=BLOCK))
    assert archs.attention_modules(model)[0]._modules[HOOK].block == BLOCK
    ids = torch.randint(3, 100, (1, PROMPT), generator=torch.Generator().manual_seed(8))
    sequences, cached = generate(model, ids, torch.ones_like(ids), "dynamic")
    torch.testing.assert_close(cached[0], recomputed(model, sequences[0]), rtol=0, atol=1e-4)


def test_a_sliding_window_cache_equals_recomputation():
    model = patched("dynamic", layers=2, arch="mistral", sliding_window=12)
    ids = torch.randint(3, 100, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    sequences, cached = generate(model, ids, torch.ones_like(ids), "dynamic")
    torch.testing.assert_close(cached[0], recomputed(model, sequences[0]), rtol=0, atol=1e-4)


def test_whole_window_mode_drifts_where_per_position_does_not():
    """The control: with per_position=False the same 4-layer generation differs from recomputation."""
    model = tiny("llama", num_hidden_layers=4)
    pos_swap.patch(model, "dynamic", factor=2.0, per_position=False)
    ids = torch.randint(3, 100, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    sequences, cached = generate(model, ids, torch.ones_like(ids), "dynamic")
    assert (cached[0] - recomputed(model, sequences[0])).abs().max() > 1e-2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_left_padding_equals_each_sequence_alone(scheme):
    model = patched(scheme, layers=2)
    long, short = (torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(n)) for n in (70, 51))
    batch = torch.zeros(2, 70, dtype=torch.long)
    batch[0], batch[1, 19:] = long, short
    mask = (torch.arange(70) >= torch.tensor([[0], [19]])).long()
    with torch.no_grad():
        together = model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        alone = [model(seq[None]).logits[0] for seq in (long, short)]
    torch.testing.assert_close(together[0], alone[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(together[1, 19:], alone[1], rtol=0, atol=1e-4)


def test_eager_and_sdpa_agree_and_eager_returns_the_weights():
    ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(5))
    eager, sdpa = patched("dynamic", attn_implementation="eager"), patched("dynamic")
    with torch.no_grad():
        out = eager(ids, output_attentions=True)
        torch.testing.assert_close(out.logits, sdpa(ids).logits, rtol=0, atol=1e-4)
    weights = out.attentions[0]  # (B, H, L, L)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), rtol=0, atol=1e-5)
    assert torch.all(weights.triu(1) == 0)  # causal: no weight on later keys


@pytest.mark.parametrize("trained, block", [(32, BLOCK), (36, BLOCK), (29, BLOCK), (36, None)])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_within_the_trained_context_it_is_the_native_model(scheme, trained, block):
    """Every row inside the trained context uses the frequencies of that context, also where it is not a
    multiple of the block (36 and 29 with blocks of 8; 36 with the default block of 512): the native model for
    dynamic and dynamic-yarn, longrope's short factors (its whole-window form at that length)."""
    native = tiny("llama", max_position_embeddings=trained)
    native_params = dict(per_position=False) if scheme == "longrope" else None
    if native_params is not None:
        pos_swap.patch(native, scheme, **scheme_params(scheme, native), **native_params)
    model = tiny("llama", max_position_embeddings=trained)
    pos_swap.patch(model, scheme, **scheme_params(scheme, model), **({} if block is None else {"block": block}))
    ids = torch.randint(3, 100, (1, trained), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, native(ids).logits, rtol=0, atol=1e-5)


def test_block_lengths_round_up_to_the_block_but_not_past_the_trained_context():
    lengths = rope.block_lengths(torch.tensor([0, 7, 8, 31, 32, 35, 36, 39, 40]), 8, 36)
    assert lengths.tolist() == [8, 8, 16, 32, 36, 36, 40, 40, 48]


def test_save_and_load_keep_the_mode(tmp_path):
    model = patched("dynamic-yarn")
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    hook = archs.attention_modules(loaded)[0]._modules[HOOK]
    assert hook.block == BLOCK and pos_swap.describe(loaded)["params"]["per_position"] is True
    ids = torch.randint(3, 100, (1, 50), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "params, problem",
    [(dict(block=0), "block"), (dict(block=2.5), "block"), (dict(per_position="yes"), "per_position")],
)
def test_nonsense_parameters_are_refused(params, problem):
    with pytest.raises(InvalidParameterError, match=problem):
        pos_swap.patch(tiny("llama"), "dynamic", factor=2.0, **params)
