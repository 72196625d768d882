"""The public API: patch / unpatch / patched / describe / schemes, bad input, and isolation between models."""

import copy
import math

import pytest
import torch
import transformers as T

import pos_swap
from pos_swap import errors
from conftest import tiny, transformers_reference


@pytest.fixture
def model():
    return tiny("llama")


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 100, (2, 48))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def snapshot(model):
    """Everything a patch could touch: parameters, buffers (persistent or not), config, attention backend."""
    tensors = {name: t.clone() for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    return tensors, model.config.to_dict(), model.config._attn_implementation


def assert_untouched(model, before, ids=None, reference=None):
    tensors, config, attn = snapshot(model)
    assert tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[k], before[0][k]) for k in tensors)
    assert config == before[1] and attn == before[2]
    assert pos_swap.describe(model) is None
    if ids is not None:
        assert torch.equal(logits(model, ids), reference)


def test_schemes_lists_the_rope_scaling_family():
    assert {"linear", "ntk", "dynamic", "yarn", "dynamic-yarn", "longrope", "llama3"} <= set(pos_swap.list_schemes())


@pytest.mark.parametrize("scheme", ["linear", "dynamic", "yarn"])
def test_remove_restores_bit_identical_outputs(model, ids, scheme):
    reference, before = logits(model, ids), snapshot(model)
    handle = pos_swap.patch(model, scheme, factor=4.0)
    assert not torch.equal(logits(model, ids), reference)
    handle.remove()
    assert_untouched(model, before, ids, reference)


def test_unpatch_and_context_manager(model, ids):
    reference = logits(model, ids)
    pos_swap.patch(model, "yarn", factor=4.0)
    pos_swap.unpatch(model)
    assert torch.equal(logits(model, ids), reference)
    with pos_swap.patched(model, "dynamic", factor=2.0) as handle:
        assert pos_swap.describe(model)["scheme"] == "dynamic"
        assert handle.active
        assert not torch.equal(logits(model, ids), reference)
    assert not handle.active
    assert torch.equal(logits(model, ids), reference)


def test_context_manager_removes_on_error(model, ids):
    reference = logits(model, ids)
    with pytest.raises(RuntimeError, match="inside"):
        with pos_swap.patched(model, "yarn", factor=2.0):
            raise RuntimeError("inside")
    assert pos_swap.describe(model) is None and torch.equal(logits(model, ids), reference)


def test_describe_reports_resolved_parameters(model):
    assert pos_swap.describe(model) is None
    pos_swap.patch(model, "yarn", factor=4.0)
    record = pos_swap.describe(model)
    assert record["scheme"] == "yarn"
    assert record["params"]["factor"] == 4.0
    assert record["params"]["original_max_position_embeddings"] == 32  # read from the model
    assert record["params"]["beta_fast"] == 32.0
    assert model.config.pos_swap.items() >= record.items()  # what save_pretrained writes (plus how to load it)


def test_patching_twice_needs_replace(model, ids):
    pos_swap.patch(model, "yarn", factor=4.0)
    patched_logits = logits(model, ids)
    with pytest.raises(errors.AlreadyPatchedError, match="replace=True"):
        pos_swap.patch(model, "linear", factor=2.0)
    assert torch.equal(logits(model, ids), patched_logits)  # the first patch is intact
    pos_swap.patch(model, "linear", factor=2.0, replace=True)
    assert pos_swap.describe(model)["scheme"] == "linear"
    expected = tiny("llama")
    pos_swap.patch(expected, "linear", factor=2.0)
    assert torch.equal(logits(model, ids), logits(expected, ids))


def test_failed_replace_keeps_the_previous_patch(model, ids):
    pos_swap.patch(model, "yarn", factor=4.0)
    patched_logits = logits(model, ids)
    with pytest.raises(errors.InvalidParameterError):
        pos_swap.patch(model, "linear", factor=0.5, replace=True)
    assert pos_swap.describe(model)["scheme"] == "yarn"
    assert torch.equal(logits(model, ids), patched_logits)


def test_removing_twice_is_an_error(model):
    handle = pos_swap.patch(model, "linear", factor=2.0)
    handle.remove()
    with pytest.raises(errors.NotPatchedError):
        handle.remove()
    with pytest.raises(errors.NotPatchedError):
        pos_swap.unpatch(model)


