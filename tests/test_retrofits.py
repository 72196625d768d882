"""Retrofits that change the kind of positional mechanism: alibi, sinusoidal, learned-interpolate, rope, nope."""

import math

import numpy as np
import pytest
import torch
import transformers as T
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

import pos_swap
from pos_swap import archs, errors
from pos_swap.attention import chunked_attention
from pos_swap.functional import alibi, learned, sinusoid
from conftest import outputs, tiny

LEARNED = ["gpt2", "opt", "bert"]
RETROFITS = {
    "alibi": {}, "sinusoidal": {}, "learned-interpolate": dict(factor=4.0), "rope": {}, "nope": {},
    "rope+yarn": dict(scaling="yarn", scaling_params={"factor": 4.0}),
}  # fmt: skip
FITS = {  # which retrofits make sense on which family
    "gpt2": list(RETROFITS), "opt": list(RETROFITS), "bert": list(RETROFITS),
    "llama": ["alibi", "nope"], "qwen3": ["alibi", "nope"], "gpt_neox": ["alibi", "nope"], "gemma3_text": ["alibi", "nope"],
}  # fmt: skip
RELATIVE = ["alibi", "rope", "nope", "rope+yarn"]


def fitting(archs, names):
    """(arch, name) pairs of ``archs`` x ``names`` that FITS allows, so no parametrization exists only to skip."""
    return [(arch, name) for arch in archs for name in names if name in FITS[arch]]


def patch(model, name):
    return pos_swap.patch(model, name.split("+")[0], **RETROFITS[name])


def ids_of(length, batch=2, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- the pure math -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 24, 32, 40, 64, 96])
def test_alibi_slopes_match_bloom(heads):
    reference = build_alibi_tensor(torch.ones(1, 4), heads, torch.float32)[:, 0, 1]  # slope x position 1
    torch.testing.assert_close(alibi.slopes(heads), reference, rtol=1e-6, atol=0)


def test_alibi_slopes_formula_for_powers_of_two():
    assert alibi.slopes(8).tolist() == pytest.approx([2 ** (-k) for k in range(1, 9)])


@pytest.mark.parametrize("symmetric", [False, True])
def test_alibi_bias_is_minus_slope_times_distance(symmetric):
    q_pos, k_pos = torch.tensor([[5, 6, 7]]), torch.tensor([[2, 3, 4, 5, 6, 7]])
    head_slopes = alibi.slopes(4)
    bias = alibi.bias(q_pos, k_pos, head_slopes, symmetric)
    for h in range(4):
        for i in range(3):
            for j in range(6):
                distance = q_pos[0, i].item() - k_pos[0, j].item()
                distance = abs(distance) if symmetric else distance
                assert bias[0, h, i, j].item() == pytest.approx(-head_slopes[h].item() * distance, rel=1e-6)


def test_sinusoid_table_equals_the_formula_in_float64():
    positions = torch.tensor([0, 1, 7, 1023, 1024, 5000, 65535])
    table = sinusoid.table(positions, 10, base=10000.0)
    for row, p in enumerate(positions.tolist()):
        for i in range(10):
            angle = p / 10000.0 ** (2 * (i // 2) / 10)
            expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert table[row, i].item() == pytest.approx(expected, abs=2e-3 if p > 1000 else 1e-6)


def test_learned_interpolation_hits_rows_and_midpoints():
    weight = torch.randn(8, 3, dtype=torch.float64)
    rows = learned.interpolate(weight, torch.tensor([0.0, 2.0, 2.5, 7.0, 9.0]))
    torch.testing.assert_close(rows[0], weight[0])
    torch.testing.assert_close(rows[1], weight[2])
    torch.testing.assert_close(rows[2], (weight[2] + weight[3]) / 2)
    torch.testing.assert_close(rows[4], weight[7])  # clamped at the end of the table


def test_chunked_attention_is_exact_whatever_the_chunk():
    torch.manual_seed(0)
    module = tiny("llama").model.layers[0].self_attn
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)

    def logits(rows, cols, q_rows, keys, mask):
        return (q_rows @ keys.transpose(-1, -2)).float() * 0.25

    def bias(rows, cols):
        return torch.zeros(1, 4, rows.stop - rows.start, cols.stop)

    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    for scores in (dict(logits=logits), dict(bias=bias)):  # computed here, or fused in SDPA
        whole, _ = chunked_attention(module, q, k, v, None, 0.25, budget_mib=64, **scores)
        pieces, _ = chunked_attention(module, q, k, v, None, 0.25, budget_mib=1e-4, **scores)  # one row at a time
        torch.testing.assert_close(whole, reference.transpose(1, 2), rtol=0, atol=1e-5)
        torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)


