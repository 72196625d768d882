"""The rerope scheme (ReRoPE and leaky ReRoPE, Su 2023): its distances against the rule written out by hand, the
patched attention against an independent float64 computation, and the life cycle every scheme must survive (KV
caches, left padding, backends, bad input, save and load)."""

import pytest
import torch

import pos_swap
from pos_swap.errors import InvalidParameterError
from pos_swap.functional import rerope
from conftest import eager_weights_and_float64_reference, tiny

IDS = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))  # past the 32 trained positions
SETTINGS = [dict(window=8), dict(window=8, leaky_factor=4.0), dict(window=5, leaky_factor=1.5)]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def su_distance(i: int, j: int, window: int, leaky_factor: float | None) -> float:
    """The relative position ReRoPE gives query i and key j: i - j inside the window; beyond it the window itself,
    or for leaky ReRoPE the window plus the excess shrunk by the leaky factor."""
    if i - j < window:
        return i - j
    return window if leaky_factor is None else window + (i - j - window) / leaky_factor


@pytest.mark.parametrize("params", SETTINGS)
def test_distances_follow_the_rule(params):
    positions = torch.arange(30)
    expected = [[su_distance(i, j, **{"leaky_factor": None, **params}) for j in range(30)] for i in range(30)]
    got = rerope.relative_positions(positions, positions, params["window"], params.get("leaky_factor"))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    far_query, far_key = rerope.far_positions(positions, positions, params["window"], params.get("leaky_factor"))
    beyond = positions[:, None] - positions[None, :] >= params["window"]
    torch.testing.assert_close((far_query[:, None] - far_key[None, :]).double()[beyond], got[beyond], rtol=0, atol=1e-5)


@pytest.mark.parametrize("params", SETTINGS)
def test_attention_weights_match_float64_reference(params):
    model = tiny("llama", attn_implementation="eager")
    pos_swap.patch(model, "rerope", **params)
    length = IDS.shape[1]
    distance = torch.tensor([[su_distance(i, j, **{"leaky_factor": None, **params}) for j in range(length)] for i in range(length)])
    weights, expected = eager_weights_and_float64_reference(model, 1, IDS, distance)
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)


def test_window_covering_the_input_changes_nothing():
    model = tiny("llama")
    expected = logits(model, IDS)
    with pos_swap.patched(model, "rerope", window=IDS.shape[1]):
        torch.testing.assert_close(logits(model, IDS), expected, rtol=0, atol=1e-5)
    with pos_swap.patched(model, "rerope", window=8):  # and a short window does change the model
        assert not torch.allclose(logits(model, IDS), expected, atol=1e-2)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("params", SETTINGS[:2])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma3_text"])
def test_generate_with_cache_equals_recomputation(arch, params, cache):
    prompt, new = 20, 24  # crosses the 32 trained positions
    model = tiny(arch)
    pos_swap.patch(model, "rerope", **params)
    ids = torch.randint(3, 100, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, cache_implementation=cache,
        )  # fmt: skip
    cached = torch.stack(out.logits, 1)  # (1, new, vocab)
    recomputed = torch.stack([logits(model, out.sequences[:, :t])[:, -1] for t in range(prompt, prompt + new)], 1)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_left_padded_batch_equals_each_sequence_alone(attn_implementation):
    model = tiny("llama", attn_implementation=attn_implementation)
    pos_swap.patch(model, "rerope", window=8, leaky_factor=2.0)
    lengths, pad = [40, 27], 40
    sequences = [IDS[b, :n] for b, n in enumerate(lengths)]
    batch = torch.stack([torch.cat([torch.zeros(pad - len(s), dtype=torch.long), s]) for s in sequences])
    mask = torch.stack([torch.arange(pad) >= pad - len(s) for s in sequences]).long()
    padded = logits(model, batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    for b, sequence in enumerate(sequences):
        torch.testing.assert_close(padded[b, pad - len(sequence) :], logits(model, sequence[None])[0], rtol=0, atol=1e-5)


def test_every_backend_gives_the_same_logits():
    """eager and sdpa run as chosen; flex_attention is routed to sdpa's masks (the blockwise attention reads them)."""
    results = {}
    for backend in ("eager", "sdpa", "flex_attention"):
        model = tiny("llama", attn_implementation=backend)
        pos_swap.patch(model, "rerope", window=8)
        results[backend] = logits(model, IDS)
    torch.testing.assert_close(results["eager"], results["sdpa"], rtol=0, atol=1e-4)
    torch.testing.assert_close(results["flex_attention"], results["sdpa"], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(window=0), "must be > 0"),
        (dict(window=8.0), "must be int"),
        (dict(window=8, leaky_factor=1.0), "must be > 1"),
        (dict(window=8, leaky_factor=0.5), "must be > 1"),
        (dict(window=8, leaky_factor=float("inf")), "finite"),
    ],
)
def test_bad_parameters_raise_and_leave_the_model_alone(params, message):
    model = tiny("llama")
    expected = logits(model, IDS)
    with pytest.raises(InvalidParameterError, match=message):
        pos_swap.patch(model, "rerope", **params)
    assert pos_swap.describe(model) is None
    assert torch.equal(logits(model, IDS), expected)


def test_save_and_load_round_trip(tmp_path):
    model = tiny("llama")
    pos_swap.patch(model, "rerope", window=8, leaky_factor=4.0)
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded)["params"] == dict(window=8, leaky_factor=4.0)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
