"""Every scheme that routes attention, under every kind of KV cache, equals recomputation without a cache.

A dynamic cache hands the attention function keys that end with the queries; a static cache (the one
``torch.compile`` generation uses) its whole pre-allocated buffer, queries at their cache positions and empty
slots after them; a sliding-window cache only the last keys. Key positions must come from where the cache really
put the queries, also with left padding.
"""

import pytest
import torch

import pos_swap
from conftest import SCHEME_PARAMS, tiny

PROMPT, NEW = 20, 16  # generation crosses the 32 trained positions
# per-position frequencies in blocks of 8: dynamic, dynamic-yarn and longrope switch from their in-context to their
# scaled frequencies at position 32, during generation (with the default block of 512 nothing would switch here)
BLOCK = dict(block=8)
SLIDING = dict(sliding_window=8)
CASES = [  # (arch, scheme, params, model overrides)
    ("llama", "dynamic", dict(factor=2.0, **BLOCK), {}),
    ("llama", "dynamic-yarn", BLOCK, {}),
    ("llama", "longrope", {**SCHEME_PARAMS["longrope"], **BLOCK}, {}),
    ("llama", "alibi", {}, {}),
    ("llama", "cope", dict(init="normal"), {}),
    ("llama", "self-extend", dict(window=8, group=2), {}),
    ("gpt2", "rope", {}, {}),
    ("opt", "rope", dict(scaling="dynamic", scaling_params={"factor": 2.0, **BLOCK}), {}),
    ("gpt2", "alibi", {}, {}),
    ("mistral", "alibi", {}, SLIDING),
    ("mistral", "self-extend", dict(window=4, group=2), SLIDING),
    ("mistral", "dynamic", dict(factor=2.0, **BLOCK), SLIDING),
    ("llama", "rerope", dict(window=8, leaky_factor=2.0), {}),
    ("mistral", "rerope", dict(window=4), SLIDING),
    ("llama", "dual-chunk", dict(chunk_size=12, local_window=3), {}),
    ("mistral", "dual-chunk", dict(chunk_size=6, local_window=2), SLIDING),
    ("llama", "sinks", dict(sink_tokens=2, window=6), {}),
    ("llama", "string", dict(shift=10, local_window=3), {}),
    ("mistral", "string", dict(shift=6, local_window=2), SLIDING),
    ("llama", "dpe", dict(window=8, groups=[1, 2, 4, 8]), {}),
    ("mistral", "dpe", dict(window=4, groups=[2, 4]), SLIDING),
]
HELD_OUT = [
    ("gemma2", "alibi", {}, {}),  # eager, soft-capping, sliding layers alternating with full ones
    ("qwen2", "cope", dict(init="normal"), {}),
    ("opt", "alibi", dict(trainable=True), {}),
]


def patched_model(arch, scheme, params, overrides):
    model = tiny(arch, num_hidden_layers=1, **overrides)  # one layer: only the keys carry the past
    pos_swap.patch(model, scheme, **params)
    return model


def prompts(padded: bool):
    """One prompt (transformers may then pass no mask at all), or two with the second left-padded by 6."""
    ids = torch.randint(3, 100, (2 if padded else 1, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :6], mask[1, :6] = 0, 0
    return ids, mask


def alone_without_cache(model, tokens):
    """The logits each generation step would give for one unpadded sequence, recomputed from scratch."""
    with torch.no_grad():
        return torch.stack([model(tokens[None, :t]).logits[0, -1] for t in range(len(tokens) - NEW, len(tokens))])


@pytest.mark.parametrize("padded", [False, True], ids=["single", "left-padded"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch, scheme, params, overrides", CASES + HELD_OUT)
def test_generation_with_cache_equals_recomputation(arch, scheme, params, overrides, cache, padded):
    model = patched_model(arch, scheme, params, overrides)
    ids, mask = prompts(padded)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, cache_implementation=cache,
        )  # fmt: skip
    cached = torch.stack(out.logits, 1)  # (B, NEW, vocab)
    for row, pads in enumerate((0, 6)[: len(ids)]):
        expected = alone_without_cache(model, out.sequences[row, pads:])
        torch.testing.assert_close(cached[row], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch, scheme, params, overrides", CASES[:6])
def test_a_static_cache_prefilled_in_two_steps(arch, scheme, params, overrides):
    """A second prefill chunk meets a partly filled static buffer: several queries, neither first nor last."""
    from transformers import StaticCache

    model = patched_model(arch, scheme, params, overrides)
    ids = torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(1))
    cache = StaticCache(config=model.config, max_cache_len=40)
    with torch.no_grad():
        model(ids[:, :10], past_key_values=cache, use_cache=True)
        second = model(ids[:, 10:], past_key_values=cache, use_cache=True, position_ids=torch.arange(10, 24)[None]).logits
        whole = model(ids).logits
    torch.testing.assert_close(second, whole[:, 10:], rtol=0, atol=1e-4)
