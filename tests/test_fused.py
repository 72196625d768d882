"""The fused passes (pos_swap.fused): the kernel's log-sum-exp, the merge and Dual Chunk Attention's passes against
float64 math, and the ALiBi, Self-Extend, sinks, Dual Chunk and CoPE fast paths against the chunked path they replace
and a float64 model, through caches, padding, grouped heads and half precision."""

import ast
import inspect
import types

import pytest
import torch

import pos_swap
from pos_swap import fused
from pos_swap.attention_base import rows_per_block
from pos_swap.functional import cope
from conftest import tiny

IDS = torch.randint(3, 100, (2, 70), generator=torch.Generator().manual_seed(0))  # past the 32 trained positions
SCHEMES = [
    ("alibi", {}),
    ("self-extend", dict(window=8, group=4)),
    ("sinks", dict(sink_tokens=2, window=8)),
    ("dual-chunk", dict(chunk_size=12, local_window=4)),
    ("dual-chunk", dict(chunk_size=8, local_window=3)),  # chunks of 5: the 40-token prompt of the cache test spans 8
    ("cope", dict(npos=6, init="normal")),
    ("string", dict(shift=12, local_window=3)),
    ("dpe", dict(window=8, groups=[1, 2, 4, 8])),
]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that 70 tokens cross many block boundaries."""
    monkeypatch.setattr(fused, "ALIBI_BLOCK", 16)
    monkeypatch.setattr(fused, "BAND_BLOCK", 8)
    monkeypatch.setattr(fused, "COPE_BLOCK_BYTES", 4 * 2 * 4 * 70 * 9)  # 9 rows of 70 keys, 2 x 4 heads
    monkeypatch.setattr(fused, "COPE_COLUMNS", 16)


def reference_attention(query, key, value, scale, allowed, bias=0.0):
    """Float64 softmax attention and log-sum-exp with a boolean ``allowed (Lq, Lk)`` and an additive ``bias``."""
    scores = (query.double() @ key.double().transpose(-1, -2)) * scale + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ value.double(), torch.logsumexp(scores, dim=-1)


def random_qkv(q_len=11, k_len=19, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, dim, generator=generator) for n in (q_len, k_len, k_len)]


KERNELS = [fused.CPU_FLASH, fused.FLEX_EAGER]  # torch's CPU flash kernel; flex as CUDA runs it, eager


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_kernel_equals_float64_math(kernel):
    query, key, value = random_qkv(q_len=19)
    for causal in (False, True):
        out, lse = kernel(query, key, value, 0.3, causal=causal)
        allowed = torch.ones(19, 19, dtype=torch.bool)
        allowed = allowed.tril() if causal else allowed
        ref_out, ref_lse = reference_attention(query, key, value, 0.3, allowed)
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_kernel_shares_grouped_key_heads_like_transformers(kernel):
    query, key, value = random_qkv(q_len=19)
    grouped = [x[:, :1] for x in (key, value)]  # one key/value head for the three query heads
    out, lse = kernel(query, *grouped, 0.3, causal=True)
    repeated = [x.repeat_interleave(3, dim=1) for x in grouped]
    ref_out, ref_lse = reference_attention(query, *repeated, 0.3, torch.ones(19, 19, dtype=torch.bool).tril())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_kernel_adds_a_mask_per_batch_row_and_head(kernel):
    query, key, value = random_qkv()
    mask = torch.randn(2, 1, 11, 19, generator=torch.Generator().manual_seed(1)) * 3  # one per sequence, all heads
    out, lse = kernel(query, key, value, 0.3, mask=mask)
    ref_out, ref_lse = reference_attention(query, key, value, 0.3, torch.ones(11, 19, dtype=torch.bool), bias=mask.double())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_merging_passes_over_split_keys_equals_one_pass(kernel):
    query, key, value = random_qkv()
    parts = [kernel(query, key[:, :, cols], value[:, :, cols], 0.3) for cols in (slice(0, 7), slice(7, 19))]
    out, lse = fused.merge_by_lse(parts)
    ref_out, ref_lse = reference_attention(query, key, value, 0.3, torch.ones(11, 19, dtype=torch.bool))
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
@pytest.mark.parametrize("shift", [-12, -4, 0, 3, 8])
def test_shifted_causal_attention_sees_keys_up_to_row_plus_shift(kernel, shift):
    query, key, value = random_qkv()
    out, lse = fused.shifted_causal_attention(kernel, query, key, value, 0.3, shift)
    allowed = torch.arange(19)[None, :] <= torch.arange(11)[:, None] + shift
    ref_out, ref_lse = reference_attention(query, key, value, 0.3, allowed)
    seen = allowed.any(-1)  # rows that see some key; the others are zero with lse -inf
    torch.testing.assert_close(out[:, :, seen].double(), ref_out[:, :, seen], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, :, seen].double(), ref_lse[:, :, seen], atol=1e-5, rtol=1e-5)
    assert (out[:, :, ~seen] == 0).all() and (lse[:, :, ~seen] == float("-inf")).all()


@pytest.mark.parametrize(
    "q_len, first_query, first_position",
    [(19, 0, 0), (19, 0, 4), (11, 8, 8), (11, 8, 13), (11, 3, 3), (1, 18, 18), (1, 12, 21)],
)  # a prefill, one continuing a cache (mid-chunk too), a decode step; positions offset from slots; empty slots after
@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_dual_chunk_attention_equals_float64_math(kernel, q_len, first_query, first_position):
    generator = torch.Generator().manual_seed(0)
    intra, successive, inter = (torch.randn(2, 3, q_len, 8, generator=generator) for _ in range(3))
    key, value = (torch.randn(2, 1, 19, 8, generator=generator) for _ in range(2))  # one key head: grouped queries
    out = fused.dual_chunk_attention(kernel, intra, successive, inter, key, value, 0.3, first_query, first_position, 5)
    slots = torch.arange(first_query, first_query + q_len)[:, None]  # (Lq, 1)
    chunk = (slots + first_position - first_query) // 5, (torch.arange(19)[None] + first_position - first_query) // 5
    apart = chunk[0] - chunk[1]  # (Lq, Lk)
    scores = [(q.double() @ key.double().transpose(-1, -2)) * 0.3 for q in (intra, successive, inter)]
    scores = torch.where(apart == 0, scores[0], torch.where(apart == 1, scores[1], scores[2]))
    scores = scores.masked_fill(torch.arange(19)[None] > slots, float("-inf"))
    expected = (torch.softmax(scores, dim=-1) @ value.double()).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def cope_reference(query, key, value, table, scale, first_query):
    """Float64 causal CoPE attention ``(B, Lq, H, D)`` from the tested formulas (:func:`cope.logits`), queries at
    key slots first_query.. (keys and values already repeated for every query head)."""
    q_len, k_len = query.shape[2], key.shape[2]
    allowed = torch.arange(k_len)[None] <= torch.arange(first_query, first_query + q_len)[:, None]  # (Lq, Lk)
    mask = torch.where(allowed, 0.0, float("-inf")).double()
    scores = cope.logits(query.double(), key.double(), table.double(), mask.clamp(min=-1e30), scale) + mask
    return (torch.softmax(scores, dim=-1) @ value.double()).transpose(1, 2)


@pytest.mark.parametrize(
    "q_len, k_len, first_query, npos, columns, block_bytes",
    [(19, 19, 0, 4, 512, 2**22), (19, 19, 0, 64, 5, 2**22), (5, 19, 14, 3, 4, 200), (1, 19, 18, 3, 4, 2**22),
     (7, 25, 10, 8, 3, 300), (40, 40, 0, 6, 7, 500)],
)  # one block; many column blocks, positions below the table's end; a cache continued; a decode step; static slots
def test_cope_attention_equals_float64_math(monkeypatch, q_len, k_len, first_query, npos, columns, block_bytes):
    monkeypatch.setattr(fused, "COPE_COLUMNS", columns)
    monkeypatch.setattr(fused, "COPE_BLOCK_BYTES", block_bytes)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, q_len, 8, generator=generator)
    key, value = (torch.randn(2, 2, k_len, 8, generator=generator) for _ in range(2))  # grouped: 2 queries per key
    table = torch.randn(npos, 8, generator=generator)
    out = fused.cope_attention(query, key, value, table, 0.35, first_query)
    key, value = (x.repeat_interleave(2, dim=1) for x in (key, value))
    expected = cope_reference(query, key, value, table, 0.35, first_query)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_cope_attention_stops_counting_where_every_position_reached_the_table_end(monkeypatch):
    monkeypatch.setattr(fused, "COPE_COLUMNS", 3)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 4, 8, generator=generator).abs()  # 4 queries continuing a cache of 26 tokens
    key, value = (torch.randn(1, 2, 30, 8, generator=generator).abs() for _ in range(2))  # q . k > 0: gates > 1/2
    table = torch.randn(2, 8, generator=generator)
    calls = []
    original = fused._interpolate_into
    monkeypatch.setattr(fused, "_interpolate_into", lambda *a: calls.append(1) or original(*a))
    out = fused.cope_attention(query, key, value, table, 0.35, 26)
    assert 0 < len(calls) <= 3  # of 10 blocks of columns: every row's position reaches 1 within 3 + 2 keys
    expected = cope_reference(query, key, value, table, 0.35, 26)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_two_terms_carry_distances_and_slopes_beyond_the_dtype(dtype):
    values = torch.tensor([-8191.0, -4097.0, -300.0, -1.0, 0.0, 5.0, 0.70710677 * 8, 2**-8 * 8])
    hi, lo = fused.two_terms(values, dtype)
    assert (hi.float() + lo.float() - values).abs().max() <= 1e-5 * values.abs().max()


def chunked(monkeypatch):
    """Route the hooks through the chunked path they had before the fused passes."""
    monkeypatch.setenv(fused.SETTING, "chunked")


# every pass on each kernel a device dispatches to: the CPU's, flex (eager here, compiled on CUDA), and ALiBi's sdpa
KERNEL_PATHS = [("cpu-flash", *s) for s in SCHEMES if s[0] != "cope"] + [
    ("flex", *s) for s in SCHEMES + [("rerope", dict(window=8)), ("rerope", dict(window=8, leaky_factor=4))]
    if s[0] != "cope"
] + [("sdpa", "alibi", {})]


def count_kernel_calls(monkeypatch, setting):
    """Force ``setting`` and count the calls of the kernel it names (a list that grows by one per call)."""
    monkeypatch.setenv(fused.SETTING, setting)
    calls = []
    name = {"cpu-flash": "CPU_KERNEL", "flex": "_flex", "sdpa": "sdpa_output"}[setting]
    original = getattr(fused, name)
    monkeypatch.setattr(fused, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def patched_logits(scheme, params, ids=IDS, dtype=torch.float32, **kwargs):
    model = tiny("llama")
    pos_swap.patch(model, scheme, **params)  # then cast: CoPE's random table is the same in every dtype
    model.to(dtype)
    with torch.no_grad():
        return model(ids, **kwargs).logits.double()


def test_cope_blocks_equal_the_chunked_path_and_float64(monkeypatch):
    called = []
    monkeypatch.setattr(fused, "cope_attention", lambda *a, _f=fused.cope_attention: called.append(1) or _f(*a))
    fast = patched_logits("cope", dict(npos=6, init="normal"))
    assert called, "the blocks did not run"
    chunked(monkeypatch)
    torch.testing.assert_close(fast, patched_logits("cope", dict(npos=6, init="normal")), atol=2e-5, rtol=1e-5)
    exact = patched_logits("cope", dict(npos=6, init="normal"), dtype=torch.float64)
    torch.testing.assert_close(fast, exact, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("setting, scheme, params", KERNEL_PATHS)
def test_each_kernel_path_equals_the_chunked_path_and_float64(monkeypatch, setting, scheme, params):
    calls = count_kernel_calls(monkeypatch, setting)
    fast = patched_logits(scheme, params)
    assert calls, f"the {setting} kernel did not run"
    chunked(monkeypatch)
    torch.testing.assert_close(fast, patched_logits(scheme, params), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast, patched_logits(scheme, params, dtype=torch.float64), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme, params", SCHEMES)
def test_in_float64_the_fused_and_chunked_paths_agree_to_float64_precision(monkeypatch, scheme, params):
    """Both paths keep float64 scores, softmax and merges for a float64 model (a float32 step: about 1e-7)."""
    fast = patched_logits(scheme, params, dtype=torch.float64)
    chunked(monkeypatch)
    torch.testing.assert_close(fast, patched_logits(scheme, params, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme, params", SCHEMES)
def test_half_precision_is_as_close_to_float64_as_the_chunked_path(monkeypatch, scheme, params, dtype):
    ids = torch.randint(3, 100, (1, 600), generator=torch.Generator().manual_seed(1))  # distances in the hundreds
    fast = patched_logits(scheme, params, ids, dtype)
    chunked(monkeypatch)
    slow = patched_logits(scheme, params, ids, dtype)
    exact = patched_logits(scheme, params, ids, torch.float64)
    fast_error, slow_error = (fast - exact).abs().max(), (slow - exact).abs().max()
    # measured: fast / slow between 0.70 and 1.15 over these schemes in both dtypes (errors about 0.05 in bfloat16,
    # 0.006 in float16); the two paths round differently, so the bound is not 1
    assert fast_error <= 1.25 * slow_error, (fast_error, slow_error)


@pytest.mark.parametrize("setting, scheme, params",
                         [(setting, scheme, params) for setting in ("auto", "flex") for scheme, params in SCHEMES
                          if not (setting == "flex" and scheme == "cope")])  # CoPE's blocks use no kernel
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cached_generation_equals_the_chunked_path(monkeypatch, scheme, params, cache, setting):
    monkeypatch.setenv(fused.SETTING, setting)

    def generate():
        model = tiny("llama")
        pos_swap.patch(model, scheme, **params)
        out = model.generate(IDS[:, :40], max_new_tokens=12, do_sample=False, cache_implementation=cache,
                             output_scores=True, return_dict_in_generate=True)  # fmt: skip
        return out.sequences, torch.stack(out.scores)

    fast_tokens, fast_scores = generate()
    chunked(monkeypatch)
    slow_tokens, slow_scores = generate()
    assert torch.equal(fast_tokens, slow_tokens)
    torch.testing.assert_close(fast_scores, slow_scores, atol=2e-5, rtol=1e-5)



WINDOWED = [s for s in SCHEMES if s[0] in ("self-extend", "dual-chunk", "string", "dpe")] + [
    ("rerope", dict(window=8, leaky_factor=4))]  # fmt: skip


@pytest.mark.parametrize("scheme, params", WINDOWED)
def test_a_prefill_that_continues_a_cache_runs_the_fused_passes(monkeypatch, scheme, params):
    """The second part of a prompt on a cache (as the retrieval sweeps reuse a shared prefix) gets transformers'
    causal mask, not None: it must still take the fused passes, and give the whole forward's logits."""
    import transformers

    model = tiny("llama")
    pos_swap.patch(model, scheme, **params)
    with torch.no_grad():
        whole = model(IDS).logits
        cache = transformers.DynamicCache(config=model.config)
        model(IDS[:, :40], past_key_values=cache, use_cache=True)
        calls = count_kernel_calls(monkeypatch, "cpu-flash")
        continued = model(IDS[:, 40:], past_key_values=cache, use_cache=True).logits
    assert calls, "the continuation took the chunked path"
    torch.testing.assert_close(continued, whole[:, 40:], atol=2e-5, rtol=1e-5)

