"""pos_swap under peft: a patch and a LoRA adapter on one model, in either order.

The engine resolves the transformers model under any peft wrapper, so patch / describe / unpatch / patched accept
the wrapper. A scheme's own parameters (CoPE tables, trainable ALiBi slopes) live in the ``pos_swap`` submodules:
peft freezes every non-adapter parameter, so they train when the LoRA config names them in ``modules_to_save``.
"""

import copy

import peft
import pytest
import torch

import pos_swap
from conftest import outputs, tiny

LORA_TARGETS = {"llama": dict(target_modules=["q_proj", "v_proj"]), "gpt2": dict(target_modules=["c_attn"], fan_in_fan_out=True)}
TRAINABLE = {"cope": {}, "alibi": dict(trainable=True)}


def lora(model, arch, **extra):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **LORA_TARGETS[arch], **extra))


def ids():
    return torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))


def train_step(model):
    """One SGD step on the language-model loss; returns the parameters that received a gradient."""
    model.train()
    batch = ids()
    model(input_ids=batch, labels=batch).loss.backward()
    updated = {name for name, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()
    return updated


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scheme", list(TRAINABLE))
def test_patch_then_lora_trains_adapter_and_scheme_parameters(arch, scheme):
    model = tiny(arch)
    pos_swap.patch(model, scheme, **TRAINABLE[scheme])
    expected = outputs(model, ids())
    wrapped = lora(model, arch, modules_to_save=["pos_swap"])
    assert pos_swap.describe(wrapped)["scheme"] == scheme
    torch.testing.assert_close(outputs(wrapped, ids()), expected, rtol=0, atol=1e-6)  # LoRA starts as identity
    updated = train_step(wrapped)
    assert any("lora_" in name for name in updated)
    assert any(".pos_swap.modules_to_save." in name for name in updated)
    assert not torch.allclose(outputs(wrapped, ids()), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_then_patch_equals_patch_alone(arch):
    native = tiny(arch)
    reference = copy.deepcopy(native)
    pos_swap.patch(reference, "alibi", trainable=True)
    wrapped = lora(native, arch)
    handle = pos_swap.patch(wrapped, "alibi", trainable=True)
    assert handle.model is native
    torch.testing.assert_close(outputs(wrapped, ids()), outputs(reference, ids()), rtol=0, atol=1e-6)
    # parameters created after get_peft_model keep requires_grad, so they train with the adapter
    assert all(p.requires_grad for name, p in wrapped.named_parameters() if ".pos_swap." in name)
    assert any(".pos_swap." in name for name in train_step(wrapped))


@pytest.mark.parametrize("order", ["patch-first", "lora-first"])
def test_describe_unpatch_and_patched_through_the_wrapper(order):
    model = tiny("llama")
    native = outputs(model, ids())
    if order == "patch-first":
        pos_swap.patch(model, "yarn", factor=4.0)
        wrapped = lora(model, "llama")
    else:
        wrapped = lora(model, "llama")
        pos_swap.patch(wrapped, "yarn", factor=4.0)
    assert pos_swap.describe(wrapped)["params"]["factor"] == 4.0
    pos_swap.unpatch(wrapped)
    assert pos_swap.describe(wrapped) is None and pos_swap.describe(model) is None
    torch.testing.assert_close(outputs(wrapped, ids()), native, rtol=0, atol=0)
    with pos_swap.patched(wrapped.base_model, "alibi"):  # the LoraModel layer resolves too
        assert pos_swap.describe(model)["scheme"] == "alibi"
    torch.testing.assert_close(outputs(wrapped, ids()), native, rtol=0, atol=0)


def test_adapter_saves_and_reloads_the_trained_scheme_parameters(tmp_path):
    """peft stores ``modules_to_save`` with the adapter: a freshly patched model plus the adapter is the trained one."""
    model = tiny("llama")
    pos_swap.patch(model, "cope")
    wrapped = lora(model, "llama", modules_to_save=["pos_swap"])
    train_step(wrapped)
    trained = outputs(wrapped, ids())
    wrapped.save_pretrained(tmp_path)
    fresh = tiny("llama")
    pos_swap.patch(fresh, "cope")
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(outputs(reloaded, ids()), trained, rtol=0, atol=1e-6)
