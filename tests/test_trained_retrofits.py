"""The retrofits a model is trained into: ``p-rope`` (only the highest rotary frequencies rotate) and ``nope`` on
chosen layers (interleaved position-free layers, Llama 4 / SmolLM3).

References: the definition in float64, transformers' own ``proportional`` rope type (Gemma 4's p-RoPE) and its
SmolLM3 model, which skips RoPE on the layers its ``no_rope_layers`` marks.
"""

import math

import pytest
import torch
import transformers as T
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import pos_swap
from pos_swap import archs, errors
from pos_swap.functional import rope
from pos_swap.schemes.nope import every_kth
from conftest import COMMON, ROPE_ARCHS, eager_weights_and_float64_reference, outputs, tiny, transformers_reference

WHOLE_HEAD_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2"]  # rotary over whole heads, plain RoPE
IDS = torch.randint(3, 100, (2, 70), generator=torch.Generator().manual_seed(0))  # past the 32 trained positions
SETTINGS = [("p-rope", dict(p=0.5)), ("p-rope", dict(p=0.25)), ("nope", dict(every=2)), ("nope", dict(layers=[0, 2]))]


def four_layers(arch):
    extra = {"layer_types": ["sliding_attention", "full_attention"] * 2} if arch == "gemma3_text" else {}
    return tiny(arch, num_hidden_layers=4, **extra)


def generate_and_recompute(model, ids, cache):
    """Logits of greedy generation with a KV cache, and the same steps recomputed without one."""
    new = 8
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, cache_implementation=cache,
        )  # fmt: skip
        recomputed = [model(out.sequences[:, :t]).logits[:, -1] for t in range(ids.shape[1], ids.shape[1] + new)]
    return torch.stack(out.logits, 1), torch.stack(recomputed, 1)


# -- p-rope: the pure math -----------------------------------------------------------------------------------


@pytest.mark.parametrize("planes", [4, 8, 32, 64])
@pytest.mark.parametrize("p", [0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 1.0])
def test_p_rope_keeps_the_highest_floor_p_planes(planes, p):
    """Frequency i (highest first) keeps base^(-2i/d) for i < floor(p * planes) and is 0 after, as transformers'
    proportional rope type (Gemma 4) computes it."""
    dim, base = 2 * planes, 10000.0
    kept = math.floor(p * planes + 1e-9)
    expected = torch.tensor([base ** (-2 * i / dim) if i < kept else 0.0 for i in range(planes)], dtype=torch.float64)
    inv_freq = rope.p_rope(rope.default_inv_freq(dim, base), p)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    config = T.LlamaConfig(hidden_size=dim, num_attention_heads=1, rope_parameters={
        "rope_type": "proportional", "rope_theta": base, "partial_rotary_factor": p})  # fmt: skip
    theirs, scaling = ROPE_INIT_FUNCTIONS["proportional"](config, "cpu")
    assert torch.equal(inv_freq, theirs) and scaling == 1.0


def test_p_rope_cuts_the_lowest_frequencies_whatever_their_order():
    shuffled = torch.tensor([0.01, 1.0, 0.1, 0.001])
    assert torch.equal(rope.p_rope(shuffled, 0.5), torch.tensor([0.0, 1.0, 0.1, 0.0]))


# -- p-rope on models --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ROPE_ARCHS))
def test_p_rope_at_one_is_the_native_model_bit_for_bit(arch):
    model = tiny(arch)
    native = outputs(model, IDS)
    pos_swap.patch(model, "p-rope", p=1.0)
    assert torch.equal(outputs(model, IDS), native)


@pytest.mark.parametrize("arch", WHOLE_HEAD_ARCHS + ["gemma3_text"])
@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_p_rope_equals_transformers_proportional_rope(arch, p):
    """The patched model against the unpatched one whose rotary transformers rebuilds as ``proportional``; on
    Gemma 3 the global layers change and the sliding ones keep RoPE, Gemma 4's layout."""
    model = tiny(arch)
    slots = archs.rotary_slots(model)
    reference = transformers_reference(model, {s.layer_type: {"rope_type": "proportional", "partial_rotary_factor": p}
                                               for s in slots})  # fmt: skip
    pos_swap.patch(model, "p-rope", p=p)
    torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=0, atol=1e-5)
    assert not torch.equal(outputs(model, IDS), outputs(tiny(arch), IDS))


