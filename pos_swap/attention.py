"""The attention function pos_swap routes a patched model through, and the hooks that schemes attach to it.

For each transformers backend B (eager, sdpa, flex_attention, flash_attention_*) pos_swap registers
``pos_swap_B`` with ``AttentionInterface`` and B's own mask function with ``AttentionMaskInterface``. The name
keeps B inside it, so transformers prepares masks and inputs exactly as for B. The function looks for a hook on
the attention module it is called for (``module._pos_swap_hook``) and lets it transform the call; modules without
a hook go straight to B. State therefore lives on the patched model's own modules, never in a global.
"""

import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .functional import rope

HOOK = "_pos_swap_hook"
PREFIX = "pos_swap_"
BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def backend_function(module: torch.nn.Module, backend: str):
    """The attention function ``backend`` resolves to for ``module`` (eager is each model file's own)."""
    if backend == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[backend]


def _routed(backend: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = backend_function(module, backend)
        hook = module.__dict__.get(HOOK)
        if hook is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        return hook(inner, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{backend}"
    return attention


for _backend in BACKENDS:
    AttentionInterface.register(PREFIX + _backend, _routed(_backend))
    AttentionMaskInterface.register(PREFIX + _backend, ALL_MASK_ATTENTION_FUNCTIONS[_backend])


def routed_name(config) -> str:
    """The ``pos_swap_*`` implementation name for the backend ``config`` uses now."""
    current = config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return current
    if current not in BACKENDS:
        raise NotImplementedError(f"pos_swap cannot route attention implementation '{current}'; use one of {BACKENDS}.")
    return PREFIX + current


def key_positions(query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
    """Positions ``(B, Lk)`` of the keys, given the query positions ``(B, Lq)``: the cache holds the keys in order
    and ends with the queries, so key j sits ``Lk - 1 - j`` before the last query (pads get negative positions,
    which the mask hides)."""
    offsets = torch.arange(key_length - 1, -1, -1, device=query_positions.device)
    return query_positions[:, -1:] - offsets


def query_positions(kwargs: dict, batch: int, query_length: int, key_length: int, device) -> torch.Tensor:
    """The query positions ``(B, Lq)``: the model's ``position_ids`` when it passes them down, else the query's
    place at the end of the cache."""
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(key_length - query_length, key_length, device=device)[None]
    return positions.to(device).expand(batch, -1)


class DeferredRotation:
    """Rotates queries and every cached key at attention time, with frequencies of the *current* length.

    The model's own rotary is set to the identity, so keys enter the KV cache unrotated; each call rotates them
    with ``frequencies(seq_len)`` where ``seq_len (B,)`` is each sequence's current length. Dynamic schemes thus
    stay equal to recomputing without a cache when the length (and with it the frequencies) grows, the fix
    transformers never merged for dynamic NTK (its issue 25104). Frequencies are computed once per forward and
    shared by all layers.
    """

    def __init__(self, frequencies):
        self.frequencies = frequencies  # seq_len (B,) int tensor -> (inv_freq (B, F), scaling (B,))
        self._memo = (None, None)

    def _tables(self, source, positions: torch.Tensor):
        """Frequencies for this forward: all layers receive the same ``position_ids`` object, so compute once."""
        if source is None or self._memo[0] is not source:
            self._memo = (source, self.frequencies(positions.max(dim=-1).values + 1))
        return self._memo[1]

    def __call__(self, inner, module, query, key, value, attention_mask, **kwargs):
        batch, _, q_len, _ = query.shape
        k_len = key.shape[2]
        q_pos = query_positions(kwargs, batch, q_len, k_len, query.device)
        inv_freq, scaling = self._tables(kwargs.get("position_ids"), q_pos)
        query = rope.rotate(query, *rope.cos_sin(q_pos, inv_freq, scaling, query.dtype))
        key = rope.rotate(key, *rope.cos_sin(key_positions(q_pos, k_len), inv_freq, scaling, key.dtype))
        return inner(module, query, key, value, attention_mask, **kwargs)
