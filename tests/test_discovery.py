"""Discovery: the ArchSpec of a RoPE model type without an entry, derived from the model, and the coverage table.

References are independent of discovery: the hand-written entries (which discovery must reproduce), transformers'
own per-layer flags (SmolLM3's ``no_rope_layers``), and transformers building the model with ``rope_parameters``
(benchmarks/rope_coverage.py's checks).
"""

import copy
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

import pos_swap
from pos_swap import archs
from pos_swap.cli import main
from pos_swap.errors import IncompatibleSchemeError, PosSwapError, UnsupportedArchitectureError
from conftest import ROPE_ARCHS, outputs, tiny

ROOT = Path(__file__).resolve().parents[1]
PASSING = ROOT / "tests" / "data" / "rope_coverage_passing.txt"
HANDFUL = ["olmo2", "mixtral", "starcoder2", "stablelm", "granite", "qwen3_moe", "glm", "nanochat"]


def _coverage_module():
    spec = importlib.util.spec_from_file_location("rope_coverage", ROOT / "benchmarks" / "rope_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


coverage = _coverage_module()


def recorded_passing() -> list[str]:
    return [line.split()[0] for line in PASSING.read_text().splitlines() if line.strip() and not line.startswith("#")]


def discovered(model, monkeypatch):
    """The spec discovery derives for ``model`` with its type's entry taken out of the map."""
    monkeypatch.delitem(archs.ARCHITECTURES, model.config.model_type)
    return archs.lookup(model)


@pytest.mark.parametrize("arch", sorted(ROPE_ARCHS))
def test_discovery_reproduces_every_hand_written_rope_entry(arch, monkeypatch):
    """Same rotary tables, same attention modules per table, same LoRA projections as the entry, and a yarn patch
    with the same logits."""
    model = tiny(arch)
    entry = archs.lookup(model)
    slots = [(s.module, s.layer_type) for s in archs.rotary_slots(model)]
    modules = {t: archs.attention_modules(model, t) for _, t in slots}
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with pos_swap.patched(model, "yarn", factor=4.0):
        expected = outputs(model, ids)
    spec = discovered(model, monkeypatch)
    assert spec is not entry and archs.coverage(model)[0] == "discovery"
    assert [(s.module, s.layer_type) for s in archs.rotary_slots(model)] == slots
    assert {t: archs.attention_modules(model, t) for _, t in slots} == modules
    assert {name.rsplit(".", 1)[-1] for name in spec.lora_targets} == set(entry.lora_targets) - {"attn.c_proj"}
    with pos_swap.patched(model, "yarn", factor=4.0):
        torch.testing.assert_close(outputs(model, ids), expected, rtol=0, atol=1e-6)


def test_layers_without_positions_are_left_out(monkeypatch):
    """SmolLM3 switches RoPE off in some layers (transformers' ``no_rope_layers``: 0 = no RoPE): discovery's
    attention modules are exactly the layers that rotate, so attention-time schemes never rotate the others."""
    model = coverage.build("smollm3", coverage.tiny_config("smollm3"))
    flags = model.config.no_rope_layers
    assert 0 in flags and 1 in flags  # the tiny config keeps both kinds
    rotated = [layer.self_attn for layer, flag in zip(model.model.layers, flags) if flag]
    assert archs.attention_modules(model) == rotated
    assert set(archs.lookup(model).lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}  # NoPE layers too


@pytest.mark.parametrize("model_type", HANDFUL)
def test_a_representative_handful_passes_the_coverage_checks(model_type):
    """olmo2, mixtral, starcoder2, stablelm (partial rotary), granite, qwen3_moe, glm (interleaved pairs, partial
    rotary), nanochat (rotate-half turned by -theta): static schemes equal transformers' rope_parameters,
    attention-time rotation at native positions equals the model, cached generation equals recomputation, unpatch
    is bit-identical."""
    assert model_type in recorded_passing()
    row = coverage.check_type(model_type)
    assert (row["status"], row.get("covered_by")) == ("pass", "discovery"), row


@pytest.mark.slow
def test_every_type_recorded_as_passing_still_passes():
    """The full walk over the installed transformers' RoPE causal-LM types (several minutes on 2 cores)."""
    rows = {row["model_type"]: row for row in coverage.coverage(coverage.model_types())}
    broken = {t: rows.get(t, {"status": "gone"}) for t in recorded_passing() if rows.get(t, {}).get("status") != "pass"}
    assert not broken, broken
    assert not [row for row in rows.values() if row["status"] == "failing"]


def test_the_coverage_checks_catch_a_wrong_patch(monkeypatch):
    """The checks are not vacuous: frequencies off by 1% fail (a); whole-window frequencies, whose rows change
    with the length after their keys were cached (transformers' dynamic scaling), fail (b)."""
    model = coverage.build("olmo2")
    ids = torch.arange(3, 13)[None]
    native = coverage.logits(model, ids)
    assert coverage.check_static(model, ids, native) == [] and coverage.check_cache(model, ids, native) == []
    linear = pos_swap.registry.get_scheme("linear")
    monkeypatch.setattr(linear, "frequencies", lambda self, dim, base, seq_len=None: pos_swap.functional.rope.linear(
        dim, base * 1.01, self.config.factor))  # fmt: skip
    assert any("linear differs" in p for p in coverage.check_static(model, ids, native))
    monkeypatch.setattr(pos_swap.schemes.rope_scaling.RopeScaling, "block", None)
    assert any("dynamic-yarn: cached generation differs" in p for p in coverage.check_cache(model, ids, native))


@pytest.mark.parametrize(
    "model_type, pairing",
    [("olmo2", "half"), ("cohere", "interleaved"), ("glm", "interleaved"), ("helium", "interleaved"),
     ("nanochat", "half_swapped")],
)  # fmt: skip
def test_discovery_finds_how_rotary_features_are_paired(model_type, pairing):
    """Cohere rotates pairs (x0, x1), (x2, x3), ... with repeat-interleaved tables, GLM and Helium repeat-interleave
    the first half of the rotary's tables; NanoChat's rotate_half returns (x2, -x1) (see transformers' modeling
    files). The pairing reaches ``pos-swap info``; only models not paired rotate-half get their modules reordered."""
    model = coverage.build(model_type)
    assert archs.lookup(model).pairing == pairing
    assert {entry["pairing"] for entry in archs.summarize(model)["rotary"]} == {pairing}
    reordered = archs.reordered_attention(model)
    assert [module for module, _, _ in reordered] == ([] if pairing == "half" else archs.attention_modules(model))


def test_the_coverage_checks_catch_half_pairs_on_an_interleaved_model(monkeypatch):
    """The mutant the pairing exists for: a GLM model (interleaved pairs) rotated at attention time in rotate-half
    pairs. Cache and recomputation agree with each other (b), static schemes go through the model's own rotary (a);
    rotation at native positions (d) tells."""
    model = coverage.build("glm")
    ids = torch.arange(3, 13)[None]
    native = coverage.logits(model, ids)
    assert coverage.check_native_rotation(model, ids, native) == []
    model.__dict__[archs.DISCOVERED] = dataclasses.replace(archs.lookup(model), pairing="half")
    assert coverage.check_static(model, ids, native) == [] and coverage.check_cache(model, ids, native) == []
    problems = coverage.check_native_rotation(model, ids, native)
    assert len(problems) == 2 and all("at native positions differs" in p for p in problems), problems


@pytest.mark.parametrize(
    "model_type, says",
    [
        ("phimoe", "stays rotated when the frequencies of any rotary table are set to 0"),  # recomputes from config
        ("deepseek_v3", "multi-head latent attention"),
        ("gemma3", "pos_swap.patch(model.model.language_model, ...)"),
    ],
)
def test_unusual_models_are_refused_by_name(model_type, says):
    model = coverage.build(model_type)
    with pytest.raises(UnsupportedArchitectureError, match=f"'{model_type}' model.*{re.escape(says)}"):
        pos_swap.patch(model, "yarn", factor=4.0)
    assert archs.coverage(model)[0] == "refused"


def test_equal_tables_are_told_apart_by_the_layers_they_turn():
    """OLMo 3 keeps a sliding_attention and a full_attention table, equal in its default config: each attention
    module gets the table of its own layer type (transformers' config.layer_types), so a scheme that rescales one
    table and hooks its layers leaves the others alone."""
    model = coverage.build("olmo3")
    tables = model.model.rotary_emb
    assert torch.equal(tables.sliding_attention_inv_freq, tables.full_attention_inv_freq)
    for layer_type in ("sliding_attention", "full_attention"):
        layers = zip(model.model.layers, model.config.layer_types)
        expected = [layer.self_attn for layer, kind in layers if kind == layer_type]
        assert archs.attention_modules(model, layer_type) == expected


@pytest.mark.parametrize(
    "model_type, says",
    [
        ("llama4_text", "is not handed position_ids and the model windows attention"),  # slots are not positions
    ],
)
def test_attention_time_schemes_are_refused_where_they_cannot_act(model_type, says):
    """Discovery covers the model; the schemes that act at attention time are refused by name (the model unchanged),
    and a static scheme still equals transformers' rope_parameters."""
    model = coverage.build(model_type)
    assert archs.coverage(model)[0] == "discovery"
    assert re.search(f"refused on [0-9]+ attention module.*{says}.*static", archs.summarize(model)["attention_time_schemes"])
    ids = torch.arange(3, 13)[None]
    native = coverage.logits(model, ids)
    for scheme, params in [("rerope", dict(window=4)), ("dynamic-yarn", dict(block=4)), ("self-extend", dict(group=4))]:
        with pytest.raises(IncompatibleSchemeError, match=f"'{scheme}' acts at attention time.*{says}"):
            pos_swap.patch(model, scheme, **params)
        assert pos_swap.describe(model) is None and torch.equal(coverage.logits(model, ids), native)
    assert coverage.check_static(model, ids, native) == []


def test_the_multimodal_advice_works():
    """Patching the language model the refusal names equals transformers building the wrapper with the text
    config's rope_parameters (its full-attention table scaled)."""
    model = coverage.build("gemma3")
    ids = torch.arange(3, 23)[None]
    reference_config = copy.deepcopy(model.config)
    text = reference_config.text_config
    text.rope_parameters = {**text.rope_parameters, "full_attention": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": text.rope_parameters["full_attention"]["rope_theta"]}}  # fmt: skip
    reference = type(model)._from_config(reference_config, dtype=torch.float32).eval()
    reference.load_state_dict(model.state_dict())
    pos_swap.patch(model.model.language_model, "linear", factor=2.0)
    torch.testing.assert_close(coverage.logits(model, ids), coverage.logits(reference, ids), rtol=0, atol=1e-5)


def test_attention_outside_the_attention_interface_is_refused():
    """One layer pinned to its own eager attention (as a model computing attention in its own code would): the
    rotation then reaches computation pos_swap cannot hook, and discovery says so."""
    model = coverage.build("olmo2")
    attention = model.model.layers[1].self_attn
    attention.config = copy.deepcopy(attention.config)  # this layer keeps "sdpa" whatever the model's config says
    with pytest.raises(UnsupportedArchitectureError, match="does not go through transformers' AttentionInterface"):
        archs.lookup(model)


def test_a_model_without_positions_is_refused_with_what_to_do():
    import transformers as T

    model = T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4)).eval()  # ALiBi
    with pytest.raises(UnsupportedArchitectureError, match="found no positional mechanism.*ArchSpec"):
        pos_swap.patch(model, "yarn", factor=4.0)


def test_a_config_without_max_position_embeddings_says_what_to_set(monkeypatch):
    model = tiny("llama")
    monkeypatch.delattr(type(model.config), "max_position_embeddings", raising=False)
    del model.config.__dict__["max_position_embeddings"]
    with pytest.raises(PosSwapError, match=r"no max_position_embeddings.*model\.config\.max_position_embeddings = N"):
        pos_swap.patch(model, "yarn", factor=4.0)
    model.config.max_position_embeddings = 32
    pos_swap.patch(model, "yarn", factor=4.0)


def test_discovery_needs_weights():
    model = coverage.build("olmo2").to("meta")
    with pytest.raises(PosSwapError, match="needs its weights"):
        archs.lookup(model)


def test_info_says_how_a_model_is_covered(tmp_path, capsys):
    for model_type, covered in [("olmo2", "discovery"), ("diffllama", "refused"), ("llama", "entry")]:
        model = tiny("llama") if model_type == "llama" else coverage.build(model_type)
        model.save_pretrained(tmp_path / model_type)
        assert main(["info", str(tmp_path / model_type), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["covered_by"] == covered, info
        assert ("rotary" in info) == (covered != "refused")
