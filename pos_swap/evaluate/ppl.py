"""Perplexity against context length, without ever holding an L x vocab tensor.

The model runs to its last hidden states; the language-model head and the loss then run over chunks of
positions, so a 32k window over a 49k vocabulary costs a chunk of logits (32 MiB: 170 positions x 49k), not 6 GB.
"""

import math

import torch
from tqdm.auto import tqdm

from ..archs import CACHE_ARGUMENT
from ..errors import PosSwapError

TAIL = 0.25  # the share of a window at its end whose tokens need the long context


LOGITS_MIB = 32  # float32 logits held at once: 170 positions of a 49k vocabulary


def token_losses(model, ids: torch.Tensor, chunk: int | None = None, cache=None) -> torch.Tensor:
    """Negative log-likelihood (float32, shape ``(L - 1,)``) of each token of ``ids (1, L)`` given the tokens
    before it, in one forward pass of the whole window; the head runs over ``chunk`` positions at a time
    (default: as many as fit in LOGITS_MIB of float32 logits). A ``cache`` (a transformers ``Cache``) keeps the
    window's keys and values, to continue from it."""
    head = _head(model)
    ids = ids.to(head.weight.device)
    kept = {"use_cache": False} if cache is None else {"use_cache": True, CACHE_ARGUMENT: cache}
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, **kept).last_hidden_state[0, :-1]  # (L - 1, hidden)
        return _losses(model, hidden, ids[0, 1:], chunk)


def stream_losses(model, ids: torch.Tensor, cache, *, step: int = 512, progress: bool = True):
    """Negative log-likelihood ``(L - 1,)`` of each token of ``ids (1, L)``, fed ``step`` tokens at a time through
    ``cache`` (a transformers ``Cache``: a ``DynamicCache`` grows with the stream, a bounded one such as
    ``pos_swap.schemes.sinks.SinkCache`` does not), and the keys the cache's first layer holds after each step."""
    head = _head(model)
    ids = ids.to(head.weight.device)
    losses, held = [], []
    with torch.no_grad():
        for start in tqdm(range(0, ids.shape[1] - 1, step), desc="stream", disable=not progress, leave=False):
            piece = ids[:, start : start + step]
            hidden = model.base_model(input_ids=piece, use_cache=True, **{CACHE_ARGUMENT: cache}).last_hidden_state
            targets = ids[0, start + 1 : start + 1 + piece.shape[1]]
            losses.append(_losses(model, hidden[0, : targets.numel()], targets))
            held.append(cache.layers[0].keys.shape[-2])
    return torch.cat(losses), held


def _head(model):
    head = model.get_output_embeddings()
    if head is None:
        raise PosSwapError(
            f"{type(model).__name__} has no language-model head, so it has no perplexity. Load the model with "
            f"AutoModelForCausalLM (encoders such as BERT: use the probing tools instead)."
        )
    return head


