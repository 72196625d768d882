"""Fused attention passes for the schemes that change the scores (ALiBi, Self-Extend, ReRoPE, attention sinks,
Dual Chunk Attention), merged by log-sum-exp, and a cache-sized CoPE path.

A scheme whose scores are not a plain scaled dot product can still run in a fused kernel (no L x L tensor) when
its attention splits into passes the kernel computes: each pass returns its output and the log-sum-exp of its
scores per query row, and :func:`merge_by_lse` combines them exactly, as flash implementations of SelfExtend do.
Self-Extend and ReRoPE split into a band of neighbours and the keys beyond it (:func:`windowed_attention`), Dual
Chunk Attention into a query's own chunk, the chunk before and older chunks (:func:`dual_chunk_attention`).
ALiBi needs no second pass: -m·(i - j) is m·j plus a row constant the softmax drops, a per-key bias that folds
into a few extra query/key features (:func:`alibi_attention`). CoPE's scores depend on a running sum over the
keys, which no fused kernel computes; :func:`cope_attention` runs it in blocks small enough to stay in the CPU's
cache and stops counting where every position has reached the table's end.

The passes are written once against one small interface, a :class:`Kernel`: attention of q, k, v with a causal or
an additive mask, returning ``(output, log-sum-exp)``. :func:`kernel_for` picks it per call: torch's CPU flash
kernel on the CPU (:class:`CpuFlash`), compiled flex_attention on CUDA (:class:`Flex`), or None, and the hook takes
the chunked path (:func:`pos_swap.attention.chunked_attention`). ALiBi's folded features need no log-sum-exp, so
off the CPU it runs in plain ``scaled_dot_product_attention`` (:func:`sdpa_output`, :func:`folded_attend_for`).
The environment variable :data:`SETTING` forces one kernel (``flex`` also runs uncompiled on the CPU, which is how
the CUDA path is tested without a GPU). A kernel that is missing (a torch without the private CPU op, without
flex_attention or without triton for compiling it) is reported once in a warning, and the hooks run chunked.
"""

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from .attention_base import additive_mask, backend_of, rows_per_block, score_dtype, softmax_with_sinks, with_sinks
from .errors import InvalidParameterError

# Query rows per pass. The CPU kernel splits queries finely below 768 rows (slower), and ALiBi's folded bias near
# the diagonal stays below slope x ALIBI_BLOCK / 2 (float32 error about 3e-5 in the logits at slope 1/2).
ALIBI_BLOCK = 2048
BAND_BLOCK = 1024  # Self-Extend's neighbour pass reads the window plus this many keys per row
COPE_BLOCK_BYTES = 2**22  # float32 scores of one block of CoPE query rows: small enough that its passes stay in cache
COPE_COLUMNS = 512  # keys counted at a time, before CoPE checks whether every position has reached the table's end
KERNEL_NAME = "_scaled_dot_product_flash_attention_for_cpu"
KERNEL_ARGUMENTS = ("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale")  # as called below
SETTING = "POS_SWAP_KERNEL"  # environment variable: which kernel the fused passes use
CHOICES = ("auto", "cpu-flash", "flex", "sdpa", "chunked")  # sdpa: ALiBi's folded path only, the passes chunked


def find_cpu_kernel(ops=torch.ops.aten):
    """torch's private CPU flash attention that also returns the log-sum-exp, ``ops.`` :data:`KERNEL_NAME`, or
    None when ``ops`` has no such op or its arguments or outputs are not those :class:`CpuFlash` uses."""
    op = getattr(ops, KERNEL_NAME, None)
    schema = getattr(getattr(op, "default", None), "_schema", None)
    if schema is None:
        return None
    fits = tuple(argument.name for argument in schema.arguments) == KERNEL_ARGUMENTS and len(schema.returns) == 2
    return op if fits else None


