"""Patched models under generate() with the KV cache, and under left padding.

Static schemes must give exactly what recomputing without a cache gives. Schemes whose frequencies follow the
length (dynamic, dynamic-yarn, longrope) rotate every cached key at attention time with the current frequencies:
on a one-layer model that is exactly recomputation; deeper layers also carry hidden states that were computed
when the context was shorter, which no key-caching scheme can change, but the drift stays well below that of
transformers' own dynamic NTK, whose cached keys keep the old base.
"""

import pytest
import torch
import transformers as T

import pos_swap
from conftest import COMMON, ROPE_ARCHS, scheme_params, tiny

STATIC = ["linear", "ntk", "yarn", "llama3"]
FOLLOWS_LENGTH = ["dynamic", "dynamic-yarn", "longrope"]
PROMPT, NEW = 20, 24  # generation crosses the 32 trained positions


def prompt(batch=1, length=PROMPT, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, **kwargs,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


def recompute(model, sequences):
    """Logits each generation step would give with no cache: one full forward per prefix."""
    with torch.no_grad():
        return torch.stack([model(sequences[:, :t]).logits[:, -1] for t in range(PROMPT, PROMPT + NEW)], 1)


def one_layer(arch):
    extra = {"layer_types": ["full_attention"]} if arch == "gemma3_text" else {}
    return tiny(arch, num_hidden_layers=1, **extra)


@pytest.mark.parametrize("arch", list(ROPE_ARCHS))
@pytest.mark.parametrize("scheme", STATIC + FOLLOWS_LENGTH)
def test_generate_with_cache_equals_recomputation(arch, scheme):
    """Exact for static schemes; for length-following ones on a one-layer model, where only the keys (cached
    before rotation) carry the past, which proves they stay consistent as the frequencies change."""
    model = tiny(arch) if scheme in STATIC else one_layer(arch)
    pos_swap.patch(model, scheme, **scheme_params(scheme, model))
    sequences, cached = generate(model, prompt())
    torch.testing.assert_close(cached, recompute(model, sequences), rtol=0, atol=1e-4)


def test_dynamic_drifts_far_less_than_transformers_dynamic():
    """Mean over five random 4-layer models of the largest cached-vs-recomputed logit gap."""
    kwargs = {**COMMON, "num_hidden_layers": 4}
    drift = {"ours": 0.0, "theirs": 0.0}
    for seed in range(5):
        torch.manual_seed(seed)
        ours = T.LlamaForCausalLM(T.LlamaConfig(**kwargs)).eval()
        theirs = T.LlamaForCausalLM(
            T.LlamaConfig(**kwargs, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
        ).eval()
        theirs.load_state_dict(ours.state_dict())
        pos_swap.patch(ours, "dynamic", factor=2.0)
        for name, model in (("ours", ours), ("theirs", theirs)):
            sequences, cached = generate(model, prompt())
            drift[name] += (cached - recompute(model, sequences)).abs().max().item() / 5
    assert drift["ours"] < drift["theirs"] / 2, drift


def test_generation_can_cross_the_threshold_twice_and_reset():
    """A second generate() on the same patched model starts from native frequencies again."""
    model = one_layer("llama")
    pos_swap.patch(model, "dynamic", factor=2.0)
    first, _ = generate(model, prompt(seed=1))
    second, _ = generate(model, prompt(seed=1))
    assert torch.equal(first, second)


@pytest.mark.parametrize("arch", list(ROPE_ARCHS))
@pytest.mark.parametrize("scheme", STATIC + FOLLOWS_LENGTH)
def test_left_padding_equals_each_sequence_alone(arch, scheme):
    model = tiny(arch)
    pos_swap.patch(model, scheme, **scheme_params(scheme, model))
    long, short = prompt(length=40, seed=2)[0], prompt(length=28, seed=3)[0]
    batch = torch.zeros(2, 40, dtype=torch.long)
    batch[0], batch[1, 12:] = long, short
    mask = (torch.arange(40) >= torch.tensor([[0], [12]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them
    with torch.no_grad():
        together = model(batch, attention_mask=mask, position_ids=positions).logits
        alone = [model(seq[None]).logits[0] for seq in (long, short)]
    torch.testing.assert_close(together[0], alone[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(together[1, 12:], alone[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("scheme", ["yarn", "dynamic", "longrope"])
def test_left_padded_batch_generates_like_each_prompt_alone(scheme):
    model = one_layer("llama")
    pos_swap.patch(model, scheme, **scheme_params(scheme, model))
    long, short = prompt(length=PROMPT, seed=4), prompt(length=PROMPT - 6, seed=5)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    sequences, logits = generate(model, batch, attention_mask=mask)
    for row, alone in enumerate((long, short)):
        alone_sequences, alone_logits = generate(model, alone)
        assert torch.equal(sequences[row, -NEW:], alone_sequences[0, -NEW:])
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=0, atol=1e-4)
