"""save_pretrained / pos_swap.from_pretrained round trips, and the plain-transformers export."""

import json

import pytest
import torch
import transformers as T

import pos_swap
from pos_swap.errors import PosSwapError
from conftest import ROPE_ARCHS, plain_params, scheme_params, tiny


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


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3"])
@pytest.mark.parametrize("scheme", ["linear", "yarn", "longrope", "ntk"])
def test_vanilla_transformers_loads_the_same_model_where_the_scheme_has_a_plain_form(tmp_path, arch, scheme):
    model = tiny(arch)
    pos_swap.patch(model, scheme, **plain_params(scheme, model))
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["pos_swap"]
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    if arch == "phi3" and scheme in ("linear", "yarn"):  # Phi-3's config accepts only default and longrope types
        assert record["plain_transformers"].startswith("loads the UNPATCHED model")
        assert torch.equal(logits(plain, IDS), logits(tiny(arch), IDS))
        return
    assert record["plain_transformers"].startswith("loads the same model")
    torch.testing.assert_close(logits(plain, IDS), logits(model, IDS), rtol=0, atol=1e-5)
    loaded = pos_swap.from_pretrained(tmp_path)  # still the patch on the native rotary: unpatching gives native
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    pos_swap.unpatch(loaded)
    assert torch.equal(logits(loaded, IDS), logits(tiny(arch), IDS))


@pytest.mark.parametrize("scheme, params", [("dynamic-yarn", {}), ("dynamic", dict(factor=2.0)), ("alibi", {}), ("self-extend", dict(group=2, window=8))])
def test_a_folder_without_plain_form_says_so(tmp_path, scheme, params, capsys):
    from pos_swap import cli

    model = tiny("llama")
    pos_swap.patch(model, scheme, **params)
    model.save_pretrained(tmp_path)
    note = json.loads((tmp_path / "config.json").read_text())["pos_swap"]["plain_transformers"]
    assert "UNPATCHED" in note and "pos_swap.from_pretrained" in note
    assert cli.main(["info", str(tmp_path)]) == 0
    assert "UNPATCHED" in capsys.readouterr().out
    assert torch.equal(logits(pos_swap.from_pretrained(tmp_path), IDS), logits(model, IDS))


@pytest.mark.parametrize(
    "record, problem",
    [({"scheme": "yarn"}, "malformed"), ("yarn", "malformed"), (["yarn"], "malformed"), ({"params": {}}, "malformed")],
)
def test_malformed_records_are_refused_clearly(tmp_path, record, problem):
    tiny("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "pos_swap": record}))
    with pytest.raises(PosSwapError, match=problem):
        pos_swap.from_pretrained(tmp_path)


def test_a_record_from_a_newer_version_warns(tmp_path):
    model = tiny("llama")
    pos_swap.patch(model, "yarn", factor=2.0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["pos_swap"]["version"] = "99.0"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="newer"):
        loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded)["scheme"] == "yarn"


@pytest.mark.parametrize("name", ["AutoTokenizer", "NoSuchModelClass"])
def test_architectures_naming_no_model_class_falls_back_with_a_warning(tmp_path, name):
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": [name]}))
    with pytest.warns(UserWarning, match="not a transformers model class"):
        loaded = pos_swap.from_pretrained(tmp_path)
    assert isinstance(loaded, T.LlamaModel)
    assert isinstance(pos_swap.from_pretrained(tmp_path, auto_class=T.AutoModelForCausalLM), T.LlamaForCausalLM)


EXPORTABLE = ["linear", "ntk", "yarn", "llama3", "longrope", "dynamic"]
PHI3_ROPE_TYPES = ["longrope", "ntk"]  # Phi-3 accepts only the default (ntk exports as one) and longrope types


@pytest.mark.parametrize(
    "arch,scheme",
    [(arch, scheme) for arch in ROPE_ARCHS for scheme in EXPORTABLE if arch != "phi3" or scheme in PHI3_ROPE_TYPES],
)
def test_export_hf_loads_in_plain_transformers(tmp_path, arch, scheme):
    model = tiny(arch)
    pos_swap.patch(model, scheme, **plain_params(scheme, model))
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


def test_replacing_a_patch_reads_the_native_context_not_the_exported_one():
    """A patch writes its plain form into the config; the next scheme's defaults must still see the native model."""
    model = tiny("llama")
    pos_swap.patch(model, "llama3", factor=4.0, original_max_position_embeddings=16)
    pos_swap.patch(model, "yarn", factor=2.0, replace=True)
    assert pos_swap.describe(model)["params"]["original_max_position_embeddings"] == 32
    with pytest.raises(PosSwapError, match="factor"):
        pos_swap.patch(model, "linear", factor=0.5, replace=True)  # invalid: the yarn patch stays on, unchanged
    assert pos_swap.describe(model)["scheme"] == "yarn"
