"""Statistics of the attention a model really computes, per layer and head, recorded through ``pos_swap.observe``.

    with attention_stats(model) as stats:
        model(ids)
    result = stats.result()     # {"sink_mass": [layers, heads], "distance_profile": [layers, heads, bins], ...}

The observer sees the probabilities of each block of query rows (float32) as pos_swap's attention path computes
them, under the model's patch and backend, and reduces each block at once: memory O(L x heads x bins), never L^2.
Every statistic is a mean over query rows; on inputs longer than ``query_rows`` (default 256) it is taken over an
evenly spaced sample of that many rows per call (first and last included), which keeps a probed forward close to a
plain one in time at any length. ``query_rows=None`` uses every row.

* ``distance_profile``: mean attention mass per query row in log-spaced bins of the relative offset i - j
  (bin 0: the token itself; bin b: offsets 2^(b-1) .. 2^b - 1; negative bins: future keys, encoders only).
* ``mean_distance``: mean over query rows of sum_j p_ij |i - j|; ``entropy``: mean of -sum_j p_ij ln p_ij (nats).
* ``sink_mass``: mean attention on the first key (Gu et al. 2024's alpha_1); ``sink_heads`` marks heads above
  ``sink_threshold`` (their epsilon = 0.3) and ``sink_rate`` is the share of such heads.
* ``previous_token``: mean attention on the key just before the query (TransformerLens' previous-token detector:
  attention on the pattern over all attention, rows with no previous key counting 0).
* ``query_frequency_norms`` / ``key_frequency_norms`` (rotary models): mean norm of q and k in each rotary plane,
  [layers, heads, rotary_dim / 2], highest frequency first (Barbero et al. 2024).
* ``patterns`` (``keep_patterns=True``, short inputs only): the full probabilities of the last call per layer.

The profile, sink and previous-token score come from one running sum over keys per block and are always recorded;
``statistics`` selects which of the others (``mean_distance``, ``entropy``, ``frequency_norms``) to compute.
"""

import contextlib

import torch

from .. import archs, engine
from ..errors import PosSwapError

STATISTICS = ("distance_profile", "mean_distance", "entropy", "sink_mass", "previous_token", "frequency_norms")
MAX_BIN = 24  # offsets up to 2^24 - 1 tokens
MAX_PATTERN_KEYS = 4096  # keep_patterns stores B x H x L x L floats per layer: short inputs only


def bin_edges(low: int, high: int) -> list[tuple[int, int]]:
    """Inclusive offset ranges ``(first, last)`` of the signed bins ``low .. high``."""
    def edge(b):
        first, last = (0, 0) if b == 0 else (2 ** (abs(b) - 1), 2 ** abs(b) - 1)
        return (first, last) if b >= 0 else (-last, -first)

    return [edge(b) for b in range(low, high + 1)]


BIN_EDGES = torch.tensor(bin_edges(-MAX_BIN, MAX_BIN))  # (bins, 2): first and last offset of every signed bin


