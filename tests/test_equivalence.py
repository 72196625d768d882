"""Every RoPE-scaling scheme on every RoPE architecture gives transformers' own logits for the same parameters.

The reference rebuilds the model's rotary module with transformers' ROPE_INIT_FUNCTIONS from a config holding
the scheme's ``rope_parameters`` (what ``from_pretrained(..., rope_parameters=...)`` would do).
"""

import math

import pytest
import torch

import pos_swap
from pos_swap import archs
from conftest import ROPE_ARCHS, plain_params, tiny, transformers_reference

HF_EXPRESSIBLE = ["linear", "ntk", "dynamic", "yarn", "longrope", "llama3"]
WHOLE_WINDOW = dict(per_position=False)  # transformers' semantics for the length-following rules


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def expected_rope_parameters(scheme: str, rope_theta: float, dim: int) -> dict:
    """By hand, independently of the schemes' ``hf_rope_parameters``: the plain transformers ``rope_parameters``
    of conftest's SCHEME_PARAMS for a rotary table of ``dim`` dimensions and base ``rope_theta``, trained on 32
    positions."""
    half = dim // 2
    return {
        "linear": {"rope_type": "linear", "factor": 4.0},
        # NTK-aware: the base grows by factor^(d / (d - 2)), so the lowest frequency is stretched by the factor
        "ntk": {"rope_type": "default", "rope_theta": rope_theta * 4.0 ** (dim / (dim - 2))},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "yarn": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
            "beta_slow": 1.0, "truncate": True,
        },
        "longrope": {
            "rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 32,
            "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5][:half],
            "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7][:half],
        },
        "llama3": {
            "rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    }[scheme]  # fmt: skip


def expected_by_slot(model, scheme: str) -> dict:
    """:func:`expected_rope_parameters` for each rotary table the scheme rescales (Gemma 3: the global layers')."""
    return {
        slot.layer_type: expected_rope_parameters(scheme, slot.rope_parameters(model.config)["rope_theta"], slot.dim)
        for slot in archs.rotary_slots(model)
    }


@pytest.mark.parametrize("arch", list(ROPE_ARCHS))
@pytest.mark.parametrize("scheme", HF_EXPRESSIBLE)
def test_exported_rope_parameters_match_the_table(arch, scheme):
    model = tiny(arch)
    handle = pos_swap.patch(model, scheme, **plain_params(scheme, model))
    handle.remove()
    exported = {slot.layer_type: handle.scheme.hf_rope_parameters(model.config, slot) for slot in archs.rotary_slots(model)}
    expected = expected_by_slot(model, scheme)
    assert exported.keys() == expected.keys()
    for slot, params in expected.items():
        assert exported[slot].keys() == params.keys(), slot
        for key, value in params.items():  # float parameters to rounding, the rest exactly
            assert exported[slot][key] == (pytest.approx(value, rel=1e-12) if key != "rope_type" else value), key


@pytest.mark.parametrize("arch", list(ROPE_ARCHS))
@pytest.mark.parametrize("scheme", HF_EXPRESSIBLE)
@pytest.mark.parametrize("length", [24, 80])  # inside and beyond the 32 trained positions
def test_patched_model_matches_transformers(arch, scheme, length):
    """The reference is transformers' rotary built from the hand-written table, not from the code under test."""
    model = tiny(arch)
    ids = torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(length))
    native = logits(model, ids)
    reference = logits(transformers_reference(model, expected_by_slot(model, scheme)), ids)
    pos_swap.patch(model, scheme, **plain_params(scheme, model))
    patched = logits(model, ids)
    torch.testing.assert_close(patched, reference, rtol=0, atol=1e-5)
    if length > 32 or scheme not in ("dynamic", "longrope"):
        assert (patched - native).abs().max() > 1e-2  # the patch changed the model: the test can fail


def test_dynamic_yarn_is_yarn_with_the_length_as_factor():
    model = tiny("llama")
    ids = torch.randint(3, 100, (1, 80), generator=torch.Generator().manual_seed(0))
    native = logits(model, ids[:, :32])
    with pos_swap.patched(model, "yarn", factor=80 / 32):
        static = logits(model, ids)
    with pos_swap.patched(model, "dynamic-yarn", **WHOLE_WINDOW):
        torch.testing.assert_close(logits(model, ids), static, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits(model, ids[:, :32]), native, rtol=0, atol=1e-5)  # native within L0
    capped = tiny("llama")
    pos_swap.patch(capped, "yarn", factor=2.0)
    with pos_swap.patched(model, "dynamic-yarn", max_factor=2.0, **WHOLE_WINDOW):
        torch.testing.assert_close(logits(model, ids), logits(capped, ids), rtol=0, atol=1e-5)


def test_dynamic_yarn_temperature_follows_its_mscale():
    model = tiny("llama")
    ids = torch.randint(3, 100, (1, 80), generator=torch.Generator().manual_seed(0))
    factor = 80 / 32
    with pos_swap.patched(model, "yarn", factor=factor, attention_factor=0.1 * 0.5 * math.log(factor) + 1):
        static = logits(model, ids)
    with pos_swap.patched(model, "dynamic-yarn", mscale=0.5, **WHOLE_WINDOW):
        torch.testing.assert_close(logits(model, ids), static, rtol=0, atol=1e-5)
    with pos_swap.patched(model, "dynamic-yarn", **WHOLE_WINDOW):
        assert (logits(model, ids) - static).abs().max() > 1e-3  # the temperature mattered


def test_gemma3_rescales_only_global_layers():
    model = tiny("gemma3_text")
    rotary = model.base_model.rotary_emb
    sliding, full = rotary.sliding_attention_inv_freq.clone(), rotary.full_attention_inv_freq.clone()
    with pos_swap.patched(model, "linear", factor=4.0):
        assert torch.equal(rotary.sliding_attention_inv_freq, sliding)
        torch.testing.assert_close(rotary.full_attention_inv_freq, full / 4.0)


def test_every_attention_backend_gives_the_same_result():
    ids = torch.randint(3, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("eager", "sdpa"):
        model = tiny("llama", attn_implementation=backend)
        for scheme in ("yarn", "dynamic"):
            with pos_swap.patched(model, scheme, factor=4.0):
                results[backend, scheme] = logits(model, ids)
    for scheme in ("yarn", "dynamic"):
        torch.testing.assert_close(results["eager", scheme], results["sdpa", scheme], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_flex_attention_backend_matches_sdpa():
    ids = torch.randint(3, 100, (1, 64), generator=torch.Generator().manual_seed(0))
    flex, sdpa = tiny("llama", attn_implementation="flex_attention"), tiny("llama")
    for scheme in ("yarn", "dynamic"):
        with pos_swap.patched(flex, scheme, factor=4.0), pos_swap.patched(sdpa, scheme, factor=4.0):
            torch.testing.assert_close(logits(flex, ids), logits(sdpa, ids), rtol=0, atol=1e-4)
