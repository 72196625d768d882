"""save_pretrained / pos_swap.from_pretrained round trips, and the plain-transformers export."""

import json

import pytest
import torch
import transformers as T

import pos_swap
from pos_swap.errors import PosSwapError
from conftest import ROPE_ARCHS, scheme_params, tiny


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 100, (2, 70), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", ["linear", "ntk", "dynamic", "yarn", "dynamic-yarn", "longrope", "llama3"])
def test_round_trip_gives_identical_logits(tmp_path, scheme):
    model = tiny("llama")
    pos_swap.patch(model, scheme, **scheme_params(scheme, model))
    expected = logits(model, IDS)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pos_swap"]["scheme"] == scheme
    assert "_attn_implementation" not in json.dumps(saved) and "pos_swap_sdpa" not in json.dumps(saved)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert isinstance(loaded, T.LlamaForCausalLM)
    assert pos_swap.describe(loaded) == pos_swap.describe(model)
    assert torch.equal(logits(loaded, IDS), expected)
    pos_swap.unpatch(loaded)
    assert torch.equal(logits(loaded, IDS), logits(tiny("llama"), IDS))


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_neox", "phi3"])
def test_round_trip_on_other_architectures(tmp_path, arch):
    model = tiny(arch)
    pos_swap.patch(model, "dynamic", factor=2.0)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(pos_swap.from_pretrained(tmp_path), IDS), logits(model, IDS))


def test_unpatched_save_loads_plain(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded) is None
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_from_pretrained_passes_kwargs(tmp_path):
    model = tiny("llama")
    pos_swap.patch(model, "yarn", factor=4.0)
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager")
    assert loaded.dtype == torch.float64 and loaded.config._attn_implementation == "eager"
    torch.testing.assert_close(logits(loaded, IDS).float(), logits(model, IDS), rtol=0, atol=1e-4)


def test_vanilla_transformers_ignores_the_record(tmp_path):
    model = tiny("llama")
    pos_swap.patch(model, "yarn", factor=4.0)
    model.save_pretrained(tmp_path)
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(plain, IDS), logits(tiny("llama"), IDS))  # weights untouched by the patch


@pytest.mark.parametrize("arch", list(ROPE_ARCHS))
@pytest.mark.parametrize("scheme", ["linear", "ntk", "yarn", "llama3", "longrope", "dynamic"])
def test_export_hf_loads_in_plain_transformers(tmp_path, arch, scheme):
    if arch == "phi3" and scheme != "longrope":
        pytest.skip("Phi-3's config accepts only the default and longrope rope types")
    model = tiny(arch)
    pos_swap.patch(model, scheme, **scheme_params(scheme, model))
    pos_swap.export_hf(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "pos_swap" not in saved and pos_swap.describe(model)["scheme"] == scheme  # the live patch stays
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert pos_swap.describe(plain) is None
    torch.testing.assert_close(logits(plain, IDS), logits(model, IDS), rtol=0, atol=1e-5)


def test_export_hf_refuses_what_transformers_cannot_express(tmp_path):
    model = tiny("llama")
    pos_swap.patch(model, "dynamic-yarn")
    with pytest.raises(PosSwapError, match="pos_swap.from_pretrained"):
        pos_swap.export_hf(model, tmp_path)
    with pytest.raises(PosSwapError, match="patch it first"):
        pos_swap.export_hf(tiny("llama"), tmp_path)
