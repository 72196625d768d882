"""Attention statistics through pos_swap.observe, checked against float64 statistics of full eager attention weights."""

import copy

import numpy as np
import pytest
import torch

import pos_swap
from pos_swap import archs
from pos_swap.attention import OBSERVERS
from pos_swap.probe.observers import attention_stats, bin_edges
from conftest import outputs, tiny

LENGTH = 48  # past the tiny models' 32 trained positions, so the dynamic schemes really change the rotation
CASES = [
    ("llama", None, {}),
    ("llama", "alibi", {}),
    ("llama", "dynamic", {"factor": 2.0}),
    ("llama", "dynamic-yarn", {}),
    ("llama", "self-extend", {"window": 8, "group": 2}),
    ("llama", "cope", {"init": "normal"}),
    ("bert", None, {}),
    ("bert", "alibi", {}),
]


def eager_attentions(model, ids) -> list[np.ndarray]:
    """Full attention weights per layer, float64 ``(B, H, L, L)``, from an eager copy of ``model``."""
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    return [a.double().numpy() for a in out.attentions]


def reference(weights: np.ndarray, bins, rows=None) -> dict:
    """Every statistic of one layer's weights ``(B, H, L, L)`` over the query rows ``rows`` (default all), in
    plain float64 loops over offsets."""
    batch, heads, length, _ = weights.shape
    rows = np.arange(length) if rows is None else np.asarray(rows)
    weights = weights[:, :, rows]  # (B, H, R, L)
    offset = rows[:, None] - np.arange(length)[None, :]  # i - j
    mean = lambda x: x.sum(axis=-1).mean(axis=(0, 2))  # noqa: E731 - sum over keys, mean over query rows
    profile = np.stack([mean(weights * ((offset >= lo) & (offset <= hi))) for lo, hi in bins], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(weights > 0, weights * np.log(weights), 0.0)
    previous = np.stack([weights[:, :, n, row - 1] if row else np.zeros((batch, heads)) for n, row in enumerate(rows)], -1)
    return {
        "distance_profile": profile,
        "mean_distance": mean(weights * np.abs(offset)),
        "entropy": -mean(plogp),
        "sink_mass": weights[..., 0].mean(axis=(0, 2)),
        "previous_token": previous.mean(axis=(0, 2)),
    }


def test_distance_bins_are_log2_ranges():
    assert bin_edges(-3, 4) == [(-7, -4), (-3, -2), (-1, -1), (0, 0), (1, 1), (2, 3), (4, 7), (8, 15)]


@pytest.mark.parametrize("query_rows", [None, 7])
@pytest.mark.parametrize("arch,scheme,params", CASES)
def test_statistics_match_float64_eager_weights(arch, scheme, params, query_rows):
    model = tiny(arch)
    model.set_attn_implementation("sdpa")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # a patch pins the backend: switch before patching
    if scheme:
        pos_swap.patch(model, scheme, **params)
        pos_swap.patch(eager, scheme, **params)
        eager.load_state_dict(model.state_dict())  # the same patch parameters (CoPE's random tables), eagerly
    length = LENGTH if arch == "llama" else 24  # BERT's table has 32 rows
    ids = torch.randint(2, 100, (2, length), generator=torch.Generator().manual_seed(0))
    weights = eager_attentions(eager, ids)
    for observed_model in (model, eager):  # sdpa (routed, fused or chunked) and eager
        with attention_stats(observed_model, query_rows=query_rows) as stats, torch.no_grad():
            observed_model(ids)
        result = stats.result()
        causal = archs.is_causal(model)
        low, high = result["distance_bins"][0][0], result["distance_bins"][-1][1]
        assert (low < 0) == (not causal) and high >= length - 1
        rows = None if query_rows is None else np.round(np.linspace(0, length - 1, query_rows)).astype(int)
        assert result["query_rows"].tolist() == [2 * (length if rows is None else len(rows))] * len(weights)
        for layer, layer_weights in enumerate(weights):
            expected = reference(layer_weights, result["distance_bins"], rows)
            for name, value in expected.items():
                np.testing.assert_allclose(result[name][layer], value, rtol=1e-4, atol=1e-5, err_msg=f"{name} layer {layer}")
        sinks = result["sink_mass"] > 0.3
        assert np.array_equal(result["sink_heads"], sinks) and result["sink_rate"] == pytest.approx(sinks.mean())


@pytest.mark.parametrize("scheme,params", [("alibi", {}), ("dynamic", {"factor": 2.0, "block": 8})])  # 3 spans
def test_keep_patterns_equal_eager_weights(scheme, params):
    model = tiny("llama")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    pos_swap.patch(model, scheme, **params)
    pos_swap.patch(eager, scheme, **params)
    ids = torch.randint(2, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    with attention_stats(model, keep_patterns=True) as stats, torch.no_grad():
        model(ids)
    for pattern, weights in zip(stats.result()["patterns"], eager_attentions(eager, ids)):
        np.testing.assert_allclose(pattern, weights, atol=1e-6)


@pytest.mark.parametrize("scheme", [None, "alibi"])
def test_statistics_under_flex_attention_equal_sdpa_with_padding(scheme):
    flex, sdpa = tiny("llama", attn_implementation="flex_attention"), tiny("llama")
    if scheme:
        pos_swap.patch(flex, scheme)
        pos_swap.patch(sdpa, scheme)
    ids = torch.randint(2, 100, (2, 24), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0  # left padding: the BlockMask's mask_mod is read per sequence
    results = []
    for model in (flex, sdpa):
        with attention_stats(model, query_rows=9) as stats, torch.no_grad():
            model(ids, attention_mask=attention_mask)
        results.append(stats.result())
    for name in ("distance_profile", "mean_distance", "entropy", "sink_mass", "previous_token"):
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-4, atol=1e-6, err_msg=name)


def plane_norm_reference(model, ids):
    """Mean q and k norms per rotary plane from the projections (rotation keeps a plane's norm), float64."""
    captured = {}
    hooks = [
        getattr(layer.self_attn, name).register_forward_hook(
            lambda _m, _i, out, key=(index, name): captured.__setitem__(key, out.double())
        )
        for index, layer in enumerate(model.model.layers)
        for name in ("q_proj", "k_proj")
    ]  # fmt: skip
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    dim, heads = archs.head_dim(model.config), model.config.num_attention_heads
    result = []
    for index in range(len(model.model.layers)):
        per = []
        for name in ("q_proj", "k_proj"):
            x = captured[(index, name)].reshape(*ids.shape, -1, dim)  # (B, L, heads, D)
            norms = np.sqrt(x[..., : dim // 2].numpy() ** 2 + x[..., dim // 2 :].numpy() ** 2).mean(axis=(0, 1))
            per.append(np.repeat(norms, heads // x.shape[2], axis=0))  # (H, D/2)
        result.append(per)
    return result


@pytest.mark.parametrize("scheme,params", [(None, {}), ("dynamic", {"factor": 2.0}), ("self-extend", {"window": 8, "group": 2})])
def test_frequency_norms_match_projections(scheme, params):
    model = tiny("llama")
    if scheme:
        pos_swap.patch(model, scheme, **params)
    ids = torch.randint(2, 100, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    expected = plane_norm_reference(model, ids)
    with attention_stats(model, statistics=["frequency_norms"]) as stats, torch.no_grad():
        model(ids)
    result = stats.result()
    for layer, (queries, keys) in enumerate(expected):
        np.testing.assert_allclose(result["query_frequency_norms"][layer], queries, rtol=1e-4)
        np.testing.assert_allclose(result["key_frequency_norms"][layer], keys, rtol=1e-4)


@pytest.mark.parametrize("scheme,params", [(None, {}), ("alibi", {}), ("dynamic-yarn", {}), ("self-extend", {"window": 8, "group": 2})])
def test_observing_leaves_outputs_bit_identical_and_hooks_gone(scheme, params):
    model = tiny("llama")
    if scheme:
        pos_swap.patch(model, scheme, **params)
    ids = torch.randint(2, 100, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    config, implementation = model.config, model.config._attn_implementation
    described = copy.deepcopy(pos_swap.describe(model))  # recorded before observing
    before = outputs(model, ids)
    generated = model.generate(ids[:, :10], max_new_tokens=4, do_sample=False)
    with attention_stats(model):
        during = outputs(model, ids)
        assert torch.equal(generated, model.generate(ids[:, :10], max_new_tokens=4, do_sample=False))
    assert torch.equal(before, during) and torch.equal(outputs(model, ids), before)
    assert torch.equal(generated, model.generate(ids[:, :10], max_new_tokens=4, do_sample=False))
    assert model.config is config and model.config._attn_implementation == implementation
    assert not any(OBSERVERS in vars(m) for m in model.modules())
    assert pos_swap.describe(model) == described and (described is None) == (scheme is None)


def test_hooks_gone_after_an_error_and_other_models_untouched():
    model = tiny("llama")
    other = tiny("llama")
    other.config = model.config  # two models sharing one config object
    for module in other.modules():
        if hasattr(module, "config"):
            module.config = model.config
    with pytest.raises(RuntimeError, match="boom"), attention_stats(model):
        assert other.config._attn_implementation == "sdpa"  # the observed model got its own config
        raise RuntimeError("boom")
    assert not any(OBSERVERS in vars(m) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_bad_input_is_refused():
    model = tiny("llama")
    with pytest.raises(pos_swap.PosSwapError, match="Unknown attention statistic"):
        with attention_stats(model, statistics=["sinks", "entropy"]):
            pass
    with pytest.raises(pos_swap.PosSwapError, match="query_rows must be a positive number"):
        with attention_stats(model, query_rows=0):
            pass
    with pytest.raises(pos_swap.PosSwapError, match="No attention was recorded"):
        with attention_stats(model) as stats:
            pass
        stats.result()


class Watcher:
    """An observer that only counts the blocks of probabilities it is shown."""

    def __init__(self):
        self.blocks = 0

    def queries_keys(self, module, query, key):
        pass

    def probabilities(self, module, probs, rows, cols, shape):
        self.blocks += 1


@pytest.mark.parametrize("action", ["patch", "replace", "unpatch", "remove"])
def test_patching_inside_an_observe_block_is_refused_and_leaves_the_model_as_it_was(action):
    model = tiny("llama")
    handle = pos_swap.patch(model, "alibi") if action != "patch" else None
    ids = torch.randint(2, 100, (1, LENGTH), generator=torch.Generator().manual_seed(4))
    record, before, config = pos_swap.describe(model), outputs(model, ids), model.config.to_dict()  # a copy each
    change = {
        "patch": lambda: pos_swap.patch(model, "yarn", factor=4.0),
        "replace": lambda: pos_swap.patch(model, "yarn", factor=4.0, replace=True),
        "unpatch": lambda: pos_swap.unpatch(model),
        "remove": lambda: handle.remove(),
    }[action]
    watcher = Watcher()
    with pos_swap.observe(model, watcher):
        with pytest.raises(pos_swap.PosSwapError, match="patch this model inside a pos_swap.observe block"):
            change()
        assert torch.equal(outputs(model, ids), before) and watcher.blocks > 0  # still observed, unchanged
    assert pos_swap.describe(model) == record
    assert model.config.to_dict() == config and torch.equal(outputs(model, ids), before)
    change()  # after the block it is allowed
    assert pos_swap.describe(model) != record
