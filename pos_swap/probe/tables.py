"""Position tables and what they encode: the table a model adds to its tokens (learned, or computed by a scheme) and
Wang & Chen's probes of it, plus the views of the classic figures (similarity, PCA, spectrum along positions)."""

import torch

from .. import archs
from ..attention import HOOK, DeferredRotation
from ..errors import PosSwapError
from ..functional import rope, sinusoid
from .regression import absolute_position_probe, relative_order_probe


def model_table(model, length: int | None = None) -> torch.Tensor:
    """The rows ``(length, D)`` the model's learned table gives positions 0 .. length - 1 (default: every trained
    row; offset rows such as OPT's two are skipped), as the model computes them now: a patch that replaced the
    table (sinusoidal, learned-interpolate; zeros for alibi, rope, nope) gives its own rows."""
    spec = archs.lookup(model)
    if spec.family != archs.LEARNED:
        raise PosSwapError(
            f"This '{model.config.model_type}' model has {spec.family} positions, not a learned table. Probe its "
            f"cos/sin table with rope_table(model, length), or the hidden states with hidden_state_probe(...)."
        )
    rows = archs.table_rows(model)
    length = length or len(rows)
    table = archs.position_table(model)
    if "forward" in vars(table):  # a patch replaced the table's forward; ask it for the rows
        with torch.no_grad():
            return table(torch.arange(length, device=rows.device)[None])[0].detach().float().cpu()
    return rows[:length].detach().float().cpu()


def rope_table(model, length: int) -> torch.Tensor:
    """``[cos | sin]`` of every rotary frequency at positions 0 .. length - 1, ``(length, rotary_dim)``, as the
    model rotates now: its own frequencies, a static RoPE-scaling patch's, or those a length-following patch
    (dynamic, dynamic-yarn, longrope) uses at ``length`` tokens; times the attention scaling."""
    slots = archs.rotary_slots(model)
    if not slots:
        raise PosSwapError(
            f"This '{model.config.model_type}' model has no rotary positions; probe its table with model_table(model)."
        )
    hook = archs.attention_modules(model, slots[0].layer_type)[0]._modules.get(HOOK)
    if isinstance(hook, DeferredRotation):
        inv_freq, scaling = hook.frequencies(torch.tensor([length]))
    else:
        inv_freq, scaling = slots[0].inv_freq.float().cpu(), slots[0].attention_scaling
    cos, sin = rope.cos_sin(torch.arange(length)[None], inv_freq.cpu(), scaling, torch.float32)  # (1, L, 2F)
    half = cos.shape[-1] // 2
    return torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1)


def sinusoid_table(length: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The original Transformer's table ``(length, dim)`` (the ``sinusoidal`` scheme's rows before RMS matching)."""
    return sinusoid.table(torch.arange(length), dim, base)


def embedding_probes(table: torch.Tensor, folds: int = 5, seeds: int = 5, pairs: int = 4096) -> dict:
    """Wang & Chen's two probes of a table ``(positions, D)``: ``absolute_mae`` (linear regression row -> index,
    k-fold, MAE of the rounded prediction) and ``relative_error`` (logistic regression on concatenated pairs), each
    with its std and per-seed values over ``seeds``."""
    if table.dim() != 2:
        raise PosSwapError(f"A position table is 2-D (positions, dimensions); got shape {tuple(table.shape)}.")
    positions = torch.arange(len(table))
    return {
        "positions": len(table),
        "dimensions": table.shape[1],
        **absolute_position_probe(table, positions, folds, seeds),
        **relative_order_probe(table, pairs, folds, seeds),
    }


def cosine_similarity(table: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(N, N)`` between the rows."""
    unit = torch.nn.functional.normalize(table.double(), dim=1)
    return unit @ unit.T


def pca(table: torch.Tensor, components: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows in their top principal components ``(N, k)`` and each component's share of the variance ``(k,)``."""
    centred = table.double() - table.double().mean(dim=0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    variance = s**2
    return u[:, :components] * s[:components], variance[:components] / variance.sum()


def spectrum(table: torch.Tensor) -> torch.Tensor:
    """Power along positions: |rFFT|^2 of each centred dimension over the rows, averaged over dimensions and
    normalised to sum 1, ``(N // 2 + 1,)`` from frequency 0 (cycles per N positions)."""
    centred = table.double() - table.double().mean(dim=0)
    power = torch.fft.rfft(centred, dim=0).abs().pow(2).mean(dim=1)
    return power / power.sum().clamp(min=1e-300)