# -- retrofits on models -------------------------------------------------------------------------------------

PAIRS = [(arch, name) for arch, names in FITS.items() for name in names]


@pytest.mark.parametrize("arch,name", PAIRS)
def test_retrofit_runs_changes_the_model_and_removes_exactly(arch, name):
    model, ids = tiny(arch), ids_of(24)
    native = outputs(model, ids)
    handle = patch(model, name)
    patched = outputs(model, ids)
    assert torch.isfinite(patched).all()
    assert (patched - native).abs().max() > 1e-3
    handle.remove()
    assert torch.equal(outputs(model, ids), native)


def expected_gpt2_table(name: str, native: torch.Tensor, length: int) -> torch.Tensor:
    """By hand: the position rows ``(length, D)`` a table retrofit gives GPT-2 with the ``native (32, D)`` table."""
    positions, dim = torch.arange(length, dtype=torch.float64), native.shape[1]
    if name == "nope":
        return torch.zeros(length, dim)
    if name == "learned-interpolate":  # position p reads the native table at p / 4, linearly, clamped to its end
        columns = [np.interp(positions.numpy() / 4, np.arange(len(native)), column) for column in native.double().T.numpy()]
        return torch.tensor(np.stack(columns, axis=1), dtype=torch.float32)
    angle = positions[:, None] / 10000.0 ** (2 * (torch.arange(dim) // 2) / dim)  # sinusoidal, RMS-matched
    table = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    rms = lambda t: t.double().pow(2).mean().sqrt()  # noqa: E731
    return (table * rms(native) / rms(table[: len(native)])).float()


@pytest.mark.parametrize("arch", LEARNED)
@pytest.mark.parametrize("name", ["alibi", "sinusoidal", "rope", "learned-interpolate", "nope"])
def test_learned_models_run_at_four_times_their_table(arch, name):
    """On GPT-2, a table retrofit at 4x the table equals transformers' GPT-2 holding the expected 128 rows; the
    causal models' rows at 4x the table depend on their prefix only."""
    model, ids = tiny(arch), ids_of(4 * 32, batch=1)
    reference = None
    if arch == "gpt2" and name in ("sinusoidal", "learned-interpolate", "nope"):
        reference = tiny(arch, n_positions=4 * 32)
        state = {k: v for k, v in model.state_dict().items() if k != "transformer.wpe.weight"}
        reference.load_state_dict(state, strict=False)
        with torch.no_grad():
            reference.transformer.wpe.weight.copy_(expected_gpt2_table(name, model.transformer.wpe.weight, 4 * 32))
    patch(model, name)
    long = outputs(model, ids)
    assert torch.isfinite(long).all()
    if reference is not None:
        torch.testing.assert_close(long, outputs(reference, ids), rtol=0, atol=1e-4)
    if arch != "bert":  # an encoder's rows see the whole input
        torch.testing.assert_close(long[:, :80], outputs(model, ids[:, :80]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,name", [(a, n) for a, n in PAIRS if n in RELATIVE])
def test_relative_schemes_are_translation_invariant(arch, name):
    model, ids = tiny(arch), ids_of(20)
    positions = torch.arange(20)[None].expand(2, -1)
    if arch in LEARNED:  # an absolute table is not invariant: the test can fail
        native_shifted = outputs(model, ids, position_ids=positions + 7)
        assert not torch.allclose(outputs(model, ids, position_ids=positions), native_shifted, atol=1e-3)
    patch(model, name)
    torch.testing.assert_close(
        outputs(model, ids, position_ids=positions + 7), outputs(model, ids, position_ids=positions), rtol=0, atol=1e-4
    )


def test_sinusoidal_positions_equal_the_formula_past_the_table():
    model = tiny("gpt2")
    weight = model.transformer.wpe.weight.detach().clone()
    pos_swap.patch(model, "sinusoidal")
    positions = torch.arange(0, 200)[None]  # the learned table ends at 32
    reference = sinusoid.table(torch.arange(32), 64)
    scale = weight.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
    expected = torch.tensor(
        [[math.sin(p / 10000 ** (2 * (i // 2) / 64)) if i % 2 == 0 else math.cos(p / 10000 ** (2 * (i // 2) / 64))
          for i in range(64)] for p in range(200)], dtype=torch.float64,
    )  # fmt: skip
    with torch.no_grad():
        table = model.transformer.wpe(positions)[0].double()
    torch.testing.assert_close(table, expected * scale.double(), rtol=0, atol=1e-4)
    assert table[:32].pow(2).mean().sqrt().item() == pytest.approx(weight.pow(2).mean().sqrt().item(), rel=0.02)


def test_sinusoidal_interpolated_variant_divides_positions():
    plain, stretched = tiny("gpt2"), tiny("gpt2")
    pos_swap.patch(plain, "sinusoidal")
    pos_swap.patch(stretched, "sinusoidal", factor=2.0)
    with torch.no_grad():
        torch.testing.assert_close(stretched.transformer.wpe(torch.tensor([[10]])), plain.transformer.wpe(torch.tensor([[5]])))


def test_learned_interpolate_reads_the_table_at_stretched_positions():
    for arch, path in (("gpt2", "transformer.wpe"), ("opt", "model.decoder.embed_positions")):
        model = tiny(arch)
        table = model.get_submodule(path)
        rows = table.weight.detach()[archs.lookup(model).table_offset :].clone()
        pos_swap.patch(model, "learned-interpolate", factor=4.0)
        with torch.no_grad():
            got = table(torch.ones(1, 1), 0, position_ids=torch.tensor([[8, 10]])) if arch == "opt" else table(torch.tensor([[8, 10]]))
        torch.testing.assert_close(got[0], torch.stack([rows[2], (rows[2] + rows[3]) / 2]))


def test_alibi_attention_weights_equal_an_independent_computation():
    model, ids = tiny("gpt2", attn_implementation="eager"), ids_of(12, batch=1)
    pos_swap.patch(model, "alibi")
    captured = {}
    model.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, i, o: captured.update(qkv=o.detach()))
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions[1][0].double()  # (H, L, L)
    q, k, _ = captured["qkv"][0].double().split(64, dim=-1)
    q, k = q.view(12, 4, 16).transpose(0, 1), k.view(12, 4, 16).transpose(0, 1)
    head_slopes = [2 ** (-8 * h / 4) for h in range(1, 5)]
    for h in range(4):
        for i in range(12):
            scores = [(q[h, i] @ k[h, j]).item() / 4 - head_slopes[h] * (i - j) for j in range(i + 1)]
            top = max(scores)
            expected = [math.exp(s - top) for s in scores]
            expected = torch.tensor([e / sum(expected) for e in expected] + [0.0] * (11 - i), dtype=torch.float64)
            torch.testing.assert_close(weights[h, i], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "arch,name", fitting(["gpt2", "opt", "llama", "gpt_neox"], ["alibi", "rope", "sinusoidal", "nope", "learned-interpolate"])
)
def test_generate_with_cache_equals_recomputation(arch, name):
    model = tiny(arch)
    patch(model, name)
    ids = ids_of(20, batch=1)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)  # fmt: skip
        recomputed = torch.stack([model(out.sequences[:, :t]).logits[0, -1] for t in range(20, 44)])
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], recomputed, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch,name", fitting(["gpt2", "opt", "llama"], ["alibi", "rope", "sinusoidal", "nope"]))
def test_left_padding_equals_each_sequence_alone(arch, name):
    model = tiny(arch)
    patch(model, name)
    long, short = ids_of(30, batch=1, seed=1)[0], ids_of(22, batch=1, seed=2)[0]
    batch = torch.zeros(2, 30, dtype=torch.long)
    batch[0], batch[1, 8:] = long, short
    mask = (torch.arange(30) >= torch.tensor([[0], [8]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    together = outputs(model, batch, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(together[0], outputs(model, long[None])[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(together[1, 8:], outputs(model, short[None])[0], rtol=0, atol=1e-4)


def test_bert_alibi_is_symmetric_and_padding_aware():
    model = tiny("bert")
    pos_swap.patch(model, "alibi")
    assert model.encoder.layer[0].attention.self.pos_swap.symmetric
    ids = ids_of(16, batch=1)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 16), torch.zeros(1, 4)], 1).long()
    torch.testing.assert_close(outputs(model, padded, attention_mask=mask)[:, :16], outputs(model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "arch,name,params",
    [
        ("gpt2", "alibi", {}), ("llama", "alibi", {}), ("gpt2", "rope", {}), ("gpt2", "sinusoidal", {}),
        ("llama", "nope", {}), ("llama", "cope", dict(init="normal")), ("gpt2", "cope", dict(init="normal")),
        ("llama", "self-extend", dict(window=8, group=4)), ("qwen3", "self-extend", dict(window=8, group=2)),
    ],
)  # fmt: skip
def test_eager_and_sdpa_agree(arch, name, params):
    ids = ids_of(40)
    results = []
    for backend in ("eager", "sdpa"):
        model = tiny(arch, attn_implementation=backend)
        pos_swap.patch(model, name, **params)
        results.append(outputs(model, ids))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_alibi_flex_attention_matches_sdpa_and_caches():
    ids = ids_of(48, batch=1)
    flex, sdpa = tiny("llama", attn_implementation="flex_attention"), tiny("llama")
    pos_swap.patch(flex, "alibi")
    pos_swap.patch(sdpa, "alibi")
    torch.testing.assert_close(outputs(flex, ids), outputs(sdpa, ids), rtol=0, atol=1e-4)
    with torch.no_grad():
        out = flex.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                            pad_token_id=0)  # fmt: skip
        recomputed = torch.stack([sdpa(out.sequences[:, :t]).logits[0, -1] for t in range(48, 54)])
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], recomputed, rtol=0, atol=1e-4)


def test_trainable_alibi_slopes_get_gradients_and_survive_save_load(tmp_path):
    model = tiny("gpt2")
    pos_swap.patch(model, "alibi", trainable=True)
    slopes = [p for n, p in model.named_parameters() if "pos_swap.slopes" in n]
    assert len(slopes) == 2  # one set per layer
    model(ids_of(10), labels=ids_of(10)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in slopes)
    with torch.no_grad():
        slopes[0].mul_(2.0)
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    torch.testing.assert_close(outputs(loaded, ids_of(10)), outputs(model, ids_of(10)), rtol=0, atol=0)


@pytest.mark.parametrize("arch,name", fitting(["gpt2", "bert", "llama"], ["alibi", "rope+yarn", "sinusoidal", "nope"]))
def test_save_and_load_round_trip(tmp_path, arch, name):
    model, ids = tiny(arch), ids_of(40)
    patch(model, name)
    model.save_pretrained(tmp_path)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))
    pos_swap.unpatch(loaded)
    short = ids[:, :24]  # within the 32 positions of the native table
    assert torch.equal(outputs(loaded, short), outputs(tiny(arch), short))  # the learned table came back intact


@pytest.mark.parametrize(
    "arch,name,params,error,message",
    [
        ("gpt2", "alibi", dict(slopes=[0.5, 0.25]), errors.InvalidParameterError, "one slope per attention head: 4"),
        ("gpt2", "sinusoidal", dict(base=1.0), errors.InvalidParameterError, "must be > 1"),
        ("gpt2", "learned-interpolate", dict(factor=1.0), errors.InvalidParameterError, "must be > 1"),
        ("gpt2", "learned-interpolate", {}, errors.InvalidParameterError, "needs parameter 'factor'"),
        ("gpt2", "rope", dict(fraction=0.0), errors.InvalidParameterError, r"\(0, 1\]"),
        ("gpt2", "rope", dict(fraction=1.5), errors.InvalidParameterError, r"\(0, 1\]"),
        ("gpt2", "rope", dict(scaling="longrop"), errors.InvalidParameterError, "scaling must be one of"),
        ("gpt2", "rope", dict(scaling_params={"factor": 2.0}), errors.InvalidParameterError, "no scaling"),
        ("gpt2", "rope", dict(scaling="yarn", scaling_params={"factor": 0.5}), errors.InvalidParameterError, "> 1"),
        ("gpt2", "yarn", dict(factor=2.0), errors.IncompatibleSchemeError, "learned positions"),
        ("llama", "sinusoidal", {}, errors.IncompatibleSchemeError, "rotary positions"),
        ("llama", "learned-interpolate", dict(factor=2.0), errors.IncompatibleSchemeError, "rotary positions"),
        ("llama", "rope", {}, errors.IncompatibleSchemeError, "rotary positions"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(arch, name, params, error, message):
    model, ids = tiny(arch), ids_of(20)
    native = outputs(model, ids)
    with pytest.raises(error, match=message):
        pos_swap.patch(model, name, **params)
    assert pos_swap.describe(model) is None and torch.equal(outputs(model, ids), native)


@pytest.mark.parametrize("flash", ["flash_attention_2", "flash_attention_3"])
def test_alibi_runs_a_flash_attention_model_through_sdpa(flash):
    """flash-attn takes no additive bias through transformers: a model loaded with a flash backend runs ALiBi's
    folded passes on sdpa (sdpa's masks), as an sdpa-loaded model does, and gets its backend back on unpatch. (The
    flash backend is set on the config: flash-attn does not install on a CPU machine.)"""
    model, reference = tiny("llama", initializer_range=0.1), tiny("llama", initializer_range=0.1)
    model.config._attn_implementation = flash
    ids = torch.arange(3, 40)[None]
    with pos_swap.patched(model, "alibi"), pos_swap.patched(reference, "alibi"):
        assert model.config._attn_implementation == "pos_swap_sdpa"
        torch.testing.assert_close(outputs(model, ids), outputs(reference, ids), rtol=0, atol=0)
    assert model.config._attn_implementation == flash


@pytest.mark.slow
def test_real_minilm_takes_every_learned_retrofit():
    from pos_swap import offline

    path = offline.minilm()
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModel.from_pretrained(path).eval()
    text = offline.pydoc_text()[:30000]
    short = tokenizer(text[:400], return_tensors="pt")
    long = tokenizer(text, return_tensors="pt", truncation=True, max_length=4 * 512)
    assert long.input_ids.shape[1] == 2048
    with torch.no_grad():
        native = model(**short).last_hidden_state.mean(1)
    for name, params in [("learned-interpolate", dict(factor=4.0)), ("sinusoidal", {}), ("alibi", {}), ("rope", {})]:
        with pos_swap.patched(model, name, **params), torch.no_grad():
            assert torch.isfinite(model(**long).last_hidden_state).all(), name
            if name == "learned-interpolate":  # still the same model on short text: embeddings barely move
                similarity = torch.cosine_similarity(model(**short).last_hidden_state.mean(1), native).item()
                assert similarity > 0.9, similarity