def _losses(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The loss of each of ``targets (N,)`` from the final hidden states ``(N, hidden)``, the head run over
    ``chunk`` positions at a time."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    chunk = chunk or max(16, LOGITS_MIB * 2**20 // (4 * head.weight.shape[0]))
    losses = []
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()  # (chunk, vocab)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        losses.append(torch.nn.functional.cross_entropy(logits, targets[start : start + chunk], reduction="none"))
    return torch.cat(losses).cpu()


def window_perplexity(losses: torch.Tensor, tail: float = TAIL) -> dict:
    """Whole-window perplexity and that of the window's last ``tail`` share of tokens (the long-context part)."""
    count = losses.numel() + 1
    first_tail = int(count * (1 - tail)) - 1  # losses[i] is the loss of token i + 1
    return {
        "ppl": math.exp(losses.double().mean().item()),
        "ppl_tail": math.exp(losses[first_tail:].double().mean().item()),
        "tokens": count,
        "tail_tokens": losses.numel() - first_tail,
    }


def windows(tokens: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """Up to ``count`` non-overlapping windows of ``length`` tokens from the start of ``tokens (N,)``."""
    available = tokens.numel() // length
    if available == 0:
        raise PosSwapError(
            f"The text holds {tokens.numel()} tokens, fewer than one {length}-token window. Pass a longer text "
            f"(--text FILE, or text= in Python) or a shorter length."
        )
    return [tokens[i * length : (i + 1) * length][None] for i in range(min(count, available))]


def forwards(cells, one_forward: bool) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """The forwards that give the losses of every window ``(length, index)`` (window ``index`` of ``length``
    starts at ``index * length``), as ``(start, tokens, windows)``. With ``one_forward`` the windows sharing a
    start share one forward at the longest of them (their losses are its first ``length - 1``: right for a
    causal-consistent model only); otherwise each window has its own."""
    if not one_forward:
        return [(index * length, length, [(length, index)]) for length, index in cells]
    groups: dict[int, list[tuple[int, int]]] = {}
    for length, index in cells:
        groups.setdefault(index * length, []).append((length, index))
    return [(start, max(length for length, _ in group), group) for start, group in groups.items()]


def bucket_losses(losses: torch.Tensor, bucket: int) -> list[float]:
    """Mean loss of the tokens at positions [0, B), [B, 2B), ... of a window (``losses[i]`` is token i + 1's;
    token 0 has none, so the first bucket averages B - 1)."""
    by_position = torch.cat([torch.full((1,), math.nan), losses.double().cpu()])
    return [by_position[start : start + bucket].nanmean().item() for start in range(0, by_position.numel(), bucket)]


def bucket_size(longest: int) -> int:
    """Tokens per bucket of a perplexity-by-position curve: 512 up to 16k windows, 1024 beyond, and 1/8 of a short
    window (a power of two) below 4k."""
    if longest > 16384:
        return 1024
    return 512 if longest >= 4096 else max(1, 2 ** int(math.log2(max(longest // 8, 1))))


def perplexity(model, tokens: torch.Tensor, lengths, *, windows_per_length: int = 1, tail: float = TAIL,
               chunk: int | None = None, one_forward: bool | None = None, progress: bool = True) -> list[dict]:  # fmt: skip
    """Perplexity of ``model`` on windows of each length cut from ``tokens`` (a 1-D tensor, or ``(1, N)``).

    Returns one dict per window: ``length``, ``window`` (its index), ``ppl``, ``ppl_tail`` (last ``tail`` share of
    the window), ``tokens``, ``tail_tokens``, ``forward`` (the tokens of the forward it was read from).
    :func:`summarize` gives mean and spread per length. ``one_forward`` (default: when
    :func:`pos_swap.engine.causal_consistent` says the patched model allows it) reads windows sharing a start from
    one forward at the longest of them.
    """
    from ..engine import causal_consistent

    tokens = tokens.reshape(-1)
    one_forward = causal_consistent(model) if one_forward is None else one_forward
    cells = [(length, index) for length in lengths for index in range(len(windows(tokens, length, windows_per_length)))]
    rows = []
    for start, longest, group in tqdm(forwards(cells, one_forward), desc="perplexity", disable=not progress, leave=False):
        losses = token_losses(model, tokens[start : start + longest][None], chunk)
        rows += [{"length": length, "window": index, "forward": longest,
                  **window_perplexity(losses[: length - 1], tail)} for length, index in group]  # fmt: skip
    return sorted(rows, key=lambda row: (row["length"], row["window"]))


def summarize(rows: list[dict], keys=("ppl", "ppl_tail")) -> dict:
    """Mean and standard deviation (over windows) of each of ``keys``: ``{"ppl": ..., "ppl_std": ..., ...}``."""
    summary = {"windows": len(rows)}
    for key in keys:
        values = torch.tensor([row[key] for row in rows], dtype=torch.float64)
        summary[key] = values.mean().item()
        summary[f"{key}_std"] = values.std().item() if len(rows) > 1 else 0.0
    return summary


def available_memory() -> int:
    """Bytes of memory a new allocation can still get: free pages plus the page cache the system can reclaim
    (psutil's ``available``, Linux's MemAvailable). Free pages alone undercount it and refuse runs that fit."""
    import psutil  # a dependency of accelerate

    return psutil.virtual_memory().available


def estimate_memory(config, length: int, dtype_bytes: int = 4) -> int:
    """Rough peak bytes of a perplexity forward at ``length`` tokens: weights, a layer's activations (hidden,
    q/k/v, MLP), the KV of every layer when cached, and a chunk of logits. Eager attention adds its L x L scores."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 768)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 12)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 12)
    vocab = getattr(config, "vocab_size", 32000)
    weights = (layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden) * dtype_bytes
    activations = length * (8 * hidden + 3 * inter) * dtype_bytes
    scores = heads * length * length * 4 if getattr(config, "_attn_implementation", None) == "eager" else 0
    logits = LOGITS_MIB * 2**20 * 3
    return weights + activations + scores + logits


def check_fits(config, length: int, dtype_bytes: int = 4) -> None:
    """Fail before loading when a ``length``-token forward cannot fit in this machine's free memory."""
    need, have = estimate_memory(config, length, dtype_bytes), available_memory()
    if need > have:
        raise PosSwapError(
            f"A {length}-token forward needs about {need / 2**30:.1f} GiB, but about {have / 2**30:.1f} GiB is free. "
            f"Use shorter lengths, a GPU (--device cuda) or half precision (--dtype bfloat16)."
        )
