"""The self-extend scheme (Jin et al. 2024): its position math against the paper's rule written out by hand, the
patched attention against an independent float64 computation, and the life cycle every scheme must survive
(KV cache, left padding, bad input, removal, save and load)."""

import pytest
import torch
import transformers as T

import pos_swap
from pos_swap.errors import IncompatibleSchemeError, InvalidParameterError
from pos_swap.functional import self_extend
from conftest import eager_weights_and_float64_reference, tiny

IDS = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))  # past the 32 trained positions
SHORT = dict(window=8, group=4)  # most pairs of IDS fall outside the window


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def paper_distance(i: int, j: int, window: int, group: int) -> int:
    """The relative position Self-Extend gives query i and key j: i - j for neighbours, else the grouped query
    position i // G + W - W // G minus the grouped key position j // G."""
    if i - j < window:
        return i - j
    return (i // group + window - window // group) - j // group


# -- the pure math -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window, group", [(8, 4), (6, 2), (12, 3), (4, 4)])
def test_grouped_positions_follow_the_paper(window, group):
    positions = torch.arange(50)
    grouped_query, grouped_key = self_extend.grouped_positions(positions, positions, window, group)
    assert grouped_query.tolist() == [p // group + window - window // group for p in range(50)]
    assert grouped_key.tolist() == [p // group for p in range(50)]


@pytest.mark.parametrize("window, group", [(8, 4), (6, 2), (12, 3), (4, 4)])
def test_relative_positions_follow_the_paper(window, group):
    query = torch.tensor([[30, 31, 32, 33], [45, 46, 47, 48]])  # (B, Lq): the last rows of two sequences
    key = torch.stack([torch.arange(0, 34), torch.arange(15, 49)])  # (B, Lk)
    merged = self_extend.relative_positions(query, key, window, group)
    expected = [
        [[paper_distance(i, j, window, group) for j in key[b].tolist()] for i in query[b].tolist()] for b in range(2)
    ]
    assert merged.tolist() == expected


# -- the patched model -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", {}),
        ("qwen3", {}),
        ("gpt_neox", {}),  # partial rotary
        ("gemma3_text", {}),  # sliding layers keep native RoPE
        ("gemma2", {}),  # eager with logit soft-capping
        ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    ],
)
def test_window_covering_the_input_changes_nothing(arch, overrides):
    """With every pair inside the window Self-Extend is plain RoPE, with the model's own frequencies."""
    model = tiny(arch, **overrides)
    expected = logits(model, IDS)
    with pos_swap.patched(model, "self-extend", window=IDS.shape[1], group=4):
        torch.testing.assert_close(logits(model, IDS), expected, rtol=0, atol=1e-5)
    with pos_swap.patched(model, "self-extend", **SHORT):  # and a short window does change the model
        assert not torch.allclose(logits(model, IDS), expected, atol=1e-2)


def test_attention_weights_match_float64_reference():
    """One layer's attention weights against the paper's rule computed from that layer's own q and k in float64:
    RoPE makes each score Re(sum_f q_f conj(k_f) e^{i r theta_f}) with r the merged relative distance."""
    model = tiny("llama", attn_implementation="eager")
    window, group = SHORT["window"], SHORT["group"]
    pos_swap.patch(model, "self-extend", window=window, group=group)
    distance = torch.tensor([[paper_distance(i, j, window, group) for j in range(40)] for i in range(40)])
    weights, expected = eager_weights_and_float64_reference(model, 1, IDS, distance)
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma3_text"])
def test_generate_with_cache_equals_recomputation(arch):
    """Cached keys are stored unrotated and rotated at both positions each step, so the cache is exact."""
    prompt, new = 20, 24  # crosses the 32 trained positions
    model = tiny(arch)
    pos_swap.patch(model, "self-extend", **SHORT)
    ids = torch.randint(3, 100, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
        )
    cached = torch.stack(out.logits, 1)  # (1, new, vocab)
    recomputed = torch.stack([logits(model, out.sequences[:, :t])[:, -1] for t in range(prompt, prompt + new)], 1)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_left_padded_batch_equals_each_sequence_alone(attn_implementation):
    model = tiny("llama", attn_implementation=attn_implementation)
    pos_swap.patch(model, "self-extend", **SHORT)
    lengths, pad = [40, 27], 40
    sequences = [IDS[b, :n] for b, n in enumerate(lengths)]
    batch = torch.stack([torch.cat([torch.zeros(pad - len(s), dtype=torch.long), s]) for s in sequences])
    mask = torch.stack([torch.arange(pad) >= pad - len(s) for s in sequences]).long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = logits(model, batch, attention_mask=mask, position_ids=position_ids)
    for b, sequence in enumerate(sequences):
        alone = logits(model, sequence[None])[0]
        torch.testing.assert_close(padded[b, pad - len(sequence) :], alone, rtol=0, atol=1e-5)


# -- input checks and life cycle ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, message",
    [
        (dict(window=10, group=4), "window=10, group=4"),
        (dict(window=8, group=1), "must be > 1"),
        (dict(window=0, group=2), "must be > 0"),
        (dict(window=-8, group=2), "must be > 0"),
        (dict(window=8), "needs parameter 'group'"),
        (dict(window=8.0, group=4), "must be int"),
    ],
)
def test_bad_parameters_raise_and_leave_the_model_alone(params, message):
    model = tiny("llama")
    expected = logits(model, IDS)
    with pytest.raises(InvalidParameterError, match=message):
        pos_swap.patch(model, "self-extend", **params)
    assert pos_swap.describe(model) is None
    assert torch.equal(logits(model, IDS), expected)


def test_learned_position_model_is_incompatible():
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(IncompatibleSchemeError, match="self-extend"):
        pos_swap.patch(model, "self-extend", **SHORT)
    assert pos_swap.describe(model) is None


@pytest.mark.parametrize("arch, attn_implementation", [("llama", "sdpa"), ("llama", "eager"), ("gemma3_text", "sdpa")])
def test_remove_restores_bit_identical_logits(arch, attn_implementation):
    model = tiny(arch, attn_implementation=attn_implementation)
    expected = logits(model, IDS)
    handle = pos_swap.patch(model, "self-extend", **SHORT)
    assert not torch.allclose(logits(model, IDS), expected, atol=1e-2)
    handle.remove()
    assert torch.equal(logits(model, IDS), expected)
    assert model.config._attn_implementation == attn_implementation
    assert pos_swap.describe(model) is None


def test_save_and_load_round_trip(tmp_path):
    model = tiny("llama")
    pos_swap.patch(model, "self-extend", **SHORT)
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded) == pos_swap.describe(model)
    assert pos_swap.describe(loaded)["params"] == {**SHORT, "rope_factor": None}
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
