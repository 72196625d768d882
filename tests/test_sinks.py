"""sinks (StreamingLLM, Xiao et al. 2024) and its SinkCache: positions and visibility against the cache StreamingLLM
builds by hand, attention against float64, a bounded cache that streams exactly what one forward computes, the
native model on the tokens the cache keeps, padding, backends, bad input, save and load."""

import copy

import pytest
import torch
from transformers import DynamicCache

import pos_swap
from pos_swap.errors import IncompatibleSchemeError, NotPatchedError, PosSwapError
from pos_swap.functional import sinks
from pos_swap.schemes.sinks import SinkCache
from conftest import assert_every_backend_gives_the_same_logits, eager_weights_and_float64_reference, tiny

SINKS, WINDOW = 2, 6
IDS = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def streaming_cache(i: int, sink_tokens: int, window: int) -> list[int]:
    """The tokens StreamingLLM holds when token i arrives, in cache order: the sinks, the window before i, i."""
    return sorted(set(range(min(sink_tokens, i))) | set(range(max(0, i - window), i + 1)))


def by_hand(length: int, sink_tokens: int, window: int):
    """Visibility and the distance RoPE sees ``(L, L)``: each query's place in its cache minus each key's."""
    seen = torch.zeros(length, length, dtype=torch.bool)
    distance = torch.zeros(length, length, dtype=torch.long)
    for i in range(length):
        cache = streaming_cache(i, sink_tokens, window)
        for place, j in enumerate(cache):
            seen[i, j] = True
            distance[i, j] = len(cache) - 1 - place
    return seen, distance


@pytest.mark.parametrize("sink_tokens, window", [(2, 6), (4, 3), (0, 5), (3, 40)])
def test_visibility_and_distances_follow_streaming_llm(sink_tokens, window):
    ranks = torch.arange(30)
    seen, distance = by_hand(30, sink_tokens, window)
    assert torch.equal(sinks.visible(ranks, ranks, sink_tokens, window), seen)
    got = sinks.relative_positions(ranks, ranks, sink_tokens, window)
    assert torch.equal(got[seen], distance[seen])
    assert distance.max() <= sink_tokens + window


