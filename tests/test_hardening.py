"""Paths users take every day and the engine once got silently wrong: in-place position ids, backend switches,
casts and moves before unpatching, copies and pickles, replace=True failures, patched() misuse."""

import copy
import io
import pickle

import pytest
import torch

import pos_swap
from conftest import outputs, tiny


def ids(length=20, seed=0):
    return torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(seed))


# -- position ids changed in place --------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["add_", "slice"])
@pytest.mark.parametrize("mode", [dict(per_position=False), dict(block=8)], ids=["whole-window", "per-position"])
def test_position_ids_changed_in_place_between_forwards(change, mode):
    """Whole-window frequencies are memoized per ``position_ids`` object and its version counter; per-position
    ones per block length and a copy of the positions (a block of 8, so positions 32..39 take new frequencies)."""
    model = tiny("llama")
    pos_swap.patch(model, "dynamic", factor=2.0, **mode)
    expected = outputs(model, ids(10), position_ids=torch.arange(30, 40)[None])
    positions = torch.arange(10)[None]
    outputs(model, ids(10), position_ids=positions)  # frequencies of length 10: native
    if change == "add_":
        positions.add_(30)  # now 30..39: past the 32 trained positions, so the base grows
    else:
        positions[:] = torch.arange(30, 40)
    torch.testing.assert_close(outputs(model, ids(10), position_ids=positions), expected, rtol=0, atol=0)
    stale = outputs(tiny("llama"), ids(10), position_ids=torch.arange(30, 40)[None])  # the length-10 frequencies
    assert (expected - stale).abs().max() > 1e-3  # so a memo that missed the change would fail


# -- casts and moves, then unpatch ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme, params", [("yarn", dict(factor=4.0)), ("dynamic", dict(factor=2.0)), ("nope", {})])
def test_cast_then_unpatch_equals_a_never_patched_cast_model(scheme, params, dtype):
    model, never_patched = tiny("llama"), tiny("llama")
    pos_swap.patch(model, scheme, **params)
    model.to(dtype)
    pos_swap.unpatch(model)
    never_patched.to(dtype)
    for (name, mine), (_, theirs) in zip(model.named_buffers(), never_patched.named_buffers()):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    assert torch.equal(outputs(model, ids()), outputs(never_patched, ids()))


def test_move_to_meta_then_unpatch_restores_on_meta():
    model = tiny("llama")
    pos_swap.patch(model, "linear", factor=2.0)
    model.to("meta")
    pos_swap.unpatch(model)
    assert {t.device.type for t in model.buffers()} == {"meta"}


# -- copies and pickles ------------------------------------------------------------------------------------------

EVERY_SCHEME = [
    ("llama", "linear", dict(factor=4.0)), ("llama", "ntk", dict(factor=4.0)), ("llama", "yarn", dict(factor=4.0)),
    ("llama", "dynamic", dict(factor=2.0)), ("llama", "dynamic-yarn", {}), ("llama", "llama3", dict(factor=4.0)),
    ("llama", "alibi", dict(trainable=True)), ("llama", "cope", dict(init="normal")),
    ("llama", "self-extend", dict(window=8, group=2)), ("llama", "nope", {}),
    ("llama", "sinks", dict(sink_tokens=2, window=6)),
    ("gpt2", "learned-interpolate", dict(factor=4.0)), ("gpt2", "sinusoidal", {}), ("gpt2", "rope", {}),
    ("gpt2", "nope", {}), ("opt", "learned-interpolate", dict(factor=2.0)), ("bert", "sinusoidal", {}),
    ("bert", "alibi", {}), ("opt", "cope", {}),
]  # fmt: skip


@pytest.mark.parametrize("arch, scheme, params", EVERY_SCHEME)
def test_deepcopy_is_an_independent_patched_model(arch, scheme, params):
    model = tiny(arch)
    pos_swap.patch(model, scheme, **params)
    native = outputs(tiny(arch), ids())
    patched = outputs(model, ids())
    twin = copy.deepcopy(model)
    assert pos_swap.describe(twin) == pos_swap.describe(model)
    for parameter in model.parameters():  # scaling the original's weights leaves the copy alone
        parameter.data.mul_(0.5)
    assert torch.equal(outputs(twin, ids()), patched)
    pos_swap.unpatch(twin)
    assert pos_swap.describe(twin) is None and pos_swap.describe(model)["scheme"] == scheme
    assert torch.equal(outputs(twin, ids()), native)
    pos_swap.patch(twin, scheme, **params)  # and can be patched again
    pos_swap.unpatch(model)


@pytest.mark.parametrize("arch, scheme, params", EVERY_SCHEME)
def test_torch_save_and_pickle_round_trip(arch, scheme, params):
    model = tiny(arch)
    pos_swap.patch(model, scheme, **params)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for restored in (loaded, pickle.loads(pickle.dumps(model))):
        assert torch.equal(outputs(restored, ids()), outputs(model, ids()))
        pos_swap.unpatch(restored)
        assert torch.equal(outputs(restored, ids()), outputs(tiny(arch), ids()))