@pytest.mark.parametrize(
    "scheme,params,error,message",
    [
        ("yarm", dict(factor=4.0), errors.UnknownSchemeError, "Did you mean 'yarn'"),
        ("dynamik", dict(factor=4.0), errors.UnknownSchemeError, "Did you mean 'dynamic'"),
        ("yarn", dict(factor=1.0), errors.InvalidParameterError, "must be > 1"),
        ("linear", dict(factor=0.5), errors.InvalidParameterError, "must be > 1"),
        ("yarn", dict(factor=math.nan), errors.InvalidParameterError, "finite"),
        ("yarn", dict(factor=math.inf), errors.InvalidParameterError, "finite"),
        ("yarn", dict(factor="4"), errors.InvalidParameterError, "must be float"),
        ("yarn", dict(factor=True), errors.InvalidParameterError, "must be float"),
        ("yarn", dict(factr=4.0), errors.InvalidParameterError, "Did you mean 'factor'"),
        ("yarn", {}, errors.InvalidParameterError, "needs parameter 'factor'"),
        ("yarn", dict(factor=4.0, beta_fast=1.0, beta_slow=2.0), errors.InvalidParameterError, "beta_fast > beta_slow"),
        ("yarn", dict(factor=4.0, original_max_position_embeddings=0), errors.InvalidParameterError, "> 0"),
        ("yarn", dict(factor=4.0, original_max_position_embeddings=32.5), errors.InvalidParameterError, "must be int"),
        ("llama3", dict(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0), errors.InvalidParameterError, "high_freq_factor"),
        ("dynamic-yarn", dict(max_factor=0.5), errors.InvalidParameterError, "max_factor.* must be > 1 .*trained context"),
        ("dynamic-yarn", dict(max_factor=1.0), errors.InvalidParameterError, "max_factor.* must be > 1"),
        ("longrope", dict(factor=4.0, long_factor=[1.0, 2.0]), errors.InvalidParameterError, "8 for this model"),
        ("longrope", dict(factor=4.0, long_factor=[0.0] * 8), errors.InvalidParameterError, "> 0"),
        ("longrope", dict(factor=4.0, long_factor=[1.0] * 7 + [math.nan]), errors.InvalidParameterError, "finite"),
    ],
)
def test_bad_input_names_the_problem_and_leaves_the_model_untouched(model, ids, scheme, params, error, message):
    reference, before = logits(model, ids), snapshot(model)
    with pytest.raises(error, match=message):
        pos_swap.patch(model, scheme, **params)
    assert_untouched(model, before, ids, reference)


def test_unsupported_architecture_lists_the_supported_ones():
    config = T.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    model = T.T5ForConditionalGeneration(config)
    with pytest.raises(errors.UnsupportedArchitectureError, match="Supported model types: .*llama"):
        pos_swap.patch(model, "yarn", factor=2.0)


def test_a_scheme_that_does_not_fit_the_mechanism():
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(errors.IncompatibleSchemeError, match="learned positions"):
        pos_swap.patch(model, "yarn", factor=2.0)
    assert pos_swap.describe(model) is None


def test_errors_are_value_errors():
    assert issubclass(errors.PosSwapError, ValueError)


def test_patching_one_model_never_changes_another_sharing_its_config(ids):
    config = tiny("llama").config
    first, second = T.LlamaForCausalLM(config).eval(), T.LlamaForCausalLM(config).eval()
    second.load_state_dict(first.state_dict())
    reference = logits(second, ids)
    pos_swap.patch(first, "dynamic", factor=2.0)  # routes attention: the shared config must not carry that
    assert second.config._attn_implementation == "sdpa" and not hasattr(second.config, "pos_swap")
    assert torch.equal(logits(second, ids), reference)
    pos_swap.patch(second, "yarn", factor=4.0)
    pos_swap.unpatch(first)
    assert pos_swap.describe(second)["scheme"] == "yarn"
    assert not torch.equal(logits(second, ids), reference)
    assert first.config is config


def test_two_patched_models_keep_their_own_schemes(ids):
    """Against values recorded before any patch (a leak into a class or the process would change a fresh copy
    too): transformers' own dynamic NTK and YaRN, and the plain model."""
    a, b, plain = tiny("llama"), tiny("llama"), tiny("llama")
    expected = {
        "dynamic": logits(transformers_reference(plain, {None: {"rope_type": "dynamic", "factor": 2.0}}), ids),
        "yarn": logits(transformers_reference(plain, {None: {"rope_type": "yarn", "factor": 4.0}}), ids),
        "plain": logits(plain, ids),
    }
    pos_swap.patch(a, "dynamic", factor=2.0, per_position=False)  # transformers' whole-window semantics
    pos_swap.patch(b, "yarn", factor=4.0)
    torch.testing.assert_close(logits(a, ids), expected["dynamic"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(b, ids), expected["yarn"], rtol=0, atol=1e-5)
    assert torch.equal(logits(plain, ids), expected["plain"])
    assert torch.equal(logits(tiny("llama"), ids), expected["plain"])


def test_deepcopy_of_a_patched_model_is_independent(model, ids):
    pos_swap.patch(model, "dynamic", factor=2.0)
    clone = copy.deepcopy(model)
    pos_swap.unpatch(model)
    assert pos_swap.describe(clone)["scheme"] == "dynamic"
    assert not torch.equal(logits(clone, ids), logits(model, ids))


def test_patch_repr_shows_scheme_and_state(model):
    handle = pos_swap.patch(model, "linear", factor=2.0)
    assert "linear(" in repr(handle) and "factor=2.0" in repr(handle)
    handle.remove()
    assert "(removed)" in repr(handle)


def test_schemes_is_the_subpackage_and_list_schemes_the_names():
    import pos_swap.schemes.alibi  # noqa: F401

    assert pos_swap.schemes.alibi.Alibi is pos_swap.get_scheme("alibi")
    assert pos_swap.list_schemes()[:4] == ["linear", "ntk", "dynamic", "yarn"] and "self-extend" in pos_swap.list_schemes()
    with pytest.raises(ValueError, match="Two schemes are named 'yarn'"):
        pos_swap.registry.register(type("Impostor", (pos_swap.registry.Scheme,), {"name": "yarn"}))
