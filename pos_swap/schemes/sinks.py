"""``sinks``: attention sinks (StreamingLLM, Xiao et al. 2024) for RoPE models, and :class:`SinkCache`, the bounded
cache that lets ``generate`` run over an unbounded stream in constant memory.

Each token attends to the first ``sink_tokens`` tokens of its sequence and to the ``window`` tokens before it, at
positions inside that cache (:mod:`pos_swap.functional.sinks`), so no distance exceeds ``sink_tokens + window``. The
model's rotary becomes the identity and keys enter the cache unrotated: the hook rotates them at attention time.

The attention pattern is that of StreamingLLM fed one token at a time, whatever the input: a whole sequence in one
forward, a plain ``DynamicCache``, or a :class:`SinkCache` fed in chunks of any size all give the same logits. Only
the :class:`SinkCache` drops what no later token can see, keeping at most ``sink_tokens + window`` keys per layer::

    pos_swap.patch(model, "sinks", sink_tokens=4, window=1020)
    model.generate(ids, cache=SinkCache(model), max_new_tokens=100_000)  # past_key_values= before transformers 5.24
"""

import dataclasses
import warnings

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .. import archs, fused
from ..attention import (
    HOOK, additive_mask, chunked_attention, chunked_backend, first_query_slot, notify_blocks, scaled_scores,
    sink_logits,
)  # fmt: skip
from ..engine import current_patch, resolve
from ..errors import IncompatibleSchemeError, NotPatchedError, PosSwapError
from ..functional import rope, sinks
from ..registry import MAX_POSITIONS, Scheme, SchemeConfig, greater_than, param, register


HIDDEN = -1e30  # the logit of a key the pattern hides


def _not_negative(value):
    return None if value >= 0 else "must be >= 0 (0 keeps no sinks: a plain sliding window)"


@dataclasses.dataclass
class SinksConfig(SchemeConfig):
    sink_tokens: int = param(4, "S: the first S tokens stay visible to every later token", _not_negative)
    window: int | None = param(
        None,
        "W: each token also sees the W tokens before it (default: the trained context minus S)",
        greater_than(0, at_most=MAX_POSITIONS),
    )

    def validate(self, model):
        layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise IncompatibleSchemeError(
                f"sinks sets every layer's attention pattern, but this '{model.config.model_type}' model has layers "
                f"of types {sorted(layer_types)}, whose own windows it would override. Use it on a model whose layers "
                f"all attend to the full context (LLaMA, Qwen 2, Phi-3, ...)."
            )
        trained = archs.trained_context(model.config)
        if self.window is None:
            self.window = max(1, trained - self.sink_tokens)
        if self.sink_tokens + self.window > trained:
            warnings.warn(
                f"sinks: sink_tokens + window = {self.sink_tokens + self.window} exceeds the trained context "
                f"({trained}), so positions inside the cache reach past what the model was trained on. Use a window "
                f"of at most {max(1, trained - self.sink_tokens)}.",
                stacklevel=4,
            )