def test_alibi_left_padded_batch_equals_each_sequence_alone():
    model = tiny("llama")
    pos_swap.patch(model, "alibi")
    short = IDS[1, :50]
    batch = torch.stack([IDS[0, :70], torch.cat([torch.zeros(20, dtype=torch.long), short])])
    mask = (torch.arange(70)[None] >= torch.tensor([[0], [20]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=positions).logits
        alone = model(short[None]).logits
    torch.testing.assert_close(padded[1, 20:], alone[0], atol=2e-5, rtol=1e-5)


def test_training_keeps_the_chunked_path_and_slope_gradients(monkeypatch):
    model = tiny("llama")
    pos_swap.patch(model, "alibi", trainable=True)
    monkeypatch.setattr(fused, "alibi_attention", lambda *a, **k: pytest.fail("fused path used with gradients"))
    model(IDS).logits.square().mean().backward()
    slopes = [p for name, p in model.named_parameters() if name.endswith("slopes")]
    assert slopes and all(p.grad is not None and p.grad.abs().sum() > 0 for p in slopes)


@pytest.mark.parametrize("scheme, params", [s for s in SCHEMES if s[0] != "cope"])  # observed CoPE runs chunked
def test_observers_see_the_probabilities_of_the_chunked_path(monkeypatch, scheme, params):
    model = tiny("llama")
    pos_swap.patch(model, scheme, **params)

    class Probe:
        def __init__(self):
            self.seen = []

        def queries_keys(self, module, query, key):
            pass

        def probabilities(self, module, probs, rows, cols, shape):
            self.seen.append(probs)

    def observed():
        probe = Probe()
        with pos_swap.observe(model, probe), torch.no_grad():
            output = model(IDS[:, :40]).logits
        return output, probe.seen

    fast_output, fast_seen = observed()
    with torch.no_grad():
        assert torch.equal(fast_output, model(IDS[:, :40]).logits)  # observing changes nothing
    chunked(monkeypatch)
    slow_output, slow_seen = observed()
    torch.testing.assert_close(fast_output, slow_output, atol=2e-5, rtol=1e-5)
    assert len(fast_seen) == len(slow_seen) > 0
    for fast, slow in zip(fast_seen, slow_seen):
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "backend, path, mask",
    [("sdpa", "fused", None), ("sdpa", "fused", "bool"), ("sdpa", "chunked", "bool"), ("eager", "chunked", "float")],
)
def test_a_float64_model_attends_in_float64(monkeypatch, backend, path, mask):
    """ALiBi's hook on float64 inputs equals float64 math to 1e-12 on each path (a float32 step costs about 1e-7).
    Twelve heads of twelve features: slopes 2^-0.5, 2^-1.5, ... and 1/sqrt(12), which float32 does not hold."""
    if path == "chunked":
        chunked(monkeypatch)
    model = tiny("llama", hidden_size=144, num_attention_heads=12, num_key_value_heads=4, attn_implementation=backend)
    model = model.double()
    pos_swap.patch(model, "alibi")
    module = model.model.layers[0].self_attn
    hook, scale = module._modules[pos_swap.attention.HOOK], 12**-0.5
    generator = torch.Generator().manual_seed(0)
    k_len = 34  # in blocks of 16 query rows (small_blocks): passes merged by log-sum-exp
    q_len = k_len if mask is None else 21  # None: a prefill; with a mask, queries after 13 cached keys
    query = torch.randn(1, 12, q_len, 12, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(1, 4, k_len, 12, generator=generator, dtype=torch.float64) for _ in range(2))
    q_pos, k_pos = torch.arange(k_len - q_len, k_len), torch.arange(k_len)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (Lq, Lk)
    given = {None: None, "bool": allowed[None, None],
             "float": torch.zeros(1, 1, q_len, k_len, dtype=torch.float64).masked_fill(~allowed, -1e300)}[mask]  # fmt: skip
    inner = pos_swap.attention.backend_function(module, backend)
    out, _ = hook(inner, module, query, key, value, given, scaling=scale, position_ids=q_pos[None])
    slopes = [2 ** (-8 * k / 8) for k in range(1, 9)] + [2 ** (-8 * k / 16) for k in (1, 3, 5, 7)]  # the paper's
    bias = -torch.tensor(slopes, dtype=torch.float64).view(-1, 1, 1) * (q_pos[:, None] - k_pos[None, :])  # (H, Lq, Lk)
    key, value = (x[0].repeat_interleave(3, dim=0) for x in (key, value))
    expected, _ = reference_attention(query[0], key, value, scale, allowed, bias=bias)
    torch.testing.assert_close(out[0].transpose(0, 1), expected, rtol=0, atol=1e-12)


def test_the_private_cpu_kernel_is_found_only_with_the_signature_it_is_called_with():
    assert fused.find_cpu_kernel() is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert fused.find_cpu_kernel(types.SimpleNamespace()) is None  # a torch without the op
    renamed = torch._C.parse_schema(
        "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, float dropout=0., "
        "bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) -> (Tensor output, Tensor logsumexp)"
    )  # a later torch that renamed dropout_p
    changed = types.SimpleNamespace(_scaled_dot_product_flash_attention_for_cpu=types.SimpleNamespace(
        default=types.SimpleNamespace(_schema=renamed)))  # fmt: skip
    assert fused.find_cpu_kernel(changed) is None


@pytest.mark.parametrize("scheme, params", [("alibi", {}), ("self-extend", dict(window=8, group=4)), ("dynamic-yarn", {})])
@pytest.mark.parametrize("setting, missing", [("auto", "CPU_KERNEL"), ("flex", "FLEX")])
def test_without_its_kernel_a_hook_takes_the_chunked_path_with_one_warning(monkeypatch, scheme, params, setting,
                                                                           missing):  # fmt: skip
    def logits():
        model = tiny("llama")
        pos_swap.patch(model, scheme, **params, **({"block": 8} if scheme == "dynamic-yarn" else {}))
        with torch.no_grad():
            return model(IDS).logits

    monkeypatch.setenv(fused.SETTING, setting)
    monkeypatch.setattr(fused, missing, None)  # a torch without the private CPU op, or without flex_attention
    fused._warn_missing.cache_clear()
    with pytest.warns(UserWarning, match="fused attention passes cannot use") as caught:
        without = logits()
    assert len([w for w in caught if "cannot use" in str(w.message)]) == 1  # once, not per layer
    chunked(monkeypatch)
    assert torch.equal(without, logits())


def test_dispatch_picks_the_cpu_kernel_on_cpu_and_compiled_flex_on_cuda(monkeypatch):
    monkeypatch.delenv(fused.SETTING, raising=False)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    assert fused.lse_kernel(torch.device("cpu")) is fused.CPU_FLASH
    on_cuda = fused.lse_kernel(torch.device("cuda"))  # only the choice: nothing runs on the device
    assert on_cuda is fused.FLEX_COMPILED and on_cuda.compiled and on_cuda.differentiable
    assert fused.lse_kernel(torch.device("mps")) is None  # no kernel wired in: chunked
    monkeypatch.setenv(fused.SETTING, "flex")
    assert fused.lse_kernel(torch.device("cpu")).compiled is False  # compiled CPU flex refuses the log-sum-exp
    monkeypatch.setenv(fused.SETTING, "chunked")
    assert fused.lse_kernel(torch.device("cpu")) is None and fused.lse_kernel(torch.device("cuda")) is None


def test_without_triton_cuda_falls_back_to_chunked_with_a_warning_naming_triton(monkeypatch):
    monkeypatch.delenv(fused.SETTING, raising=False)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    fused._warn_missing.cache_clear()
    with pytest.warns(UserWarning, match="needs triton"):
        assert fused.lse_kernel(torch.device("cuda")) is None


def test_alibi_folds_into_plain_sdpa_off_the_cpu_and_a_bad_setting_is_one_clear_error(monkeypatch):
    module = tiny("llama").model.layers[0].self_attn
    monkeypatch.delenv(fused.SETTING, raising=False)
    on_device = torch.empty(1, 2, 3, 4, device="meta")  # any device but the CPU: only the choice is asked
    assert fused.folded_attend_for(module, on_device) is fused.sdpa_output
    assert fused.folded_attend_for(module, torch.empty(1, 2, 3, 4)) == fused.CPU_FLASH.folded
    monkeypatch.setenv(fused.SETTING, "sdpa")
    assert fused.kernel_for(module, torch.empty(1, 2, 3, 4)) is None  # sdpa has no log-sum-exp: passes chunked
    monkeypatch.setenv(fused.SETTING, "cuda")
    with pytest.raises(pos_swap.errors.InvalidParameterError, match="POS_SWAP_KERNEL='cuda' is not .* auto, cpu-flash"):
        fused.lse_kernel(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_output_equals_bottom_right_causal_float64_math(dtype):
    query, key, value = (x.to(dtype) for x in random_qkv(q_len=11, k_len=19, dim=13))  # 13: padded to 16 inside
    out, _ = fused.sdpa_output(query, key[:, :1], value[:, :1], 0.3, 8)  # grouped: one key head
    allowed = torch.arange(19)[None, :] <= torch.arange(11)[:, None] + 8
    expected, _ = reference_attention(query, key[:, :1].expand_as(key), value[:, :1].expand_as(value), 0.3, allowed)
    torch.testing.assert_close(out.double(), expected, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-2)


def lift_flex_cpu_backward_guard(monkeypatch):
    """torch refuses flex's backward on the CPU (compiled CPU flex has none); its eager backward, the math the
    CUDA kernel implements, log-sum-exp gradients included, runs once that guard is lifted: a test-only switch."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


TRAINED = [("self-extend", dict(window=8, group=4)), ("rerope", dict(window=8)), ("sinks", dict(sink_tokens=2, window=8)),
           ("dual-chunk", dict(chunk_size=12, local_window=4)), ("string", dict(shift=12, local_window=3)),
           ("alibi", dict(trainable=True)), ("dynamic-yarn", dict(block=8))]  # fmt: skip


def gradients(scheme, params):
    model = tiny("llama")
    pos_swap.patch(model, scheme, **params)
    model.train()  # attention_dropout 0: the passes apply in training too
    model(IDS).logits.square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("setting, scheme, params",
                         [(setting, scheme, params) for setting in ("flex", "sdpa", "cpu-flash")
                          for scheme, params in TRAINED if setting != "sdpa" or scheme == "alibi"])  # sdpa: ALiBi only
def test_training_through_a_differentiable_kernel_gives_the_chunked_paths_gradients(monkeypatch, setting, scheme,
                                                                                    params):  # fmt: skip
    """flex and sdpa carry gradients through the passes; the CPU kernel's log-sum-exp has none, so training there
    keeps the chunked path."""
    lift_flex_cpu_backward_guard(monkeypatch)
    calls = count_kernel_calls(monkeypatch, setting)
    fast = gradients(scheme, params)
    assert bool(calls) == (setting != "cpu-flash"), f"{setting}: {len(calls)} kernel calls in training"
    chunked(monkeypatch)
    slow = gradients(scheme, params)
    assert fast.keys() == slow.keys() and any(name.endswith("slopes") for name in fast) == (scheme == "alibi")
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_imports_only_the_base_below_attention():
    """attention.py calls the fused passes, so fused.py must not import attention.py back (no import circle)."""
    tree = ast.parse(inspect.getsource(fused))
    own = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert "attention_base" in own and "attention" not in own


def test_rows_per_block_fits_the_float32_scores_in_the_budget():
    assert rows_per_block(64 * 2**20, 1, 4, 1024) == 4096  # 4096 rows x 4 heads x 1024 keys x 4 bytes = 64 MiB
    assert rows_per_block(64 * 2**20, 2, 4, 1000) == 2097  # rounded down: 2098 rows would exceed it
    assert rows_per_block(100, 2, 4, 70) == 1  # at least one row, whatever the budget