@pytest.mark.parametrize("arch", ["gpt_neox", "phi3"])
def test_p_rope_on_partial_rotary_keeps_the_top_planes_of_the_rotated_part(arch):
    model = tiny(arch)
    (slot,) = archs.rotary_slots(model)
    native = slot.inv_freq.clone()
    pos_swap.patch(model, "p-rope", p=0.5)
    planes = len(native)
    assert torch.equal(slot.inv_freq[: planes // 2], native[: planes // 2])
    assert not slot.inv_freq[planes // 2 :].any()


@pytest.mark.parametrize("arch, name, params", [(a, n, p) for a in ("llama", "gemma3_text", "gpt_neox")
                                                for n, p in SETTINGS[1:3]])  # fmt: skip
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cached_generation_equals_recomputation(arch, name, params, cache):
    model = four_layers(arch)
    pos_swap.patch(model, name, **params)
    cached, recomputed = generate_and_recompute(model, IDS[:1, :20], cache)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name, params", SETTINGS)
def test_save_and_load_round_trip(tmp_path, name, params):
    model = tiny("llama", num_hidden_layers=4)
    pos_swap.patch(model, name, **params)
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded) == pos_swap.describe(model)
    assert torch.equal(outputs(loaded, IDS), outputs(model, IDS))
    pos_swap.unpatch(loaded)
    assert torch.equal(outputs(loaded, IDS), outputs(tiny("llama", num_hidden_layers=4), IDS))


@pytest.mark.parametrize("arch", WHOLE_HEAD_ARCHS + ["gemma3_text"])
def test_p_rope_exports_to_plain_transformers(tmp_path, arch):
    model = tiny(arch)
    pos_swap.patch(model, "p-rope", p=0.5)
    pos_swap.export_hf(model, tmp_path)
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert pos_swap.describe(plain) is None
    assert torch.equal(outputs(plain, IDS), outputs(model, IDS))


@pytest.mark.parametrize("arch", ["gpt_neox", "phi3"])
def test_p_rope_on_partial_rotary_has_no_plain_form(arch):
    model = tiny(arch)
    pos_swap.patch(model, "p-rope", p=0.5)
    assert model.config.pos_swap["plain_transformers"].startswith("loads the UNPATCHED model")


@pytest.mark.parametrize("name, params", SETTINGS)
def test_eager_and_sdpa_agree(name, params):
    results = []
    for backend in ("eager", "sdpa"):
        model = tiny("llama", num_hidden_layers=4, attn_implementation=backend)
        pos_swap.patch(model, name, **params)
        results.append(outputs(model, IDS))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name, params", SETTINGS[::2])
def test_flex_attention_agrees_with_sdpa(name, params):
    results = []
    for backend in ("flex_attention", "sdpa"):
        model = tiny("llama", num_hidden_layers=4, attn_implementation=backend)
        pos_swap.patch(model, name, **params)
        results.append(outputs(model, IDS[:, :48]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-4)


# -- nope on chosen layers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 3, 4, 7, 12])
@pytest.mark.parametrize("k", range(1, 6))
def test_every_kth_is_the_smollm3_and_llama4_rule(layers, k):
    marks = T.SmolLM3Config(num_hidden_layers=layers, no_rope_layer_interval=k).no_rope_layers  # 1: uses RoPE
    assert every_kth(layers, k) == [index for index, uses_rope in enumerate(marks) if not uses_rope]


def smollm3_twin(model, position_free: list[int]):
    """transformers' SmolLM3 with ``model``'s LLaMA weights, skipping RoPE on the layers ``position_free``."""
    layers = model.config.num_hidden_layers
    config = T.SmolLM3Config(
        **{**COMMON, "num_hidden_layers": layers}, rope_parameters=model.config.rope_parameters,
        no_rope_layers=[int(index not in position_free) for index in range(layers)],
        tie_word_embeddings=model.config.tie_word_embeddings,
    )  # fmt: skip
    twin = T.SmolLM3ForCausalLM(config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("params, position_free", [(dict(every=2), [1, 3]), (dict(layers=[0, 2]), [0, 2]),
                                                   (dict(layers=[3]), [3]), (dict(every=4), [3])])  # fmt: skip
def test_nope_layers_equal_transformers_smollm3(params, position_free):
    model = tiny("llama", num_hidden_layers=4)
    twin = smollm3_twin(model, position_free)
    pos_swap.patch(model, "nope", **params)
    torch.testing.assert_close(outputs(model, IDS), outputs(twin, IDS), rtol=0, atol=1e-5)


def test_chosen_layers_see_no_rotation_and_the_others_native_rope():
    """Each layer's eager attention weights against a float64 computation from its own q and k: relative
    distance 0 everywhere (q.k, no rotation) on the chosen layer, i - j on the other."""
    ids = IDS[:1, :24]
    distance = torch.arange(24)[:, None] - torch.arange(24)[None, :]
    for layer, rel in ((0, distance), (1, torch.zeros_like(distance))):
        model = tiny("llama", attn_implementation="eager")  # 2 layers; the reference casts its projections
        pos_swap.patch(model, "nope", layers=[1])
        weights, expected = eager_weights_and_float64_reference(model, layer, ids, rel)
        torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-5)


def test_nope_on_every_layer_equals_nope_bit_for_bit():
    model, whole = tiny("llama"), tiny("llama")
    pos_swap.patch(model, "nope", every=1)
    pos_swap.patch(whole, "nope")
    assert torch.equal(outputs(model, IDS), outputs(whole, IDS))


def test_patching_layers_of_one_model_leaves_another_and_removes_exactly():
    model, other = tiny("llama"), tiny("llama")
    native = outputs(other, IDS)
    pos_swap.patch(model, "nope", layers=[0])
    assert torch.equal(outputs(other, IDS), native) and not torch.equal(outputs(model, IDS), native)
    pos_swap.unpatch(model)
    assert torch.equal(outputs(model, IDS), native)
    assert all(not module._forward_pre_hooks for module in archs.attention_modules(model))


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, name, params, message",
    [
        ("llama", "p-rope", dict(p=0.0), r"p = 0 rotates no plane, which is the 'nope' scheme"),
        ("llama", "p-rope", dict(p=1.5), r"must be in \(0, 1\]"),
        ("llama", "p-rope", dict(p=-0.5), r"must be in \(0, 1\]"),
        ("llama", "p-rope", dict(p=0.1), r"rotates floor\(p \* 8\) = 0 .* use --scheme nope, or p >= 0.125"),
        ("llama", "p-rope", {}, "needs parameter 'p'"),
        ("llama", "nope", dict(layers=[2]), r"layers name \[2\], but this model has 2 attention layers: 0 to 1"),
        ("llama", "nope", dict(layers=[-1]), r"layers name \[-1\]"),
        ("llama", "nope", dict(layers=[1, 1]), "list a layer twice"),
        ("llama", "nope", dict(layers=[]), "chooses no layer"),
        ("llama", "nope", dict(every=3), "every=3 chooses no layer of this model's 2: give every <= 2"),
        ("llama", "nope", dict(every=0), "must be > 0"),
        ("llama", "nope", dict(every=2, layers=[1]), "layers or every, not both"),
        ("gpt2", "nope", dict(every=1), "need a rotary model"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error_and_changes_nothing(arch, name, params, message):
    model = tiny(arch)
    native = outputs(model, IDS[:, :20])
    with pytest.raises(errors.InvalidParameterError, match=message):
        pos_swap.patch(model, name, **params)
    assert pos_swap.describe(model) is None and torch.equal(outputs(model, IDS[:, :20]), native)


def test_layer_lists_are_read_as_integers_from_the_command_line_and_eval_lists():
    from pos_swap.cli import _scheme, build_parser
    from pos_swap.evaluate.specs import parse_scheme

    args = build_parser().parse_args(["patch", "M", "--scheme", "nope", "--layers", "3,7", "--out", "O"])  # older form
    name, params = _scheme(args)
    assert (name, params) == ("nope", {"layers": [3, 7]}) and all(type(index) is int for index in params["layers"])
    assert parse_scheme("nope:layers=[1,3]").params == {"layers": [1, 3]}
    assert parse_scheme("longrope:long_factor=1;1.5").params == {"long_factor": [1.0, 1.5]}