def find_flex():
    """``(flex_attention, AuxRequest, create_block_mask)`` from torch, or None where this torch has no
    flex_attention that returns the log-sum-exp through ``return_aux`` (torch < 2.9)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, AuxRequest, create_block_mask


CPU_KERNEL = find_cpu_kernel()
FLEX = find_flex()


class Kernel:
    """Attention ``(B, H, Lq, D)`` and the log-sum-exp of the scaled scores ``(B, H, Lq)`` (float32, float64 for
    float64 inputs) in one fused pass. Keys and values may have fewer heads than the queries (grouped-query
    attention, each shared by consecutive query heads); ``causal`` is top-left aligned (row r sees keys <= r),
    ``mask`` is additive ``(B|1, H|1, Lq, Lk)`` in the query's dtype. ``differentiable``: whether gradients flow
    through both outputs (what training through merged passes needs)."""

    name = "kernel"
    differentiable = False

    def __call__(self, query, key, value, scale: float, *, causal: bool = False, mask=None):
        raise NotImplementedError

    def folded(self, query, key, value, scale: float, shift: int, mask=None):
        """``(output, lse)``, rows seeing key slots up to their own plus ``shift`` (or as ``mask`` says): ALiBi's
        folded path (:func:`alibi_attention`) on this kernel."""
        if mask is None:
            return shifted_causal_attention(self, query, key, value, scale, shift)
        return self(query, key, value, scale, mask=mask)

    def __repr__(self) -> str:
        return self.name


class CpuFlash(Kernel):
    """torch's flash attention for the CPU (the private op :data:`CPU_KERNEL`); its log-sum-exp has no gradient."""

    name = "cpu-flash"

    def __call__(self, query, key, value, scale: float, *, causal: bool = False, mask=None):
        return CPU_KERNEL(query, key, value, 0.0, causal, attn_mask=mask, scale=scale)


class Flex(Kernel):
    """flex_attention with the log-sum-exp (differentiable), compiled (CUDA) or eager. Eager flex computes the
    whole score matrix of a pass and torch refuses its backward on the CPU: it is the reference that tests the
    CUDA path here, at small sizes."""

    differentiable = True

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.name = "flex (compiled)" if compiled else "flex (eager)"

    def __call__(self, query, key, value, scale: float, *, causal: bool = False, mask=None):
        gqa = key.shape[1] != query.shape[1]
        if mask is not None:
            mask = mask.to(score_dtype(query.dtype)).expand(*query.shape[:2], *mask.shape[2:])
            return _flex_pass(self.compiled, "additive")(query, key, value, scale, gqa, mask)
        if causal:
            block_mask = _causal_block_mask(query.shape[2], key.shape[2], str(query.device))
            return _flex_pass(self.compiled, "causal")(query, key, value, scale, gqa, block_mask)
        return _flex_pass(self.compiled, "unmasked")(query, key, value, scale, gqa)


def _flex(query, key, value, scale, gqa, **masks):
    flex_attention, aux_request, _ = FLEX
    out, aux = flex_attention(query, key, value, scale=scale, enable_gqa=gqa, return_aux=aux_request(lse=True), **masks)
    return out, aux.lse


def _flex_unmasked(query, key, value, scale, gqa):
    return _flex(query, key, value, scale, gqa)


def _flex_additive(query, key, value, scale, gqa, mask):
    return _flex(query, key, value, scale, gqa, score_mod=lambda score, b, h, q, k: score + mask[b, h, q, k])


def _flex_causal(query, key, value, scale, gqa, block_mask):
    return _flex(query, key, value, scale, gqa, block_mask=block_mask)


@functools.cache
def _flex_pass(compiled: bool, variant: str):
    """One flex variant, compiled once: three functions, so each keeps its own compile cache (shapes and dtypes
    recompile per function, not across all three)."""
    function = {"unmasked": _flex_unmasked, "additive": _flex_additive, "causal": _flex_causal}[variant]
    if compiled:
        return torch.compile(function)
    return _quiet(function)


