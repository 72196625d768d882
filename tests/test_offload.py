"""Big-model inference: a patched model loaded with ``device_map="auto"`` and a memory limit that sends layers to
disk (accelerate's offload hooks move each layer's weights in for its forward) gives the logits of the same model
held in memory, exactly."""

import pytest
import torch
import transformers as T

import pos_swap
from conftest import outputs, tiny

MEMORY = {"cpu": "400KB"}  # a tiny 4-layer LLaMA: embeddings and layer 0 in memory, the rest on disk
IDS = torch.randint(3, 100, (2, 70), generator=torch.Generator().manual_seed(0))  # past the 32 trained positions
SCHEMES = [
    ("yarn", dict(factor=4.0)), ("rerope", dict(window=8)), ("alibi", {}), ("p-rope", dict(p=0.5)),
    ("nope", dict(every=2)),
]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama", num_hidden_layers=4).save_pretrained(folder)
    return folder


def offloaded(load, folder, tmp_path):
    model = load(folder, device_map="auto", max_memory=MEMORY, offload_folder=tmp_path / "offload").eval()
    assert {"cpu", "disk"} <= set(model.hf_device_map.values()), model.hf_device_map  # both kinds of placement
    return model


@pytest.mark.parametrize("scheme, params", SCHEMES)
def test_patching_an_offloaded_model_gives_the_in_memory_logits(saved, tmp_path, scheme, params):
    in_memory = T.AutoModelForCausalLM.from_pretrained(saved).eval()
    model = offloaded(T.AutoModelForCausalLM.from_pretrained, saved, tmp_path)
    for each in (in_memory, model):
        pos_swap.patch(each, scheme, **params)
    expected = outputs(in_memory, IDS)
    assert not torch.equal(expected, outputs(T.AutoModelForCausalLM.from_pretrained(saved).eval(), IDS))
    torch.testing.assert_close(outputs(model, IDS), expected, rtol=0, atol=0)


@pytest.mark.parametrize("scheme, params", SCHEMES[::2])
def test_a_saved_patch_loads_offloaded(saved, tmp_path, scheme, params):
    model = T.AutoModelForCausalLM.from_pretrained(saved).eval()
    pos_swap.patch(model, scheme, **params)
    model.save_pretrained(tmp_path / "patched")
    loaded = offloaded(pos_swap.from_pretrained, tmp_path / "patched", tmp_path)
    assert pos_swap.describe(loaded) == pos_swap.describe(model)
    torch.testing.assert_close(outputs(loaded, IDS), outputs(model, IDS), rtol=0, atol=0)
