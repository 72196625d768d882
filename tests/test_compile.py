"""torch.compile of a patched model: decode steps must reuse what dynamo compiled, as they do for the native model.

Dynamo's guards, not the backend, decide recompilation, so these tests compile with backend="eager" (seconds on
a CPU). Cause, found with TORCH_LOGS=recompiles,graph_breaks: the hooks read tensor values in Python (``bool``/``int``
of tensors: whether positions follow the cache slots before a fused CPU pass, Self-Extend's ``_slots``; where the
queries sit among the keys of a tensor mask, ``first_query_slot``), and the chunked path stepped over query rows
with ``range(0, Lq, step)``, a step computed from the cache length, on whose value dynamo then guarded. A graph
break inside the attention makes dynamo compile every enclosing ``forward`` as a frame of its own; all of them
share the code object of transformers' ``deprecate_kwarg`` wrapper, whose guards (``len(args)``, ``type(args[0])``)
differ per caller, so that one code object reaches the recompile limit (8) and runs uncompiled from then on.

Fix: while dynamo traces, :func:`pos_swap.fused.kernel_for` gives no kernel (the chunked path reads no values and is exact
for any positions), ``first_query_slot`` keeps a slot read from a tensor mask as a 0-dim tensor, and the chunked
path counts its query blocks (``ceil(Lq / step)``, one block in a decode step for every cache length). Eager
results are unchanged. Length-following rules compute a decode step's frequencies in tensor operations.
"""

import pytest
import torch
from transformers import DynamicCache

import pos_swap
from pos_swap.archs import CACHE_ARGUMENT
from conftest import tiny

pytestmark = pytest.mark.slow  # dynamo tracing: about 10-20 s per case on a shared 2-core CPU

WARM_UP = 3  # a prefill and two decode steps, after which dynamo has made the lengths dynamic


def decode(model, steps: int, *, with_mask: bool) -> list[torch.Tensor]:
    """Greedy decoding of ``steps`` forwards (a 12-token prefill, then one token each) with a DynamicCache; with an
    all-ones ``attention_mask`` as ``generate`` passes one (eager transformers drops it, a traced one is kept).
    Returns the last-position logits of each step."""
    cache, logits = DynamicCache(), []
    token = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in range(steps):
            if step == WARM_UP:
                torch._dynamo.config.error_on_recompile = True
            mask = {"attention_mask": torch.ones(1, cache.get_seq_length() + token.shape[1], dtype=torch.long)}
            out = model(token, use_cache=True, **(mask if with_mask else {}), **{CACHE_ARGUMENT: cache})
            logits.append(out.logits[:, -1])
            token = logits[-1][:, None].argmax(-1)
    return logits


def compiled_decode(model, steps: int = WARM_UP + 6, *, with_mask: bool = False) -> list[torch.Tensor]:
    """:func:`decode` through ``torch.compile(model)``: recompiling after the warm-up is an error, and so is
    reaching the recompile limit, where dynamo would silently run the model uncompiled."""
    torch._dynamo.reset()
    return decode(torch.compile(model, backend="eager"), steps, with_mask=with_mask)


@pytest.fixture(autouse=True)
def restore_dynamo_config():
    with torch._dynamo.config.patch(error_on_recompile=False, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("scheme, params", [(None, {}), ("yarn", dict(factor=4.0))])
def test_decode_steps_do_not_recompile(scheme, params):
    model = tiny("llama")
    if scheme:
        pos_swap.patch(model, scheme, **params)
    compiled_decode(model)


HOOKED = [  # (scheme, params, with_mask): the mask case for the schemes whose hooks handle the mask their own way
    ("rerope", dict(window=8), False),
    ("rerope", dict(window=8), True),
    ("self-extend", dict(window=8, group=2), False),
    ("dual-chunk", dict(chunk_size=12, local_window=2), False),
    ("sinks", dict(sink_tokens=2, window=6), False),
    ("sinks", dict(sink_tokens=2, window=6), True),
    ("alibi", {}, False),
    ("alibi", {}, True),
]


@pytest.mark.parametrize(
    "scheme, params, with_mask", HOOKED, ids=[f"{name}-{'mask' if mask else 'no-mask'}" for name, _, mask in HOOKED]
)
def test_hooked_schemes_decode_without_recompiling(scheme, params, with_mask):
    """Windows smaller than the 21 tokens decoded, so every windowed scheme changes far positions during the test;
    the compiled model (chunked path) must give the eager model's logits (fused CPU passes) at every step."""
    model = tiny("llama", initializer_range=0.1)
    pos_swap.patch(model, scheme, **params)
    compiled = compiled_decode(model, with_mask=with_mask)
    torch._dynamo.config.error_on_recompile = False
    eager = decode(model, len(compiled), with_mask=with_mask)
    for step, (got, want) in enumerate(zip(compiled, eager)):
        # float32 rounding of two exact computations (chunked scores against fused passes): about 1e-6
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"step {step}: {m}")


FOLLOWS_LENGTH = [("dynamic-yarn", dict(block=4)), ("dynamic", dict(factor=2.0, block=4)), ("longrope", dict(block=4)),
                  ("dynamic-yarn", dict(per_position=False))]  # fmt: skip


@pytest.mark.parametrize("scheme, params", FOLLOWS_LENGTH, ids=["dynamic-yarn", "dynamic", "longrope", "whole-window"])
def test_length_following_rules_decode_without_recompiling(scheme, params):
    """A trained context of 8 and blocks of 4: the decoded positions 12-20 cross three block lengths, each with
    other frequencies (whole window: a new length at every step). A traced decode step computes them from the
    length tensor (``per_sequence``), so dynamo reads no length value; the compiled logits must equal the eager
    ones (span path, memo) at every step."""
    model = tiny("llama", initializer_range=0.1)
    extra = {"long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0], "factor": 4.0} if scheme == "longrope" else {}
    pos_swap.patch(model, scheme, original_max_position_embeddings=8, **params, **extra)
    compiled = compiled_decode(model)
    torch._dynamo.config.error_on_recompile = False
    eager = decode(model, len(compiled), with_mask=False)
    for step, (got, want) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"step {step}: {m}")