class AttentionStats:
    """The observer: accumulates each statistic per layer and head over every forward inside the block."""

    def __init__(
        self, model, statistics=None, keep_patterns: bool = False, sink_threshold: float = 0.3, query_rows: int | None = 256
    ):  # fmt: skip
        if query_rows is not None and (isinstance(query_rows, bool) or not isinstance(query_rows, int) or query_rows < 1):
            raise PosSwapError(f"query_rows must be a positive number of rows or None (every row), not {query_rows!r}.")
        self.query_rows = None if keep_patterns else query_rows  # read by pos_swap's attention path
        unknown = sorted(set(statistics or ()) - set(STATISTICS))
        if unknown:
            raise PosSwapError(f"Unknown attention statistic(s) {', '.join(unknown)}; choose from {', '.join(STATISTICS)}.")
        self.statistics = set(statistics or STATISTICS)
        modules = archs.attention_modules(model)
        self.layers = {module: index for index, module in enumerate(modules)}
        self.causal = archs.is_causal(model)  # queries never see later keys: no |i - j| correction needed
        heads = model.config.num_attention_heads
        slots = archs.rotary_slots(model)
        self.rotary_dim = slots[0].dim if slots and "frequency_norms" in self.statistics else 0
        self.keep_patterns, self.sink_threshold = keep_patterns, sink_threshold
        zeros = lambda *shape: torch.zeros(len(modules), *shape, dtype=torch.float64)  # noqa: E731
        self.rows = zeros()  # query rows seen (batch x length) per layer
        self.histogram = zeros(heads, 2 * MAX_BIN + 1)  # mass per signed bin, bin 0 at index MAX_BIN
        self.distance, self.entropy, self.sink = zeros(heads), zeros(heads), zeros(heads)
        self.tokens = zeros(2)  # query and key vectors seen (for the frequency norms)
        self.plane_norms = zeros(2, heads, self.rotary_dim // 2)  # summed plane norms of queries and keys
        self.patterns: dict[int, torch.Tensor] = {}

    # -- the observer protocol of pos_swap.observe ----------------------------------------------------------------
    def queries_keys(self, module, query: torch.Tensor, key: torch.Tensor) -> None:
        layer = self.layers[module]
        if self.keep_patterns:
            batch, heads, q_len, _ = query.shape
            if key.shape[2] > MAX_PATTERN_KEYS:
                raise PosSwapError(
                    f"keep_patterns stores full L x L attention; {key.shape[2]} keys is more than {MAX_PATTERN_KEYS}. "
                    f"Use a shorter input or keep_patterns=False (the statistics need no full pattern)."
                )
            self.patterns[layer] = torch.zeros(batch, heads, q_len, key.shape[2])
        if not self.rotary_dim:
            return
        for which, x in enumerate((query, key)):
            norms = plane_norms(x, self.rotary_dim).sum(dim=(0, 2))  # (H or Hkv, F)
            self.plane_norms[layer, which] += norms.repeat_interleave(query.shape[1] // x.shape[1], dim=0).double()
            self.tokens[layer, which] += x.shape[0] * x.shape[2]

    def probabilities(self, module, probs: torch.Tensor, rows: torch.Tensor, cols: slice, shape: tuple[int, int]) -> None:
        layer = self.layers[module]
        q_len, k_len = shape
        width = cols.stop  # blocks always start at key 0
        query_at = rows + (k_len - q_len)  # (C,) key index of each query row
        mass = probs[0] if probs.shape[0] == 1 else probs.sum(dim=0)  # (H, C, W), summed over the batch
        heads = mass.shape[0]
        self.rows[layer] += probs.shape[0] * probs.shape[2]
        # mass per offset bin from a running sum over keys: bin [first, last] holds keys q - last .. q - first
        running = mass.cumsum(dim=-1)  # (H, C, W): mass on keys 0 .. j

        def mass_before(key):  # (H, C, bins): mass on keys 0 .. key - 1
            return torch.where(key > 0, running.gather(2, (key - 1).clamp(min=0)), 0.0)

        edges = BIN_EDGES.to(probs.device)
        start = (query_at[:, None] - edges[:, 1]).clamp(0, width).expand(heads, -1, -1)  # (H, C, bins)
        stop = (query_at[:, None] - edges[:, 0] + 1).clamp(0, width).expand(heads, -1, -1)
        self.histogram[layer] += (mass_before(stop) - mass_before(start)).sum(dim=1).double()
        self.sink[layer] += mass[:, :, 0].sum(dim=1).double()
        if "mean_distance" in self.statistics:  # |i - j| = (i - j) + 2 max(j - i, 0): a product with j, and a
            keys = torch.arange(width, device=probs.device, dtype=mass.dtype)  # correction where keys follow i
            distance = (running[:, :, -1] * query_at - mass @ keys).sum(dim=1)  # (H,)
            if not self.causal:
                distance += 2 * torch.einsum("hcw,cw->h", mass, (keys[None] - query_at[:, None]).clamp(min=0))
            self.distance[layer] += distance.double()
        if "entropy" in self.statistics:  # -sum p ln p; masked keys (p = 0) add 0
            self.entropy[layer] -= (probs * probs.clamp(min=torch.finfo(probs.dtype).tiny).log()).sum(dim=(0, 2, 3)).double()
        if self.keep_patterns:
            self.patterns[layer][:, :, rows.cpu(), cols] = probs.detach().cpu()

    # -- the results ----------------------------------------------------------------------------------------------
    def result(self) -> dict:
        """Every statistic as numpy arrays ``[layers, heads, ...]`` (means over all query rows seen)."""
        if not self.rows.min() > 0:
            raise PosSwapError("No attention was recorded: run the model inside `with attention_stats(model) as stats:`.")
        rows = self.rows.view(-1, 1)
        out = {"layers": len(self.layers), "query_rows": self.rows.numpy()}
        profile = self.histogram / rows[..., None]  # (layers, H, bins)
        used = profile.sum(dim=(0, 1)).nonzero()[:, 0]  # bins some key fell in (masked keys carry exactly 0)
        low, high = int(used.min()), int(used.max())
        out["distance_bins"] = bin_edges(low - MAX_BIN, high - MAX_BIN)
        out["distance_profile"] = profile[:, :, low : high + 1].numpy()
        out["previous_token"] = profile[:, :, MAX_BIN + 1].numpy()  # bin +1 holds offset 1 exactly
        out["sink_mass"] = (self.sink / rows).numpy()
        out["sink_heads"] = out["sink_mass"] > self.sink_threshold
        out["sink_rate"] = float(out["sink_heads"].mean())
        for name, total in (("mean_distance", self.distance), ("entropy", self.entropy)):
            if name in self.statistics:
                out[name] = (total / rows).numpy()
        if self.rotary_dim:
            means = self.plane_norms / self.tokens[..., None, None]
            out["query_frequency_norms"], out["key_frequency_norms"] = means[:, 0].numpy(), means[:, 1].numpy()
        if self.keep_patterns:
            out["patterns"] = [self.patterns[layer].numpy() for layer in sorted(self.patterns)]
        return out


def plane_norms(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Norm of ``x (B, H, L, D)`` in each rotary plane (feature f paired with f + R/2, as rotate_half pairs them):
    ``(B, H, L, R/2)`` in float32."""
    half = rotary_dim // 2
    x = x[..., :rotary_dim].float()
    return torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)


@contextlib.contextmanager
def attention_stats(
    model, statistics=None, keep_patterns: bool = False, sink_threshold: float = 0.3, query_rows: int | None = 256
):  # fmt: skip
    """``with attention_stats(model) as stats: model(ids)``, then ``stats.result()``; see the module docstring."""
    stats = AttentionStats(model, statistics, keep_patterns, sink_threshold, query_rows)
    with engine.observe(model, stats):
        yield stats
