"""The attention function pos_swap routes a patched model through, and the hooks that schemes attach to it.

For each transformers backend B (eager, sdpa, flex_attention, flash_attention_*) pos_swap registers
``pos_swap_B`` with ``AttentionInterface`` and B's own mask function with ``AttentionMaskInterface``. The name
keeps B inside it, so transformers prepares masks and inputs exactly as for B. The function looks for a hook on
the attention module it is called for (the submodule ``pos_swap`` that a patch adds) and lets it transform the call;
modules without a hook go straight to B. State therefore lives on the patched model's own modules, never in a
global, and ``print(model)`` shows it.
"""

import sys
import typing

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import fused
from .attention_base import (
    BLOCK_MIB, PREFIX, additive_mask, backend_of, row_indices, rows_per_block, score_dtype, sink_logits,
    softmax_with_sinks, with_sinks,
)  # fmt: skip
from .errors import IncompatibleSchemeError
from .functional import rope

HOOK = "pos_swap"  # the submodule name a hook gets on each attention module
OBSERVERS = "_pos_swap_observers"  # the attribute holding an attention module's observers (pos_swap.observe)
TEMPERATURE = "_pos_swap_temperature"  # the attribute holding a per-row query scale (the temperature modifier)
PAIRING = "_pos_swap_pairing"  # (rotated features, pairing) of a module whose rotary pairs are not rotate-half
BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def backend_function(module: torch.nn.Module, backend: str):
    """The attention function ``backend`` resolves to for ``module`` (eager is each model file's own). sdpa has no
    learned sink logits (GPT-OSS, which pos_swap routes to sdpa for its fused passes): :func:`chunked_attention`,
    which adds them, stands in for it there."""
    if backend == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    if backend == "sdpa" and sink_logits(module) is not None:
        return _attention_with_sinks
    return ALL_ATTENTION_FUNCTIONS[backend]


