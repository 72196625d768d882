"""The cope retrofit: the CoPE math against the paper's formulas, and the patched models it makes."""

import copy
import math

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import pos_swap
from pos_swap import archs
from pos_swap.errors import InvalidParameterError, PosSwapError
from pos_swap.functional import cope
from conftest import ROPE_ARCHS, tiny


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def ids_of(length, batch=2, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def tables(model):
    return [module.pos_swap.table for module in archs.attention_modules(model)]


def gpt2():
    torch.manual_seed(0)
    config = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    return T.GPT2LMHeadModel(config).eval()


def reference_scores(q, k, table, allowed, scale):
    """The paper's CoPE logits for one head in plain Python floats, row by row: q (Lq, D), k (Lk, D), table
    (npos, D) as nested lists, ``allowed[i][j]`` whether query i sees key j; queries are the last Lq keys."""
    npos, shift = len(table), len(k) - len(q)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    rows = []
    for i, qi in enumerate(q):
        score = [dot(qi, kj) * scale for kj in k]
        gate = [1 / (1 + math.exp(-s)) if allowed[i][j] else 0.0 for j, s in enumerate(score)]
        row = []
        for j in range(len(k)):
            p = min(sum(gate[t] for t in range(j, i + shift + 1)), npos - 1)  # p_ij = sum_{t=j..i} g_it
            w = p - math.floor(p)
            e_ceil, e_floor = dot(qi, table[math.ceil(p)]) * scale, dot(qi, table[math.floor(p)]) * scale
            row.append(score[j] + w * e_ceil + (1 - w) * e_floor)
        rows.append(row)
    return rows


def reference_weights(q, k, table, scale):
    """Causal softmax over :func:`reference_scores` for one head, in plain Python floats."""
    allowed = [[j <= i for j in range(len(k))] for i in range(len(q))]
    weights = []
    for i, row in enumerate(reference_scores(q, k, table, allowed, scale)):
        exps = [math.exp(s) if allowed[i][j] else 0.0 for j, s in enumerate(row)]
        weights.append([e / sum(exps) for e in exps])
    return weights


# -- the pure math -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("npos", [3, 16])  # 3: most positions clamp
@pytest.mark.parametrize("masked", [True, False])
def test_logits_match_the_paper_formulas(npos, masked):
    generator = torch.Generator().manual_seed(0)
    batch, heads, q_len, k_len, dim = 2, 3, 5 if masked else 1, 8, 4
    query = torch.randn(batch, heads, q_len, dim, generator=generator)
    key = torch.randn(batch, heads, k_len, dim, generator=generator)
    table = torch.randn(npos, dim, generator=generator)
    scale = dim**-0.5
    if masked:  # causal with the queries at the end of the keys; the second sequence has 2 left pads
        allowed = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)  # (Lq, Lk)
        allowed = allowed.expand(batch, q_len, k_len).clone()
        allowed[1, :, :2] = False
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]  # (B, 1, Lq, Lk)
    else:  # a decode step without padding: transformers passes no mask, the one query sees every key
        allowed = torch.ones(batch, q_len, k_len, dtype=torch.bool)
        mask = None
    result = cope.logits(query, key, table, mask, scale)
    for b in range(batch):
        for h in range(heads):
            expected = reference_scores(
                query[b, h].tolist(), key[b, h].tolist(), table.tolist(), allowed[b].tolist(), scale
            )
            expected = torch.tensor(expected, dtype=torch.float64)
            torch.testing.assert_close(result[b, h].double(), expected, rtol=1e-5, atol=1e-5)


# -- patched models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ROPE_ARCHS) + ["gpt2"])
def test_zero_table_equals_nope(arch):
    model = gpt2() if arch == "gpt2" else tiny(arch)
    nope = copy.deepcopy(model)
    pos_swap.patch(nope, "nope")
    pos_swap.patch(model, "cope")
    ids = ids_of(20)
    torch.testing.assert_close(logits(model, ids), logits(nope, ids), rtol=0, atol=1e-5)


def test_attention_weights_match_an_independent_computation():
    model = tiny("llama", attn_implementation="eager")
    pos_swap.patch(model, "cope", npos=6, init="normal")
    layer = model.model.layers[1].self_attn
    captured = {}
    for name in ("q_proj", "k_proj"):
        getattr(layer, name).register_forward_hook(lambda mod, args, out, name=name: captured.__setitem__(name, out))
    ids = ids_of(12, batch=1)
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions[1][0]  # (H, L, L)
    dim, heads, kv_heads = layer.head_dim, model.config.num_attention_heads, model.config.num_key_value_heads
    q = captured["q_proj"][0].view(12, heads, dim).transpose(0, 1).double()  # (H, L, D), rotary is the identity
    k = captured["k_proj"][0].view(12, kv_heads, dim).transpose(0, 1).double()  # (KV, L, D)
    table = layer.pos_swap.table.double().tolist()
    for h in range(heads):
        qh, kh = q[h].tolist(), k[h // (heads // kv_heads)].tolist()
        expected = torch.tensor(reference_weights(qh, kh, table, dim**-0.5), dtype=torch.float64)
        torch.testing.assert_close(weights[h].double(), expected, rtol=0, atol=1e-6)
        without = torch.tensor(reference_weights(qh, kh, [[0.0] * dim] * 6, dim**-0.5), dtype=torch.float64)
        assert (weights[h].double() - without).abs().max() > 1e-4  # the table visibly moves the weights


def test_generate_with_cache_equals_recomputation():
    model = tiny("llama")
    pos_swap.patch(model, "cope", npos=16, init="normal")
    prompt = ids_of(6)
    out = model.generate(
        prompt, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
    )
    for step, cached in enumerate(out.logits):
        recomputed = logits(model, out.sequences[:, : prompt.shape[1] + step])[:, -1]
        torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-4)