class SinkAttention(nn.Module):
    """The attention hook of one rotary table: keys and queries rotated at their places in the StreamingLLM cache,
    every key the pattern hides masked. A :class:`SinkLayer` hands itself over in ``pending`` right before the
    call that reads its keys, to learn their ranks and drop what no later token sees."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, sink_tokens: int, window: int):
        super().__init__()
        self.inv_freq = inv_freq  # (F,) float32, the model's own frequencies; a plain tensor so dtype casts skip it
        self.attention_scaling, self.sink_tokens, self.window = attention_scaling, sink_tokens, window
        self.pending = None  # the SinkLayer whose keys the next call reads

    def extra_repr(self) -> str:
        return f"sink_tokens={self.sink_tokens}, window={self.window}, rotary_dim={2 * self.inv_freq.numel()}"

    def _rotate(self, x: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        return rope.rotate_at(x, ranks.clamp(min=0), self.inv_freq.to(x.device), self.attention_scaling)

    def key_ranks(self, key, attention_mask, first_query: int, query_length: int, module) -> torch.Tensor:
        """The rank of every key slot ``(B, Lk)``: from transformers' mask (the keys the last query may see are its
        sequence's real tokens) or, under a :class:`SinkCache`, from the cache for the keys it kept."""
        layer, self.pending = self.pending, None
        last = torch.tensor([query_length - 1], device=key.device)
        allowed = additive_mask(attention_mask, module, last, slice(0, key.shape[2]), first_query, key.device)
        valid = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
        if allowed is not None:
            valid = valid & (allowed[:, 0, 0] == 0)
        if layer is None:
            return sinks.ranks(valid)
        if layer.handed is not key:
            raise PosSwapError(
                f"A SinkCache handed keys to {type(module).__name__} that reached its attention changed, so their "
                f"ranks are unknown. This architecture cannot stream with SinkCache; use a DynamicCache (the sinks "
                f"scheme gives the same logits with it, without bounding memory)."
            )
        return layer.commit(valid[:, -query_length:])  # the cache's own slots: the mask only knows the new ones

    def forward(self, inner, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        sizes = self.sink_tokens, self.window
        q_len, k_len = query.shape[2], key.shape[2]
        from_sink_cache = self.pending is not None  # its keys end with the queries; transformers' mask knows only those
        first = k_len - q_len if from_sink_cache else first_query_slot(attention_mask, q_len, k_len)
        k_rank = self.key_ranks(key, attention_mask, first, q_len, module)  # (B, Lk)
        q_rank = k_rank[:, first + torch.arange(q_len, device=key.device)]  # (B, Lq); first may be a traced tensor
        near_query, far_query = self._rotate(query, q_rank), self._rotate(query, sinks.cache_query_positions(q_rank, *sizes))
        keys = self._rotate(key, k_rank)

        def logits(rows, cols, q_rows, k_cols, mask):
            """Recent keys scored at true distances, sinks from the query's place in the cache, the rest hidden (a
            finite -1e30, so that adding transformers' mask cannot overflow to -inf)."""
            q_ranks, k_ranks = q_rank[:, rows], k_rank[:, cols]
            near, far = q_rows @ k_cols.transpose(-1, -2), far_query[:, :, rows] @ k_cols.transpose(-1, -2)
            neighbours = sinks.in_window(q_ranks, k_ranks, self.window)[:, None]  # (B, 1, C, W)
            scores = scaled_scores(torch.where(neighbours, near, far), scaling)
            return scores.masked_fill(~sinks.visible(q_ranks, k_ranks, *sizes)[:, None], HIDDEN)

        kernel = fused.kernel_for(module, query, kwargs.get("softcap"), dropout=dropout)
        if kernel is not None and _bands_apply(k_rank, first, *sizes):
            output = fused.sink_attention(
                kernel, near_query, far_query, keys, value, scaling, first, *sizes, sinks=sink_logits(module)
            )
            notify_blocks(module, near_query, keys, attention_mask, scaling, logits=logits)  # observers, if any
            return output, None
        if from_sink_cache:  # a mask for the few keys the cache holds: (B, 1, Lq, S + W + Lq) at most
            attention_mask = sinks.visible(q_rank, k_rank, *sizes)[:, None]
        return chunked_attention(
            module, near_query, keys, value, attention_mask, scaling, logits=logits, dropout=dropout,
            softcap=kwargs.get("softcap"),
        )  # fmt: skip


def _bands_apply(key_ranks: torch.Tensor, first_query: int, sink_tokens: int, window: int) -> bool:
    """Whether the fused passes (a band of slots plus the first ``sink_tokens`` slots) see what the ranks say: no
    padding, the sinks in the first slots, each later slot one rank after the one before it, and, where a cache
    dropped the tokens between sinks and window, every query at least ``window`` slots past the sinks."""
    sinks_held, rest = key_ranks[:, :sink_tokens], key_ranks[:, sink_tokens:]
    in_order = torch.arange(sinks_held.shape[-1], device=key_ranks.device)
    if not (torch.equal(sinks_held, in_order.expand_as(sinks_held)) and bool((rest.diff(dim=-1) == 1).all())):
        return False
    dropped = rest.shape[-1] > 0 and bool((rest[:, 0] > sink_tokens).any())
    return not dropped or first_query >= sink_tokens + window


@register
class Sinks(Scheme):
    name = "sinks"
    summary = "attention sinks: the first tokens plus a sliding window, positions inside the cache (StreamingLLM)"
    Config = SinksConfig
    families = (archs.ROTARY,)

    def apply(self, patch) -> None:
        model, c = patch.model, self.config
        backend = chunked_backend(model)
        for slot in archs.rotary_slots(model):
            inv_freq, scaling = slot.inv_freq.float().clone(), slot.attention_scaling
            hook = lambda module, f=inv_freq, a=scaling: SinkAttention(f, a, c.sink_tokens, c.window)  # noqa: E731 - one per layer, each with its own handover
            patch.set_rotary_identity(slot)  # keys enter the cache unrotated
            patch.hook_attention(archs.attention_modules(model, slot.layer_type), hook, backend=backend)


class SinkLayer(DynamicLayer):
    """One layer of a :class:`SinkCache`: unrotated keys and values of the sinks and the latest ``window`` tokens,
    with each slot's rank (its place among the sequence's real tokens; -1 for padding or filler)."""

    def __init__(self, sink_tokens: int, window: int):
        super().__init__()
        self.sink_tokens, self.window = sink_tokens, window
        self.seen = 0  # tokens fed so far, padding included: what generate counts positions from
        self.ranks = self.real_tokens = None  # (B, M) ranks of the kept slots, (B,) real tokens seen
        self.handed = None  # the keys of the last update, until the hook reads them and commits their ranks

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.handed = keys
        return keys, values

    def commit(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Take the validity ``(B, q)`` of the tokens of the last update; return the ranks of every key it handed
        over ``(B, M + q)``, and keep only the slots a later token can see."""
        batch = new_valid.shape[0]
        held = self.ranks if self.ranks is not None else new_valid.new_zeros(batch, 0, dtype=torch.long)
        before = self.real_tokens if self.real_tokens is not None else new_valid.new_zeros(batch, dtype=torch.long)
        ranks = torch.cat([held, torch.where(new_valid, before[:, None] + new_valid.long().cumsum(-1) - 1, -1)], -1)
        self.real_tokens = before + new_valid.sum(-1)
        slots, self.ranks = sinks.kept_slots(ranks, self.real_tokens, self.sink_tokens, self.window)
        index = slots[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, index), self.values.gather(2, index)
        self.handed = None
        return ranks

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The kept slots plus the new ones, as the last keys before the queries: transformers then masks the new
        tokens (padding, causality) right; the hook reads the kept slots' ranks from the cache."""
        held = self.keys.shape[-2] if self.is_initialized else 0
        return held + query_length, self.seen - held

    def get_max_length(self) -> int:
        return self.sink_tokens + self.window

    def crop(self, tokens_to_remove: int) -> None:
        raise PosSwapError(
            "A SinkCache cannot be cropped: it has dropped the tokens a rollback would return to. Use a DynamicCache "
            "(the sinks scheme gives the same logits with it) for assisted or speculative decoding."
        )

    def reset(self) -> None:
        super().reset()
        self.seen, self.ranks, self.real_tokens, self.handed = 0, None, None, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._follow_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._follow_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._follow_batch(lambda x: x[indices])

    def _follow_batch(self, select) -> None:
        if self.ranks is not None:
            self.ranks, self.real_tokens = select(self.ranks), select(self.real_tokens)


class SinkCache(Cache):
    """The bounded KV cache of a model patched with ``sinks``: per layer the first ``sink_tokens`` tokens and the
    latest ``window``, so ``generate(..., cache=SinkCache(model))`` holds at most ``sink_tokens + window``
    keys per layer however long it runs. One cache per stream; it works with the model it was made for."""

    def __init__(self, model: nn.Module):
        model = resolve(model)
        handle = current_patch(model)
        if handle is None or handle.scheme.name != Sinks.name:
            raise NotPatchedError(
                "SinkCache needs a model patched with the 'sinks' scheme, whose attention reads the cache's ranks. "
                "Patch it first: pos_swap.patch(model, 'sinks', sink_tokens=4, window=1020)."
            )
        self.attention = archs.attention_modules(model)
        config = handle.scheme.config
        super().__init__(layers=[SinkLayer(config.sink_tokens, config.window) for _ in self.attention])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        hook = self.attention[layer_idx]._modules.get(HOOK)
        if not isinstance(hook, SinkAttention):
            raise NotPatchedError(
                "This SinkCache's model no longer carries the 'sinks' patch, so nothing would keep its attention to "
                "the tokens the cache holds. Re-apply the patch, or use a new cache with the model as it is now."
            )
        hook.pending = self.layers[layer_idx]
        return keys, values