def _quiet(function):
    """``function`` without torch's warning that eager flex materializes the scores: eager is chosen on purpose."""

    @functools.wraps(function)
    def call(*args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return function(*args)

    return call


@functools.lru_cache(maxsize=64)
def _causal_block_mask(q_len: int, k_len: int, device: str):
    """flex's top-left causal BlockMask for ``q_len`` queries and ``k_len`` keys (cached: every layer asks)."""
    return FLEX[2](lambda b, h, q, k: k <= q, None, None, q_len, k_len, device=device)


def sdpa_output(query, key, value, scale: float, shift: int, mask=None) -> tuple[torch.Tensor, None]:
    """ALiBi's folded attention in plain ``scaled_dot_product_attention`` (flash or efficient kernel on CUDA,
    gradients included), and no log-sum-exp: rows see key slots up to their own plus ``shift = Lk - Lq``
    (bottom-right causal), or as the additive ``mask`` says. Head dims are padded with zeros to a multiple of 8, as
    the CUDA kernels want."""
    from torch.nn.attention.bias import causal_lower_right

    dim = value.shape[-1]
    query, key, value = (F.pad(x, (0, -x.shape[-1] % 8)) for x in (query, key, value))
    if mask is None:
        assert shift == key.shape[2] - query.shape[2], "the folded blocks end at their last query's key slot"
        mask = causal_lower_right(query.shape[2], key.shape[2])
    gqa = key.shape[1] != query.shape[1]
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return output[..., :dim], None


CPU_FLASH = CpuFlash()
FLEX_EAGER, FLEX_COMPILED = Flex(compiled=False), Flex(compiled=True)  # nothing compiles before a first call


def setting() -> str:
    """The kernel :data:`SETTING` asks for (default ``auto``); a clear error for a value that is none of
    :data:`CHOICES`."""
    value = os.environ.get(SETTING, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise InvalidParameterError(
            f"{SETTING}={value!r} is not a pos_swap attention kernel; use one of {', '.join(CHOICES)} (or unset it)."
        )
    return value


@functools.cache
def _warn_missing(kernel: str, reason: str) -> None:
    warnings.warn(
        f"pos_swap's fused attention passes cannot use the {kernel} kernel: {reason}. Schemes that change the scores "
        f"run the chunked path (same results, slower on long inputs).",
        stacklevel=4,
    )


def _cpu_flash(device: torch.device) -> Kernel | None:
    if device.type != "cpu":
        _warn_missing("cpu-flash", f"it runs on CPU tensors, not {device.type}")
        return None
    if CPU_KERNEL is None:
        _warn_missing(
            "cpu-flash",
            f"this torch ({torch.__version__}) has no torch.ops.aten.{KERNEL_NAME} with the arguments "
            f"{', '.join(KERNEL_ARGUMENTS)}",
        )
        return None
    return CPU_FLASH


def _flex_kernel(device: torch.device) -> Kernel | None:
    if FLEX is None:
        _warn_missing("flex", f"this torch ({torch.__version__}) has no flex_attention returning its log-sum-exp")
        return None
    if device.type == "cpu":  # compiled CPU flex refuses the log-sum-exp: eager, the dense reference
        return FLEX_EAGER
    from torch.utils._triton import has_triton

    if not has_triton():
        _warn_missing("flex", "torch.compile needs triton for it, and triton is not installed")
        return None
    return FLEX_COMPILED


def lse_kernel(device: torch.device) -> Kernel | None:
    """The kernel the passes run on for tensors on ``device``: :data:`SETTING`'s, or by default torch's CPU flash
    kernel on the CPU and compiled flex on CUDA; None (chunked) elsewhere or when the kernel is missing."""
    choice = setting()
    if choice == "auto":
        choice = {"cpu": "cpu-flash", "cuda": "flex"}.get(device.type, "chunked")
    if choice == "cpu-flash":
        return _cpu_flash(device)
    if choice == "flex":
        return _flex_kernel(device)
    return None


def _inference_or_no_dropout(module, softcap, dropout) -> bool:
    """What every fused path needs of the call: sdpa routing (eager must return weights), no softcap, no attention
    dropout to apply, and no torch.compile tracing the call: the hooks choose their passes from tensor values
    (whether positions follow the cache slots), a graph break in dynamo that makes every enclosing ``forward`` a
    frame of its own and ends at its recompile limit; the chunked path reads no values and is exact for any
    positions."""
    return (
        backend_of(module) == "sdpa" and softcap is None and not (module.training and dropout)
        and not torch.compiler.is_compiling()
    )  # fmt: skip


def wants_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records a computation on any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def kernel_for(module, query: torch.Tensor, softcap=None, *parameters: torch.Tensor, dropout=0.0) -> Kernel | None:
    """The kernel a scheme's hook runs its fused passes on (:func:`lse_kernel` for the query's device), or None for
    the chunked path: also None with eager routing, a softcap, attention dropout in training, or gradients wanted
    through ``query`` or ``parameters`` from a kernel whose log-sum-exp has none (the CPU's). A hook that takes the
    passes shows observers the probabilities itself (:func:`pos_swap.attention.notify_blocks`)."""
    if not _inference_or_no_dropout(module, softcap, dropout):
        return None
    kernel = lse_kernel(query.device)
    if kernel is not None and not kernel.differentiable and wants_grad(query, *parameters):
        return None
    return kernel


def blocks_apply(module, query: torch.Tensor, softcap=None, *parameters: torch.Tensor) -> bool:
    """Whether CoPE's cache-sized blocks (:func:`cope_attention`, no kernel) may replace the chunked path: CPU
    inference (they work in place, without gradients) with sdpa routing, no softcap, and :data:`SETTING` not
    ``chunked``. On a GPU, blocks sized for a CPU's cache would be thousands of tiny launches: chunked it is."""
    return (
        query.device.type == "cpu" and setting() != "chunked" and _inference_or_no_dropout(module, softcap, 0.0)
        and not module.training and not wants_grad(query, *parameters)
    )  # fmt: skip


def folded_attend_for(module, query: torch.Tensor, softcap=None, *parameters: torch.Tensor, dropout=0.0,
                      sinks: bool = False):  # fmt: skip
    """What ALiBi's folded features attend with (:func:`alibi_attention`'s ``attend``), or None for the chunked
    path: :func:`sdpa_output` off the CPU (and for :data:`SETTING` ``sdpa``), which needs no log-sum-exp and
    carries gradients, except for a module with learned ``sinks``, whose correction needs the log-sum-exp; else
    the passes' kernel (:func:`kernel_for`)."""
    choice = setting()
    if not sinks and (choice == "sdpa" or (choice == "auto" and query.device.type != "cpu")):
        return sdpa_output if _inference_or_no_dropout(module, softcap, dropout) else None
    kernel = kernel_for(module, query, softcap, *parameters, dropout=dropout)
    return None if kernel is None else kernel.folded


def merge_by_lse(parts):
    """One attention from passes over disjoint key sets: ``parts`` is a list of ``(output, lse)``; each output is
    weighted by its share exp(lse_i - lse) of the softmax normaliser. Rows a pass did not reach have lse -inf."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])  # (P, B, H, Lq)
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).nan_to_num(0.0)  # rows no pass reached: 0, not nan
    output = sum(out.to(w.dtype) * w[..., None] for (out, _), w in zip(parts, weights))  # in the lse's dtype
    return output.to(parts[0][0].dtype), total


def shifted_causal_attention(kernel: Kernel, query, key, value, scale: float, shift: int):
    """``(output, lse)`` of query row r seeing key slots c <= r + shift, in at most two passes of ``kernel``: the keys every
    row sees (c < shift, no mask) and the square block after them (top-left causal). Rows that see no key get a
    zero output and lse -inf. Needs ``shift + Lq <= Lk``."""
    batch, heads, rows, _ = query.shape
    if rows == 1 and shift >= 0:  # a decode step: one pass, no mask
        return kernel(query, key[:, :, : shift + 1], value[:, :, : shift + 1], scale)
    parts = []
    if shift > 0:
        parts.append(kernel(query, key[:, :, :shift], value[:, :, :shift], scale))
    blind = max(0, -shift)  # rows before the first key: only when shift < 0
    if blind < rows:
        keys = slice(shift + blind, shift + rows)
        out, lse = kernel(query[:, :, blind:], key[:, :, keys], value[:, :, keys], scale, causal=True)
        if blind:
            out = F.pad(out, (0, 0, blind, 0))
            lse = F.pad(lse, (blind, 0), value=float("-inf"))
        parts.append((out, lse))
    if not parts:
        return query.new_zeros(batch, heads, rows, value.shape[-1]), query.new_full((batch, heads, rows), float("-inf"))
    return merge_by_lse(parts)


def two_terms(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (float32 or float64) as ``hi + lo`` in ``dtype``: about twice the dtype's precision, so that bfloat16
    features still carry key distances in the thousands and slopes to float32 accuracy (lo is 0 when ``dtype``
    holds ``x`` exactly)."""
    hi = x.to(dtype)
    return hi, (x - hi.to(x.dtype)).to(dtype)


def _fold(x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``x (B, H, L, D)`` with ``features (B|1, H|1, L|1, F)`` appended along the head dimension."""
    return torch.cat([x, features.expand(*x.shape[:-1], features.shape[-1])], dim=-1)


def alibi_attention(attend, query, key, value, slopes, query_positions, key_positions, scale, *, first_query, mask,
                    sinks=None):  # fmt: skip
    """ALiBi, -slope·(i - j), causal, in one plain attention per block: ``(B, Lq, H, D)`` like the attention
    functions. ``attend(query, key, value, scale, shift, mask) -> (output, lse or None)`` is :func:`sdpa_output` or
    a kernel's :meth:`Kernel.folded`; learned per-head ``sinks (H,)`` (:func:`with_sinks`) need the lse.

    Per block of query rows around position c, the bias is slope·(j - c) plus a row constant the softmax drops:
    q gets slope/scale and k gets j - c as extra features (each split in two terms, :func:`two_terms`), so the
    bias stays small near the diagonal in any dtype. ``mask`` is transformers' attention mask (or None: causal,
    queries from key slot ``first_query``).
    """
    q_len, dim = query.shape[2:]
    exact = score_dtype(query.dtype)  # the dtype the bias is computed in before it is split
    slope_hi, slope_lo = two_terms(slopes.to(device=query.device, dtype=exact) / scale, query.dtype)
    query = _fold(query, torch.stack([slope_hi, slope_hi, slope_lo, slope_lo], -1)[None, :, None])
    value = F.pad(value, (0, 4))  # the kernel wants one head dim for q, k and v
    outputs = []
    for start in range(0, q_len, ALIBI_BLOCK):
        rows = slice(start, min(start + ALIBI_BLOCK, q_len))
        cols = slice(0, first_query + rows.stop)
        middle = (rows.start + rows.stop) // 2
        distance = (key_positions[:, cols] - query_positions[:, middle : middle + 1]).to(exact)  # (B, W)
        d_hi, d_lo = two_terms(distance, query.dtype)
        block_key = _fold(key[:, :, cols], torch.stack([d_hi, d_lo, d_hi, d_lo], -1)[:, None])
        block_query, block_value = query[:, :, rows], value[:, :, cols]
        block_mask = None
        if mask is not None:
            block_mask = additive_mask(mask, None, rows, cols, first_query, query.device)
            block_mask = block_mask.to(query.dtype).clamp(min=torch.finfo(query.dtype).min)
        out, lse = attend(block_query, block_key, block_value, scale, first_query + rows.start, block_mask)
        if sinks is not None:  # the true scores' lse: the fold dropped the row constant -slope·(i - c)
            dropped = (query_positions[:, rows] - query_positions[:, middle : middle + 1]).to(exact)  # (B, C)
            out = with_sinks(out, lse - slopes.to(lse)[:, None] * dropped[:, None], sinks)
        outputs.append(out)
    return torch.cat(outputs, dim=2)[..., :dim].transpose(1, 2).contiguous()


def band_attention(kernel: Kernel, query, key, value, scale: float, first_query: int, window: int):
    """``(output, lse)`` of query row r (key slot first_query + r) attending to the ``window`` key slots up to its
    own, in blocks of :data:`BAND_BLOCK` rows, each one pass of ``kernel`` with a small band mask."""
    q_len = query.shape[2]
    outputs, lses = [], []
    for start in range(0, q_len, BAND_BLOCK):
        stop = min(start + BAND_BLOCK, q_len)
        slots = torch.arange(first_query + start, first_query + stop, device=query.device)[:, None]  # (C, 1)
        first_key = max(0, first_query + start - window + 1)
        keys = torch.arange(first_key, first_query + stop, device=query.device)[None]  # (1, W)
        inside = (keys <= slots) & (keys > slots - window)
        band = torch.zeros(inside.shape, dtype=query.dtype, device=query.device)
        band = band.masked_fill(~inside, torch.finfo(query.dtype).min)[None, None]
        cols = slice(first_key, first_query + stop)
        out, lse = kernel(query[:, :, start:stop], key[:, :, cols], value[:, :, cols], scale, mask=band)
        outputs.append(out)
        lses.append(lse)
    return torch.cat(outputs, dim=2), torch.cat(lses, dim=2)


def windowed_attention(kernel: Kernel, near, far, value, scale: float, first_query: int, window: int, sinks=None):
    """Causal attention ``(B, Lq, H, D)`` in which keys closer than ``window`` slots score with ``near = (query,
    key)`` and farther keys with ``far = (query, key)`` (each rotated at its own positions), in fused passes
    merged by log-sum-exp; no padding mask. Self-Extend's far pair uses grouped positions; ReRoPE's would be the
    query at position ``window`` and the unrotated key (leaky ReRoPE: positions i/k + W - W/k and j/k). ``sinks``:
    learned per-head sink logits ``(H,)`` (:func:`with_sinks`) or None."""
    neighbours = band_attention(kernel, *near, value, scale, first_query, window)
    distant = shifted_causal_attention(kernel, *far, value, scale, first_query - window)
    return with_sinks(*merge_by_lse([neighbours, distant]), sinks).transpose(1, 2).contiguous()


def sink_attention(kernel: Kernel, near_query, far_query, key, value, scale: float, first_query: int, sink_tokens: int,
                   window: int, sinks=None):  # fmt: skip
    """Attention sinks ``(B, Lq, H, D)``, causal, no padding: query row r (key slot s = first_query + r) sees the
    ``window + 1`` slots up to its own with ``near_query`` and the first ``sink_tokens`` slots before those with
    ``far_query`` (rotated at its place in the cache), in two fused passes merged by log-sum-exp. ``sinks``: learned
    per-head sink logits ``(H,)`` (:func:`with_sinks`, not the sink tokens) or None."""
    neighbours = band_attention(kernel, near_query, key, value, scale, first_query, window + 1)
    sink_tokens = min(sink_tokens, key.shape[2])
    if sink_tokens == 0:
        return with_sinks(*neighbours, sinks).transpose(1, 2).contiguous()
    slots = torch.arange(first_query, first_query + near_query.shape[2], device=near_query.device)[:, None]  # (Lq, 1)
    seen = torch.arange(sink_tokens, device=key.device)[None] < slots - window  # (Lq, S): sinks beyond the band
    mask = torch.zeros(seen.shape, dtype=far_query.dtype, device=key.device)
    mask = mask.masked_fill(~seen, torch.finfo(far_query.dtype).min)[None, None]
    out, lse = kernel(far_query, key[:, :, :sink_tokens], value[:, :, :sink_tokens], scale, mask=mask)
    merged = merge_by_lse([neighbours, (out, lse.masked_fill(~seen.any(-1), float("-inf")))])
    return with_sinks(*merged, sinks).transpose(1, 2).contiguous()


def dual_chunk_attention(kernel: Kernel, intra, successive, inter, key, value, scale: float, first_query: int,
                         first_position: int, length: int, sinks=None):  # fmt: skip
    """Dual Chunk Attention ``(B, Lq, H, D)``, causal, no padding mask. Query row r (key slot first_query + r, at
    position first_position + r; every slot c at c + first_position - first_query) sees the keys of its own chunk of
    ``length`` positions with the ``intra`` query (causal), the chunk before with ``successive`` and older chunks
    with ``inter``: per chunk of queries at most three fused passes, merged by log-sum-exp. ``key`` is rotated at
    each key's place in its chunk. ``sinks``: learned per-head sink logits ``(H,)`` (:func:`with_sinks`) or None."""
    q_len = intra.shape[2]
    offset = first_position - first_query
    outputs = []
    for chunk in range(first_position // length, (first_position + q_len - 1) // length + 1):
        start = chunk * length  # the chunk's first position
        rows = slice(max(start - first_position, 0), min(start + length - first_position, q_len))
        own, previous = (max(0, position - offset) for position in (start, start - length))  # their first key slots
        keys = slice(own, first_query + rows.stop)
        shift = first_query + rows.start - own
        parts = [shifted_causal_attention(kernel, intra[:, :, rows], key[:, :, keys], value[:, :, keys], scale, shift)]
        for query, cols in ((successive, slice(previous, own)), (inter, slice(0, previous))):
            if cols.start < cols.stop:
                parts.append(kernel(query[:, :, rows], key[:, :, cols], value[:, :, cols], scale))
        outputs.append(with_sinks(*merge_by_lse(parts), sinks))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def cope_attention(query, key, value, table, scale: float, first_query: int, sinks=None):
    """CoPE attention ``(B, Lq, H, D)``, causal, no padding mask, equal to
    :func:`pos_swap.functional.cope.logits` followed by a softmax. Query row r sits at key slot first_query + r;
    ``key``/``value`` may have fewer heads (grouped queries share consecutive heads), ``table`` is ``(npos, D)``.

    Keys are read newest first, so a row's contextual positions are a plain cumulative sum of its gates and grow
    along the columns; once every row of a block reaches npos - 1, the older keys all take the table's last logit
    and their gates are never computed. Blocks of rows are sized to ``COPE_BLOCK_BYTES``. ``sinks``: learned per-head
    sink logits ``(H,)`` (one more softmax column, :func:`softmax_with_sinks`) or None."""
    batch, heads, q_len, dim = query.shape
    kv_heads, last = key.shape[1], table.shape[0] - 1
    group = heads // kv_heads
    newest_first = key[:, :, : first_query + q_len].flip(2), value[:, :, : first_query + q_len].flip(2)
    exact = score_dtype(query.dtype)
    per_integer = (query.to(exact) @ table.to(exact).T) * scale  # (B, H, Lq, npos): q . E[n]
    step = F.pad(per_integer.diff(dim=-1), (0, 1))  # (B, H, Lq, npos): E[n + 1] - E[n], 0 past the end
    rows_per_pass = rows_per_block(COPE_BLOCK_BYTES, batch, heads, first_query + q_len)
    outputs = []
    for start in range(0, q_len, rows_per_pass):
        rows = slice(start, min(start + rows_per_pass, q_len))
        count, newest = rows.stop - rows.start, first_query + rows.stop - 1  # rows, the block's last key slot
        keys, values = (x[:, :, x.shape[2] - newest - 1 :] for x in newest_first)  # column c: key slot newest - c
        grouped = query[:, :, rows].reshape(batch, kv_heads, group * count, dim)
        scores = (grouped @ keys.transpose(-1, -2)).to(exact).mul_(scale).view(batch, heads, count, -1)  # (B, H, C, W)
        slots = torch.arange(first_query + rows.start, newest + 1, device=query.device)[:, None]  # (C, 1)
        later = newest - torch.arange(count, device=query.device) > slots  # (C, C): the keys a row may not see
        _add_positions(scores, later, per_integer[:, :, rows], step[:, :, rows], last)
        scores[..., :count].masked_fill_(later, float("-inf"))
        probs = softmax_with_sinks(scores, sinks).to(value.dtype).view(batch, kv_heads, group * count, -1)
        outputs.append((probs @ values).view(batch, heads, count, -1))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def _add_positions(scores, later, per_integer, step, last: int):
    """Add CoPE's interpolated position logits to ``scores (B, H, C, W)`` in place, counting gates over
    ``COPE_COLUMNS`` columns at a time; ``later (C, C)`` hides the first columns' keys from the rows before them."""
    visible = (~later).to(scores.dtype)  # (C, C): 0 for a later key
    carry = scores.new_zeros(*scores.shape[:-1], 1)
    for start in range(0, scores.shape[-1], COPE_COLUMNS):
        block = scores[..., start : start + COPE_COLUMNS]
        positions = torch.sigmoid(block)  # the gates
        seen = visible[:, start : start + COPE_COLUMNS]  # empty past the first C columns
        positions[..., : seen.shape[1]].mul_(seen)
        positions = torch.cumsum(positions, dim=-1).add_(carry)
        carry = positions[..., -1:].clone()  # positions is clamped and overwritten below
        saturated = bool((carry >= last).all())  # positions only grow: every older key sits at the table's end
        _interpolate_into(block, positions.clamp_(max=last), per_integer, step)
        if saturated:
            scores[..., start + block.shape[-1] :].add_(per_integer[..., last:])
            return


def _interpolate_into(scores, positions, per_integer, step):
    """``scores += per_integer[floor p] + frac(p) * step[floor p]`` at non-negative positions ``p``."""
    index = torch.empty(positions.shape, dtype=torch.long, device=positions.device).copy_(positions)  # floor
    scores.add_(per_integer.gather(-1, index)).addcmul_(positions.frac_(), step.gather(-1, index))