def test_left_padded_batch_equals_each_alone():
    model = tiny("llama")
    pos_swap.patch(model, "cope", npos=8, init="normal")
    long, short = ids_of(12, batch=1, seed=1), ids_of(7, batch=1, seed=2)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)])
    mask = (torch.arange(12) >= torch.tensor([[0], [5]])).long()  # (2, 12), left padding
    together = logits(model, batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    torch.testing.assert_close(together[:1], logits(model, long), rtol=0, atol=1e-5)
    torch.testing.assert_close(together[1:, 5:], logits(model, short), rtol=0, atol=1e-5)


def test_gradients_reach_the_tables():
    """The tables' gradients equal central finite differences of the loss. CoPE's logits are computed in float32
    even in a float64 model, so the step is 1e-2 and the tolerance 2%: a path cut from the graph loses far more."""
    model = tiny("llama").double()
    pos_swap.patch(model, "cope")
    ids = ids_of(16)
    model(ids, labels=ids).loss.backward()
    parameters = {id(p) for p in model.parameters()}
    for table in tables(model):
        assert id(table) in parameters and table.requires_grad
        for entry in table.grad.abs().flatten().topk(3).indices.tolist():  # the largest three
            row, column = divmod(entry, table.shape[1])
            losses = []
            for step in (1e-2, -2e-2, 1e-2):  # +h, -h, then back
                with torch.no_grad():
                    table[row, column] += step
                    losses.append(model(ids, labels=ids).loss.item())
            numeric = (losses[0] - losses[1]) / 2e-2
            assert table.grad[row, column].item() == pytest.approx(numeric, rel=2e-2), (row, column)
        assert table.grad.abs().max() > 1e-4  # the loss does depend on the table


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_and_load_keep_the_trained_tables(tmp_path, shard):
    model = tiny("llama")
    pos_swap.patch(model, "cope", npos=8)
    with torch.no_grad():
        for table in tables(model):
            table.normal_(0.0, 0.5)  # as if trained
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    loaded = pos_swap.from_pretrained(tmp_path)
    assert pos_swap.describe(loaded) == pos_swap.describe(model)
    for saved, restored in zip(tables(model), tables(loaded)):
        assert torch.equal(saved, restored)
    ids = ids_of(20)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_load_refuses_a_checkpoint_without_the_tables(tmp_path):
    model = tiny("llama")
    pos_swap.patch(model, "cope")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if ".pos_swap." not in name}
    save_file(kept, tmp_path / "model.safetensors", {"format": "pt"})
    with pytest.raises(PosSwapError, match="model.layers.0.self_attn.pos_swap.table"):
        pos_swap.from_pretrained(tmp_path)


def test_gpt2_runs_past_its_table():
    model = gpt2()
    ids = ids_of(4 * model.config.n_positions)
    nope = copy.deepcopy(model)
    pos_swap.patch(nope, "nope")
    pos_swap.patch(model, "cope", init="normal")
    full = logits(model, ids)
    eager = gpt2()
    eager.set_attn_implementation("eager")  # the backend whose weights the paper-formula test checks
    pos_swap.patch(eager, "cope")
    eager.load_state_dict(model.state_dict())
    torch.testing.assert_close(full, logits(eager, ids), rtol=0, atol=1e-5)  # rows at 4x the table too
    torch.testing.assert_close(full[:, :64], logits(model, ids[:, :64]), rtol=0, atol=1e-5)  # causal
    with torch.no_grad():
        for table in tables(model):
            table.zero_()
    torch.testing.assert_close(logits(model, ids), logits(nope, ids), rtol=0, atol=1e-5)


def bert():
    config = T.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50
    )
    return T.BertModel(config).eval()


@pytest.mark.parametrize(
    "make, params, message",
    [
        (tiny, dict(npos=0), "npos"),
        (tiny, dict(npos=-4), "npos"),
        (tiny, dict(npos=2.5), "npos"),
        (tiny, dict(init="uniform"), "init"),
        (bert, {}, "encoder"),
    ],
)
def test_bad_input_is_refused_before_the_model_changes(make, params, message):
    model = make()
    with pytest.raises(InvalidParameterError, match=message):
        pos_swap.patch(model, "cope", **params)
    assert pos_swap.describe(model) is None
    assert not any(".pos_swap." in name for name in model.state_dict())


def test_remove_restores_bit_identical_logits():
    model = tiny("llama")
    ids = ids_of(20)
    before = logits(model, ids)
    handle = pos_swap.patch(model, "cope", init="normal")
    assert not torch.allclose(logits(model, ids), before)
    handle.remove()
    assert torch.equal(logits(model, ids), before)
    assert pos_swap.describe(model) is None and not any(".pos_swap." in name for name in model.state_dict())