def test_ranks_skip_padding_and_kept_slots_keep_sinks_and_window():
    valid = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    ranks = sinks.ranks(valid)
    assert ranks.tolist() == [[-1, -1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    slots, kept = sinks.kept_slots(ranks, valid.sum(-1), sink_tokens=1, window=2)
    # row 0 keeps rank 0 and the last two (3, 4) and one filler; row 1 keeps ranks 0, 5, 6 and one filler
    assert slots.shape == (2, 3)
    assert kept.tolist() == [[0, 3, 4], [0, 5, 6]]
    assert slots.tolist() == [[2, 5, 6], [0, 5, 6]]


def test_attention_weights_match_float64_reference():
    model = tiny("llama", attn_implementation="eager")
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    seen, distance = by_hand(IDS.shape[1], SINKS, WINDOW)
    weights, expected = eager_weights_and_float64_reference(model, 1, IDS, distance, allowed=seen)
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:sinks. sink_tokens")
def test_a_window_covering_the_input_is_the_native_model():
    model = tiny("llama")
    expected = logits(model, IDS)
    with pos_swap.patched(model, "sinks", sink_tokens=SINKS, window=IDS.shape[1]):
        torch.testing.assert_close(logits(model, IDS), expected, rtol=0, atol=1e-5)
    with pos_swap.patched(model, "sinks", sink_tokens=SINKS, window=WINDOW):  # and a short one does change it
        assert not torch.allclose(logits(model, IDS), expected, atol=1e-2)


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("chunks", [[1] * 40, [9, 1, 1, 13, 1, 15], [40]])
def test_a_sink_cache_streams_exactly_what_one_forward_computes(layers, chunks):
    """Fed in chunks of any size, the bounded cache gives the logits of one forward over the whole stream (the
    StreamingLLM pattern at every depth), while holding at most sink_tokens + window keys per layer."""
    model = tiny("llama", num_hidden_layers=layers)
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    expected = logits(model, IDS)
    cache, start, streamed = SinkCache(model), 0, []
    for size in chunks:
        streamed.append(logits(model, IDS[:, start : start + size], past_key_values=cache, use_cache=True))
        start += size
        assert all(layer.keys.shape[-2] <= SINKS + WINDOW for layer in cache.layers)
    assert cache.get_seq_length() == IDS.shape[1]
    torch.testing.assert_close(torch.cat(streamed, 1), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "phi3", "gpt_neox"])
def test_other_rope_architectures_stream_the_same(arch):
    model = tiny(arch)
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    cache = SinkCache(model)
    streamed = [logits(model, IDS[:1, t : t + 5], past_key_values=cache, use_cache=True) for t in range(0, 40, 5)]
    torch.testing.assert_close(torch.cat(streamed, 1), logits(model, IDS[:1]), rtol=0, atol=1e-5)
    assert all(layer.keys.shape[-2] <= SINKS + WINDOW for layer in cache.layers)


def test_a_dynamic_cache_gives_the_same_stream():
    model = tiny("llama")
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    cache = DynamicCache()
    streamed = [logits(model, IDS[:, t : t + 1], past_key_values=cache, use_cache=True) for t in range(IDS.shape[1])]
    torch.testing.assert_close(torch.cat(streamed, 1), logits(model, IDS), rtol=0, atol=1e-5)


def test_one_layer_equals_the_native_model_on_the_tokens_the_cache_keeps():
    """With one layer, the last token's logits depend only on the embeddings of the kept tokens: the native model
    on the sinks, the window and the token itself, as a fresh sequence (positions 0, 1, ...), must agree."""
    native = tiny("llama", num_hidden_layers=1)
    model = copy.deepcopy(native)
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    cache = SinkCache(model)
    for t in range(IDS.shape[1]):
        last = logits(model, IDS[:, t : t + 1], past_key_values=cache, use_cache=True)[:, -1]
        kept = IDS[:, streaming_cache(t, SINKS, WINDOW)]
        torch.testing.assert_close(last, logits(native, kept)[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_generate_with_a_sink_cache_equals_recomputation_in_constant_memory(attn_implementation):
    model = tiny("llama", attn_implementation=attn_implementation)
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    prompt, new = 12, 30  # well past the window and the 32 trained positions
    cache = SinkCache(model)
    with torch.no_grad():
        out = model.generate(
            IDS[:1, :prompt], past_key_values=cache, max_new_tokens=new, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    cached = torch.stack(out.logits, 1)  # (1, new, vocab)
    recomputed = torch.stack([logits(model, out.sequences[:, :t])[:, -1] for t in range(prompt, prompt + new)], 1)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-4)
    assert all(layer.keys.shape[-2] <= SINKS + WINDOW for layer in cache.layers)
    assert cache.get_max_length() == SINKS + WINDOW


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_left_padded_batch_equals_each_sequence_alone(attn_implementation):
    model = tiny("llama", attn_implementation=attn_implementation)
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    lengths, pad = [40, 27], 40
    sequences = [IDS[b, :n] for b, n in enumerate(lengths)]
    batch = torch.stack([torch.cat([torch.zeros(pad - len(s), dtype=torch.long), s]) for s in sequences])
    mask = torch.stack([torch.arange(pad) >= pad - len(s) for s in sequences]).long()
    padded = logits(model, batch, attention_mask=mask)
    for b, sequence in enumerate(sequences):
        torch.testing.assert_close(padded[b, pad - len(sequence) :], logits(model, sequence[None])[0], rtol=0, atol=1e-5)


def test_left_padded_generation_with_a_sink_cache_equals_each_sequence_alone():
    model = tiny("llama")
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    sequences = [IDS[0, :10], IDS[1, :4]]
    batch = torch.stack([torch.cat([torch.zeros(10 - len(s), dtype=torch.long), s]) for s in sequences])
    mask = (torch.arange(10)[None] >= torch.tensor([[0], [6]])).long()
    settings = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, past_key_values=SinkCache(model), **settings)
        for b, sequence in enumerate(sequences):
            alone = model.generate(sequence[None], past_key_values=SinkCache(model), **settings)
            torch.testing.assert_close(
                torch.stack(together.logits, 1)[b], torch.stack(alone.logits, 1)[0], rtol=0, atol=1e-4
            )


def test_every_backend_gives_the_same_logits():
    """eager and sdpa (the fused passes) as chosen; flex_attention is routed to sdpa's masks."""
    assert_every_backend_gives_the_same_logits("sinks", {"sink_tokens": SINKS, "window": WINDOW}, IDS)


def test_observers_see_the_sink_pattern():
    model = tiny("llama")
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    seen_by_hand, _ = by_hand(IDS.shape[1], SINKS, WINDOW)

    class Record:
        def queries_keys(self, module, query, key):
            pass

        def probabilities(self, module, probs, rows, cols, shape):
            self.nonzero = (probs[0, 0] > 0).cpu()

    recorder = Record()
    with pos_swap.observe(model, recorder):
        logits(model, IDS)
    assert torch.equal(recorder.nonzero, seen_by_hand)


def test_defaults_fill_the_trained_context_and_a_longer_cache_warns():
    model = tiny("llama")
    assert pos_swap.patch(model, "sinks").params == {"sink_tokens": 4, "window": 28}  # 32 trained positions
    with pytest.warns(UserWarning, match="exceeds the trained context"):
        pos_swap.patch(model, "sinks", window=40, replace=True)


def test_models_with_sliding_layers_are_refused():
    with pytest.raises(IncompatibleSchemeError, match="sliding_attention"):
        pos_swap.patch(tiny("gemma3_text"), "sinks", window=8)


def test_sink_cache_needs_the_patch_and_refuses_rollback():
    model = tiny("llama")
    with pytest.raises(NotPatchedError, match="patched with the 'sinks' scheme"):
        SinkCache(model)
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    cache = SinkCache(model)
    logits(model, IDS[:, :20], past_key_values=cache, use_cache=True)
    with pytest.raises(PosSwapError, match="cannot be cropped"):
        cache.crop(-2)
    pos_swap.unpatch(model)
    with pytest.raises(NotPatchedError, match="no longer carries"):
        logits(model, IDS[:, 20:22], past_key_values=cache, use_cache=True)


def test_save_and_load_round_trip(tmp_path):
    model = tiny("llama")
    pos_swap.patch(model, "sinks", sink_tokens=SINKS, window=WINDOW)
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded)["params"] == {"sink_tokens": SINKS, "window": WINDOW}
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


@pytest.mark.parametrize("scheme", [None, "sinks"])
def test_stream_losses_equal_one_forward_and_a_sink_cache_stays_bounded(scheme):
    from pos_swap.evaluate import stream_losses, token_losses

    model = tiny("llama")
    if scheme:
        pos_swap.patch(model, scheme, sink_tokens=SINKS, window=WINDOW)
    cache = SinkCache(model) if scheme else DynamicCache()
    losses, held = stream_losses(model, IDS[:1], cache, step=7, progress=False)
    torch.testing.assert_close(losses, token_losses(model, IDS[:1]), rtol=0, atol=1e-5)
    fed = [7, 14, 21, 28, 35, 40]  # the stream's length after each step
    assert held == ([min(SINKS + WINDOW, t) for t in fed] if scheme else fed)