# -- replace=True and patched() --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, params", [("cope", dict(init="normal")), ("alibi", dict(trainable=True))])
def test_failed_replace_restores_the_previous_patch_objects(scheme, params, monkeypatch):
    model = tiny("llama")
    handle = pos_swap.patch(model, scheme, **params)
    hooks = [m.pos_swap for m in pos_swap.archs.attention_modules(model)]
    for hook in hooks:
        for parameter in hook.parameters():
            parameter.data.add_(0.25)  # "trained"
    before = outputs(model, ids())

    def fail_halfway(self, patch):
        patch.set_rotary_identity(pos_swap.archs.rotary_slots(patch.model)[0])
        raise RuntimeError("boom")

    monkeypatch.setattr(pos_swap.get_scheme("yarn"), "apply", fail_halfway)
    with pytest.raises(RuntimeError, match="boom"):
        pos_swap.patch(model, "yarn", replace=True, factor=2.0)
    assert handle.active and pos_swap.describe(model)["scheme"] == scheme
    assert [m.pos_swap for m in pos_swap.archs.attention_modules(model)] == hooks
    assert torch.equal(outputs(model, ids()), before)


def test_patched_block_may_unpatch_or_replace_and_keeps_the_users_error():
    model = tiny("llama")
    native = outputs(model, ids())
    with pos_swap.patched(model, "yarn", factor=2.0):
        pos_swap.unpatch(model)
    with pytest.raises(KeyError, match="mine"):
        with pos_swap.patched(model, "yarn", factor=2.0):
            pos_swap.unpatch(model)
            raise KeyError("mine")
    with pos_swap.patched(model, "yarn", factor=2.0):
        pos_swap.patch(model, "alibi", replace=True)
    assert pos_swap.describe(model) is None
    assert torch.equal(outputs(model, ids()), native)


# -- attention backend switches while patched --------------------------------------------------------------------


ROUTED = [("llama", "alibi", {}), ("llama", "dynamic", dict(factor=2.0)), ("gpt2", "rope", {})]


@pytest.mark.parametrize("arch, scheme, params", ROUTED)
def test_backend_switch_while_routed_is_refused_and_the_patch_holds(arch, scheme, params):
    model = tiny(arch)
    pos_swap.patch(model, scheme, **params)
    patched = outputs(model, ids())
    with pytest.raises(pos_swap.PosSwapError, match="unpatch"):
        model.set_attn_implementation("eager")
    with pytest.raises(pos_swap.PosSwapError, match="unpatch"):
        model.base_model.set_attn_implementation({"": "eager"})  # the inner model shares the config
    model.set_attn_implementation("sdpa")  # the backend the patch wraps: nothing to do
    assert torch.equal(outputs(model, ids()), patched) and pos_swap.describe(model)["scheme"] == scheme
    pos_swap.unpatch(model)
    model.set_attn_implementation("eager")  # native again: switching is free
    assert model.config._attn_implementation == "eager"


# -- clear errors instead of crashes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, scheme, params",
    [
        ("llama", "ntk", dict(factor=1e300)), ("llama", "linear", dict(factor=10**400)),
        ("llama", "yarn", dict(factor=10**400)), ("llama", "dynamic", dict(factor=10**400)),
        ("llama", "self-extend", dict(window=2**70, group=2)), ("llama", "cope", dict(npos=10**12)),
        ("gpt2", "learned-interpolate", dict(factor=10**400)), ("gpt2", "rope", dict(base=1e300)),
        ("llama", "self-extend", dict(window=8, group=10**30)), ("llama", "alibi", dict(chunk_mib=10**15)),
    ],
)  # fmt: skip
def test_parameters_beyond_what_can_run_are_refused(arch, scheme, params):
    model = tiny(arch)
    with pytest.raises(pos_swap.PosSwapError, match="must be at most"):
        pos_swap.patch(model, scheme, **params)
    assert pos_swap.describe(model) is None


@pytest.mark.parametrize(
    "name, hint",
    [(["yarn"], "string such as 'yarn'"), ({"yarn": 1}, "string"), ("YaRN", "Did you mean 'yarn'?"),
     ("Self-Extend", "'self-extend'")],
)  # fmt: skip
def test_scheme_names_must_be_strings_and_suggestions_ignore_case(name, hint):
    with pytest.raises(pos_swap.PosSwapError, match=hint):
        pos_swap.patch(tiny("llama"), name)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_alibi_on_float64_with_sdpa_matches_eager(arch):
    sdpa, eager = tiny(arch).double(), tiny(arch, attn_implementation="eager").double()
    for model in (sdpa, eager):
        pos_swap.patch(model, "alibi")
    torch.testing.assert_close(outputs(sdpa, ids()), outputs(eager, ids()), rtol=0, atol=1e-5)  # eager scores: float32


def test_cache_dir_honours_pos_swap_cache_then_xdg(monkeypatch, tmp_path):
    from pathlib import Path

    from pos_swap import offline

    monkeypatch.delenv("POS_SWAP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert offline.cache_dir() == Path.home() / ".cache" / "pos_swap"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert offline.cache_dir() == tmp_path / "xdg" / "pos_swap"
    monkeypatch.setenv("POS_SWAP_CACHE", str(tmp_path / "mine"))
    assert offline.cache_dir() == tmp_path / "mine"