def _attention_with_sinks(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa's attention with the module's learned sink logits, in blocks of query rows."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    return chunked_attention(module, query, key, value, attention_mask, scaling, dropout=dropout, softcap=softcap)


def observers_of(module: torch.nn.Module) -> tuple:
    """The observers :func:`pos_swap.observe` registered on an attention module (usually none)."""
    return module.__dict__.get(OBSERVERS, ())


def _observed(inner):
    """``inner`` that also shows the module's observers the attention it computes from the queries, keys and mask
    it receives (after any scheme's rotation); the output is ``inner``'s, untouched."""

    def attention(module, query, key, value, attention_mask, *, observed_span=None, **kwargs):
        output = inner(module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        notify_blocks(module, query, key, attention_mask, scaling, span=observed_span, softcap=kwargs.get("softcap"))
        return output

    return attention


def observed_rows(module, query_length: int) -> torch.Tensor | None:
    """The query rows the module's observers are shown: None without observers; else every row, or an evenly
    spaced sample (first and last row included) of at most the largest ``query_rows`` an observer asks for. A
    sample keeps a probe of a long input cheap: its statistics are means over rows, which the sample estimates."""
    observers = observers_of(module)
    if not observers:
        return None
    wanted = [getattr(observer, "query_rows", None) for observer in observers]
    limit = None if None in wanted else max(wanted)
    if limit is None or query_length <= limit:
        return torch.arange(query_length)
    return torch.linspace(0, query_length - 1, limit, dtype=torch.float64).round().long().unique()


def notify_blocks(module, query, key, attention_mask, scaling, *, budget_mib=BLOCK_MIB, span: "Span | None" = None,
                  **scores) -> None:  # fmt: skip
    """Show the module's observers the queries and keys ``(B, H|Hkv, L, D)`` of one call and the probabilities of
    the query rows they watch (:func:`observed_rows`), scored in blocks by :func:`block_scores` with ``scores``
    (bias, logits, softcap): for paths whose kernel never holds the probabilities. With ``span``, the queries are
    one span of rows of a larger call, which has already shown its queries and keys; observers see the span's share
    of the call's rows, at their place in the call."""
    watched = observed_rows(module, query.shape[2]) if span is None else span.watched
    if watched is None:
        return
    if span is None:
        notify_queries_keys(module, query, key)
    if not len(watched):
        return
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    first_query = first_query_slot(attention_mask, q_len, k_len)
    step = rows_per_block(budget_mib * 2**20, batch, heads, k_len)
    for rows in watched.to(query.device).split(step):
        cols = key_columns(module, slice(int(rows[0]), int(rows[-1]) + 1), first_query, k_len)
        mask = additive_mask(attention_mask, module, rows, cols, first_query, query.device)
        scores_ = block_scores(rows, cols, query[:, :, rows], key[:, :, cols], mask, scaling, **scores)
        at, shape = (rows, (q_len, k_len)) if span is None else (rows + span.offset, span.shape)
        notify_probabilities(module, softmax_with_sinks(scores_, sink_logits(module)), at, cols, shape)


class Span(typing.NamedTuple):
    """One span of query rows of an attention call that runs in spans (per-position frequencies): where its rows
    start in the call (``offset``), the call's ``(Lq, Lk)`` (``shape``), and the span's share of the rows the
    observers watch, as indices within the span (``watched``)."""

    offset: int
    shape: tuple[int, int]
    watched: torch.Tensor

    @classmethod
    def of(cls, sample: torch.Tensor, rows: slice, shape: tuple[int, int]) -> "Span":
        return cls(rows.start, shape, sample[(sample >= rows.start) & (sample < rows.stop)] - rows.start)


def notify_queries_keys(module, query: torch.Tensor, key: torch.Tensor) -> None:
    """Show the observers the final queries ``(B, H, Lq, D)`` and keys ``(B, Hkv, Lk, D)`` of one call."""
    for observer in observers_of(module):
        observer.queries_keys(module, query, key)


def notify_probabilities(module, probs: torch.Tensor, rows, cols: slice, shape: tuple[int, int]) -> None:
    """Show the observers one block of attention probabilities ``(B, H, C, W)`` (float32): query rows ``rows``
    (a slice or the indices ``(C,)``; observers get the indices) against keys ``cols`` of a call with
    ``shape = (Lq, Lk)`` (keys past ``cols`` are masked for these rows; the queries are the last ``Lq`` of the
    ``Lk`` positions)."""
    rows, probs = row_indices(rows, probs.device), probs.float()
    for observer in observers_of(module):
        observer.probabilities(module, probs, rows, cols, shape)


def _routed(backend: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = backend_function(module, backend)
        pairing = module.__dict__.get(PAIRING)
        if pairing is not None:  # rotate-half pairs from here on, as every hook rotates and observers read planes
            query, key = rope.to_half_pairs(query, *pairing), rope.to_half_pairs(key, *pairing)
        if observers_of(module):
            inner = _observed(inner)
        temperature = module.__dict__.get(TEMPERATURE)
        if temperature is not None:  # scales each query row before any scheme sees it
            query = temperature(query, key, attention_mask, kwargs)
        hook = module._modules.get(HOOK)
        if hook is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        return hook(inner, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{backend}"
    return attention


for _backend in BACKENDS:
    AttentionInterface.register(PREFIX + _backend, _routed(_backend))
    AttentionMaskInterface.register(PREFIX + _backend, ALL_MASK_ATTENTION_FUNCTIONS[_backend])


def routed_name(config, backend: str | None = None) -> str:
    """The ``pos_swap_*`` implementation name for ``backend`` (default: the one ``config`` uses now)."""
    current = backend or config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return current
    if current not in BACKENDS:
        raise IncompatibleSchemeError(
            f"This scheme needs pos_swap's attention function, which wraps {', '.join(BACKENDS)}; the model uses "
            f"'{current}'. Load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))."
        )
    return PREFIX + current


def first_query_slot(attention_mask, query_length: int, key_length: int) -> int | torch.Tensor:
    """Where the queries sit among the keys the cache hands over. A dynamic or sliding-window cache returns keys
    that end with the queries; a static cache returns its whole pre-allocated buffer, the queries at their cache
    positions and empty slots after them. transformers' mask tells which: each query sees itself as its last
    allowed key. Without a mask, transformers relies on SDPA's top-left causal alignment (queries first) or lets
    a single query see every key (the query last). Read from a tensor mask while torch.compile traces, the slot
    stays a 0-dim tensor: reading its value would break the graph (:func:`key_columns` and :func:`positions`
    take either)."""
    if query_length == key_length:
        return 0
    if attention_mask is None:
        return 0 if query_length > 1 else key_length - query_length
    if not isinstance(attention_mask, torch.Tensor):  # flex's BlockMask: ask its mask_mod about the last query
        return _last_query_slot_of_block_mask(attention_mask, query_length, key_length) - (query_length - 1)
    mask = attention_mask[..., -query_length:, :]  # (B, 1|H, Lq, Lk)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    columns = torch.arange(mask.shape[-1], device=mask.device)
    last_seen = torch.where(allowed, columns, -1).amax(-1)  # (B, 1|H, Lq); rows of padding see nothing: -1
    slot = (last_seen - torch.arange(query_length, device=mask.device)).amax()
    if torch.compiler.is_compiling():
        return torch.where(slot >= 0, slot, key_length - query_length)
    slot = int(slot)
    return slot if slot >= 0 else key_length - query_length


def _last_query_slot_of_block_mask(block_mask, query_length: int, key_length: int) -> int:
    """The last key slot flex's ``block_mask`` lets the last query of the first sequence see: that query's own."""
    device = block_mask.kv_num_blocks.device
    zero = torch.zeros((), dtype=torch.long, device=device)
    last_query = torch.tensor(query_length - 1, device=device)
    allowed = block_mask.mask_mod(zero, zero, last_query, torch.arange(key_length, device=device))  # (Lk,)
    seen = torch.nonzero(allowed.expand(key_length))
    return int(seen.max()) if len(seen) else key_length - 1


def positions(kwargs: dict, query: torch.Tensor, key: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the queries ``(B, Lq)`` and of the keys ``(B, Lk)``. Queries take the model's ``position_ids``
    (else their cache slots); key j sits as many slots before the last query as positions, wherever the cache put
    the queries (:func:`first_query_slot`). Without cached keys, keys take the ``position_ids`` too, so ids that
    skip (PoSE) set the distances. Empty or padded slots get positions the mask hides."""
    batch, _, query_length, _ = query.shape
    key_length = key.shape[2]
    first = first_query_slot(attention_mask, query_length, key_length)
    query_positions = kwargs.get("position_ids")
    if query_positions is None:
        query_positions = (first + torch.arange(query_length, device=query.device))[None]  # first: an int or a tensor
    query_positions = query_positions.to(query.device).expand(batch, -1)
    if kwargs.get("position_ids") is not None and query_length == key_length:  # no cached keys: the keys are the
        return query_positions, query_positions  # queries' own tokens, whose ids may skip (PoSE, packed sequences)
    slots_before_last = first + query_length - 1 - torch.arange(key_length, device=query.device)
    return query_positions, query_positions[:, -1:] - slots_before_last


class DeferredRotation(torch.nn.Module):
    """Rotates queries and every cached key at attention time, with frequencies that follow the length.

    The model's own rotary is set to the identity, so keys enter the KV cache unrotated and each call rotates them
    with ``frequencies(seq_len)`` (``seq_len (B,)`` -> ``(inv_freq (B, F), scaling (B,))``), never a mix of old and
    new frequencies: the fix transformers never merged for dynamic NTK (its issue 25104).

    ``block=None`` (whole window): every row of a forward uses the frequencies of its sequence's current length,
    transformers' semantics; computed once per forward and shared by all layers. ``block=B`` (per position): each
    query row uses those of its own position rounded up to a block of B, but not past ``trained_length`` inside
    it (:func:`~pos_swap.functional.rope.block_lengths`), and its scores use keys rotated with the same
    frequencies. A row then depends on its prefix only, so cached generation equals recomputation at any depth.
    """

    def __init__(self, frequencies, block: int | None = None, trained_length: int | None = None):
        super().__init__()
        self.frequencies = frequencies
        self.block, self.trained_length = block, trained_length
        self._memo = (None, None, None)  # (position_ids, its version, frequencies)
        self._span_memo = None  # ((length, dtype, device), query positions, key positions, their cos/sin tables)
        self._length_table = None  # ((length, dtype, device), cos, sin (1, P, R)) at positions 0..P-1
        self._keys = None  # the buffer the fused path rotates keys into (:meth:`_key_buffer`)

    def extra_repr(self) -> str:
        if self.block is None:
            return "whole window"
        return f"per position, block={self.block}, trained_length={self.trained_length}"

    def _tables(self, source, lengths: torch.Tensor):
        """Frequencies for this forward: all layers receive the same ``position_ids`` object, so compute once. The
        memo holds that object and its version counter, so a tensor changed in place between forwards is seen anew.
        A traced forward computes them in tensor operations instead (dynamo would guard on the memo)."""
        if torch.compiler.is_compiling():
            return self.frequencies(lengths)
        fresh = source is not None and self._memo[0] is source and self._memo[1] == source._version
        if not fresh:
            version = None if source is None else source._version
            self._memo = (source, version, self.frequencies(lengths))
        return self._memo[2]

    def forward(self, inner, module, query, key, value, attention_mask, **kwargs):
        q_pos, k_pos = positions(kwargs, query, key, attention_mask)
        if self.block is None:
            lengths = q_pos.max(dim=-1).values + 1  # whole window: each sequence's current length
        elif torch.compiler.is_compiling() and query.shape[2] == 1:  # a traced decode step: one length per
            lengths = rope.block_lengths(q_pos[:, 0], self.block, self.trained_length)  # sequence, no span loop
        else:
            return self._per_position(inner, module, query, key, value, attention_mask, q_pos, k_pos, **kwargs)
        inv_freq, scaling = self._tables(kwargs.get("position_ids"), lengths)
        query = rope.rotate_at(query, q_pos, inv_freq, scaling)
        key = rope.rotate_at(key, k_pos, inv_freq, scaling)
        return inner(module, query, key, value, attention_mask, **kwargs)

    def _per_position(self, inner, module, query, key, value, attention_mask, q_pos, k_pos, **kwargs):
        """Attention once per block length: the rows of that length (a span of rows, several sequences' spans
        together) against the keys they may see, both rotated with that length's frequencies; each row's output
        is taken from the pass of its own length. Memory is that of one span of rows, never L x L.

        Without a padding mask (:func:`causal_only`), with sdpa and a kernel for the device
        (:func:`pos_swap.fused.kernel_for`), a span runs in :func:`pos_swap.fused.shifted_causal_attention` (causal
        fast path, no mask built; observers are shown what the generic path shows them); otherwise ``inner`` gets
        the span's block of the mask (:func:`mask_block`)."""
        batch, heads, q_len, head_dim = query.shape
        first = first_query_slot(attention_mask, q_len, key.shape[2])
        kernel = fused.kernel_for(module, query, kwargs.get("softcap"), dropout=kwargs.get("dropout", 0.0))
        fast = kernel is not None and getattr(module, "is_causal", True) and causal_only(attention_mask, first)
        reuse_keys = not fused.wants_grad(query, key)  # the shared key buffer is rewritten: not for autograd
        scale = kwargs.get("scaling") or head_dim**-0.5
        lengths = rope.block_lengths(q_pos, self.block, self.trained_length)  # (B, Lq)
        output, weights = query.new_zeros(batch, q_len, heads, value.shape[-1]), None  # value heads may be narrower
        sample = observed_rows(module, q_len)  # one sample of rows for the whole call, shared out to its spans
        if sample is not None:  # once per call: a rotation keeps each plane's norm, and spans share their keys
            notify_queries_keys(module, query, key)
        for length in lengths.unique().tolist():
            chosen = lengths == length  # (B, Lq)
            rows = _span(chosen.any(dim=0))
            cols = key_columns(module, rows, first, key.shape[2])
            q_table, k_table = self._rotations(length, q_pos[:, rows], k_pos[:, cols], query.dtype)
            q_rows = rope.rotate(query[:, :, rows], *q_table)
            span = None if sample is None else Span.of(sample, rows, (q_len, key.shape[2]))
            if fast:
                if reuse_keys:
                    k_cols = rope.rotate_into(self._key_buffer(key, cols.stop), key[:, :, cols], *k_table)
                else:
                    k_cols = rope.rotate(key[:, :, cols], *k_table)
                v_cols = value[:, :, cols]
                out, lse = fused.shifted_causal_attention(kernel, q_rows, k_cols, v_cols, scale, first + rows.start)
                out, probs = with_sinks(out, lse, sink_logits(module)).transpose(1, 2), None
                if sample is not None:  # what the observed backend of the generic path shows them
                    mask = mask_block(attention_mask, module, rows, cols, first, query.dtype, query.device)
                    notify_blocks(module, q_rows, k_cols.clone(), mask, scale, span=span)  # the next span rewrites k_cols
            else:
                k_cols = rope.rotate(key[:, :, cols], *k_table)
                mask = mask_block(attention_mask, module, rows, cols, first, query.dtype, query.device)
                observed = {} if span is None else {"observed_span": span}  # observers present: inner is observed
                out, probs = inner(module, q_rows, k_cols, value[:, :, cols], mask, **kwargs, **observed)  # (B, C, H, D)
            keep = chosen[:, rows]  # (B, C)
            output[:, rows] = torch.where(keep[:, :, None, None], out, output[:, rows])
            if probs is not None:
                weights = probs.new_zeros(batch, heads, q_len, key.shape[2]) if weights is None else weights
                weights[:, :, rows, cols] = torch.where(keep[:, None, :, None], probs, weights[:, :, rows, cols])
        return output, weights

    def _rotations(self, length: int, q_positions: torch.Tensor, k_positions: torch.Tensor, dtype):
        """The cos/sin tables of ``length``'s frequencies at a span's query and key positions ``(B, C)``,
        ``(B, W)``. The last span's are kept and reused while the length, dtype and positions are equal: a forward
        whose rows share one length (a decode step, a prefill within the trained context) computes them once for
        all its layers, not once per layer. One span's tables only, so the memo stays O(L)."""
        setting = (length, dtype, k_positions.device)
        memo = self._span_memo
        same = memo is not None and memo[0] == setting
        if not (same and torch.equal(memo[1], q_positions) and torch.equal(memo[2], k_positions)):
            tables = tuple(self._at_positions(setting, at) for at in (q_positions, k_positions))
            # copies: the positions may be views of a position_ids tensor the caller changes in place later
            self._span_memo = memo = (setting, q_positions.clone(), k_positions.clone(), tables)
        return memo[3]

    def _at_positions(self, setting, positions: torch.Tensor):
        """cos/sin ``(B|1, W, R)`` of ``setting``'s length at ``positions (B, W)``, read from a table of that
        length at positions 0..P-1 that later calls reuse (built with a block of slack): consecutive decode steps
        share one length for a block of positions, so each step only reads the table (a slice when the positions
        are 0..W-1 in every sequence, as without padding) instead of computing cos and sin for the whole cache."""
        length, dtype, device = setting
        table, needed = self._length_table, int(positions.max()) + 1
        if table is None or table[0] != setting or table[1].shape[1] < needed:
            inv_freq, scaling = self.frequencies(torch.full((1,), length, device=device))
            at = torch.arange(needed + self.block, device=device)[None]
            self._length_table = table = (setting, *rope.cos_sin(at, inv_freq, scaling, dtype))
        width = positions.shape[1]
        if bool((positions == torch.arange(width, device=device)).all()):
            return table[1][:, :width], table[2][:, :width]
        at = positions.clamp(min=0)  # a padding slot's position (masked, never seen) may be negative
        return table[1][0, at], table[2][0, at]

    def _key_buffer(self, key: torch.Tensor, width: int) -> torch.Tensor:
        """Room for ``width`` rotated keys shaped like ``key``, reused by every span, layer and decode step (with a
        block of slack, so a growing cache rarely needs a new one): rotating a long cache into fresh memory at each
        call costs more in page faults than the rotation itself. Its keys are read before the next call writes."""
        batch, heads, _, dim = key.shape
        keys = self._keys
        if keys is None or keys.shape[2] < width or (keys.shape[:2], keys.shape[3], keys.dtype, keys.device) != (
            key.shape[:2], dim, key.dtype, key.device
        ):  # fmt: skip
            self._keys = keys = key.new_empty(batch, heads, key.shape[2] + self.block, dim)
        return keys[:, :, :width]


def _span(flags: torch.Tensor) -> slice:
    """The smallest slice holding every True of a 1-D boolean tensor (which has at least one)."""
    where = flags.nonzero()
    return slice(int(where[0]), int(where[-1]) + 1)


def causal_only(attention_mask, first_query: int) -> bool:
    """Whether ``attention_mask`` hides only later keys (no padding): None, or a boolean mask ``(B, 1, Lq, Lk)``
    in which query row r sees exactly the key slots up to ``first_query + r``, as sdpa's for a prefill that
    continues a cache."""
    if attention_mask is None:
        return True
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
        return False
    q_len, k_len = attention_mask.shape[-2:]
    slots = torch.arange(first_query, first_query + q_len, device=attention_mask.device)[:, None]
    return bool((attention_mask == (torch.arange(k_len, device=attention_mask.device) <= slots)).all())


def key_columns(module, rows: slice, first_query: int | torch.Tensor, key_length: int) -> slice:
    """The keys query ``rows`` may see: up to the last of them (queries start at key slot ``first_query``) for a
    causal module, all otherwise (and where ``first_query`` is a traced tensor: the mask hides the later keys)."""
    causal = getattr(module, "is_causal", True) and not isinstance(first_query, torch.Tensor)
    return slice(0, min(key_length, first_query + rows.stop) if causal else key_length)


def require_tensor_mask(attention_mask):
    """``attention_mask`` itself if it is a tensor or None; pos_swap's blockwise attention cannot read others."""
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise IncompatibleSchemeError(
            f"pos_swap computes this attention in blocks and reads masks as tensors, not {type(attention_mask).__name__}"
            f" (flex_attention's BlockMask). Load the model with attn_implementation='sdpa' or 'eager'."
        )
    return attention_mask


def mask_block(attention_mask, module, rows: slice, cols: slice, first_query: int, dtype, device):
    """The mask a backend expects for query ``rows`` against key ``cols``: the model's own mask cut to the block,
    or, where transformers passed none (causal, no padding), the causal block as an additive mask in ``dtype``."""
    if require_tensor_mask(attention_mask) is not None:
        return attention_mask[:, :, rows, cols]
    mask = additive_mask(None, module, rows, cols, first_query, device)
    return None if mask is None else mask.to(dtype).clamp(min=torch.finfo(dtype).min)








def query_blocks(module, query, key, attention_mask, budget_mib=BLOCK_MIB):
    """The blocks of query rows attention is computed in, so that no more than ``budget_mib`` of float32 scores
    exist at once: ``(rows, cols, query rows, key columns, additive mask or None)`` for ``query (B, H, Lq, D)`` and
    ``key (B, H, Lk, D)`` (already repeated for grouped-query heads). A causal module's block reads only the keys up
    to its last query (``cols``): the others would be masked, so a prefill does half the work."""
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    first_query = first_query_slot(attention_mask, q_len, k_len)
    step = rows_per_block(budget_mib * 2**20, batch, heads, k_len)
    for block in range(-(-q_len // step)):  # the count, not range(0, q_len, step): torch.compile guards on the step
        rows = slice(block * step, min((block + 1) * step, q_len))
        cols = key_columns(module, rows, first_query, k_len)
        mask = additive_mask(attention_mask, module, rows, cols, first_query, query.device)  # (B|1, 1, C, W)
        yield rows, cols, query[:, :, rows], key[:, :, cols], mask


def block_scores(rows, cols, q_rows, k_cols, mask, scaling, *, logits=None, bias=None, softcap=None):
    """The attention scores ``(B, H, C, W)`` of one block, in :func:`score_dtype`: ``logits(rows, cols, q_rows, k_cols, mask)`` or the
    scaled dot product plus ``bias(rows, cols)``, then the softcap (Gemma 2) and the additive mask."""
    if logits is not None:
        scores = logits(rows, cols, q_rows, k_cols, mask)
    else:
        scores = scaled_scores(q_rows @ k_cols.transpose(-1, -2), scaling)
        if bias is not None:
            scores = scores + bias(rows, cols)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores if mask is None else scores + mask


def scaled_scores(products: torch.Tensor, scaling: float) -> torch.Tensor:
    """Dot products of queries and keys times ``scaling``, in :func:`score_dtype` (float64 stays float64)."""
    return products.to(score_dtype(products.dtype)) * scaling


def chunked_attention(
    module, query, key, value, attention_mask, scaling, *, logits=None, bias=None, dropout=0.0, softcap=None,
    budget_mib=BLOCK_MIB,
):  # fmt: skip
    """Attention computed over the blocks of query rows of :func:`query_blocks` (never an L x L tensor per head on
    the long path).

    The scores are either ``logits(rows, cols, query_rows, key_cols, mask) -> (B, H, C, W)`` (float32, already
    scaled; ``mask`` is the block's additive mask or None)
    or the scaled dot product plus ``bias(rows, cols) -> (B|1, H, C, W)``; a bias alone runs fused in SDPA unless
    eager attention weights, a softcap (Gemma 2) or learned sink logits (GPT-OSS, :func:`sink_logits`: one more column
    of the softmax) are needed. Keys and values are repeated for grouped-query heads. The module's observers
    (:func:`pos_swap.observe`) see the probabilities of the rows they watch. Returns
    ``(output (B, Lq, H, D), weights (B, H, Lq, Lk) or None)``; weights only when the model chose eager.
    """
    keep_weights = module.config._attn_implementation == PREFIX + "eager"
    sinks = sink_logits(module)
    fused = logits is None and not keep_weights and softcap is None and sinks is None
    watched = None if fused else observed_rows(module, query.shape[2])
    if watched is not None:
        notify_queries_keys(module, query, key)
        watched = watched.to(query.device)
    k_len = key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    outputs, weights = [], []
    for rows, cols, q_rows, k_cols, mask in query_blocks(module, query, key, attention_mask, budget_mib):
        v_cols = value[:, :, cols]
        if fused:
            extra = bias(rows, cols) if mask is None else bias(rows, cols) + mask  # (B|1, H, C, W) float32
            extra = extra.to(query.dtype).clamp(min=torch.finfo(query.dtype).min)  # fp16: -inf to its finite min
            p = dropout if module.training else 0.0
            outputs.append(F.scaled_dot_product_attention(q_rows, k_cols, v_cols, extra, dropout_p=p, scale=scaling))
            continue
        scores = block_scores(rows, cols, q_rows, k_cols, mask, scaling, logits=logits, bias=bias, softcap=softcap)
        probs = softmax_with_sinks(scores, sinks)  # (B, H, C, W) float32, or float64 for float64 inputs
        if watched is not None:
            shown = watched[(watched >= rows.start) & (watched < rows.stop)]
            notify_probabilities(module, probs[:, :, shown - rows.start], shown, cols, (query.shape[2], k_len))
        probs = F.dropout(probs.to(value.dtype), p=dropout, training=module.training)
        outputs.append(probs @ v_cols)
        if keep_weights:
            weights.append(F.pad(probs, (0, k_len - cols.stop)))
    if fused:
        notify_blocks(module, query, key, attention_mask, scaling, bias=bias, budget_mib=budget_mib)
    output = torch.cat(outputs, dim=2).transpose(1, 2).contiguous()
    return output, torch.cat(weights, dim=2) if keep_weights else None




def chunked_backend(model) -> str:
    """The backend to route a model whose hooks compute attention with :func:`chunked_attention`: eager stays
    eager (float masks, attention weights returned); any other gets sdpa's boolean masks, which it reads too."""
    return "eager" if backend_of(model.base_model) == "eager" else "sdpa"
