"""Rotary position embedding (RoPE) math: inverse frequencies for every scaling rule, and the rotation.

Every rule returns ``(inv_freq, attention_scaling)``, the same pair as transformers' ``ROPE_INIT_FUNCTIONS``:
``inv_freq`` has ``dim // 2`` float32 entries and ``attention_scaling`` multiplies cos and sin (so the logits by
its square). The computations follow transformers' float32 order on purpose: a patched model must give the same
logits as the same weights loaded with the equivalent ``rope_parameters``.
"""

import math

import torch


def default_inv_freq(dim: int, base: float, device=None) -> torch.Tensor:
    """theta_i = base^(-2i/dim) for i < dim/2 (Su et al. 2021)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponents)


def linear(dim: int, base: float, factor: float, device=None) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al. 2023): positions divided by ``factor``, i.e. theta_i / factor."""
    return default_inv_freq(dim, base, device) / factor, 1.0


def ntk_base(base: float, factor: float, dim: int) -> float:
    """NTK-aware base change (bloc97): base * factor^(dim / (dim - 2)) stretches the lowest frequency by ``factor``
    while leaving the highest one almost untouched."""
    return base * factor ** (dim / (dim - 2))


def ntk(dim: int, base: float, factor: float, device=None) -> tuple[torch.Tensor, float]:
    """Static NTK-aware scaling: default frequencies with the base from :func:`ntk_base`."""
    return default_inv_freq(dim, ntk_base(base, factor, dim), device), 1.0


def dynamic_ntk(
    dim: int, base: float, factor: float, original_length: int, seq_len: int, device=None
) -> tuple[torch.Tensor, float]:
    """Dynamic NTK (emozilla): native frequencies up to ``original_length``; beyond it the base grows with the
    length as base * (factor * L / L0 - (factor - 1))^(dim / (dim - 2)), transformers' ``dynamic`` rule."""
    return dynamic_ntk_rows(dim, base, factor, original_length, torch.tensor([seq_len], device=device))[0][0], 1.0


def dynamic_ntk_rows(
    dim: int, base: float, factor: float, original_length: int, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dynamic_ntk` for a length per sequence ``(B,)``: ``(inv_freq (B, F), scaling (B,))``, in tensor
    operations only (torch.compile traces it without reading the lengths)."""
    lengths = lengths.double().clamp(min=original_length)
    grown = base * ((factor * lengths / original_length) - (factor - 1)) ** (dim / (dim - 2))  # (B,), float64
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=lengths.device).float() / dim
    inv_freq = 1.0 / (grown[:, None].float() ** exponents)
    return inv_freq, torch.ones(len(lengths), device=lengths.device)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_mscale_rows(factors: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """:func:`yarn_mscale` of a factor per sequence ``(B,)``, in tensor operations only."""
    return torch.where(factors > 1, 0.1 * mscale * factors.clamp(min=1).log() + 1.0, torch.ones_like(factors))


def yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_length: int, truncate: bool = True
) -> tuple[float, float]:
    """Dimension indices where a frequency makes ``beta_fast`` and ``beta_slow`` turns over ``original_length``:
    below ``low`` frequencies are kept (extrapolated), above ``high`` they are interpolated."""

    def dim_for(rotations: float) -> float:
        return (dim * math.log(original_length / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn(
    dim: int,
    base: float,
    factor: float,
    original_length: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    truncate: bool = True,
    device=None,
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): a linear ramp between interpolated (theta/s) and original frequencies over the
    correction range, plus the attention temperature of :func:`yarn_mscale`."""
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    factors = torch.tensor([factor], device=device)
    return yarn_rows(dim, base, factors, original_length, beta_fast, beta_slow, truncate)[0], float(attention_factor)


def yarn_rows(dim: int, base: float, factors: torch.Tensor, original_length: int, beta_fast: float = 32.0,
              beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:  # fmt: skip
    """:func:`yarn`'s frequencies ``(B, F)`` for a factor per sequence ``(B,)`` (the temperature is the caller's:
    :func:`yarn_mscale_rows`), in tensor operations only."""
    device = factors.device
    low, high = yarn_correction_range(beta_fast, beta_slow, dim, base, original_length, truncate)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    interpolated = 1.0 / (factors.float()[:, None] * pos_freqs)
    return interpolated * ramp + (1.0 / pos_freqs) * extrapolation_weight


def longrope_attention_factor(factor: float, original_length: int) -> float:
    """LongRoPE's default scaling sqrt(1 + ln(s) / ln(L0))."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original_length))


def longrope(
    dim: int, base: float, rescale: list[float], attention_factor: float, device=None
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Ding et al. 2024): one searched rescale factor per frequency, theta_i / lambda_i."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    rescale = torch.tensor(rescale, dtype=torch.float32, device=device)
    return 1.0 / (rescale * base**exponents), float(attention_factor)


def llama3(
    dim: int,
    base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_length: int,
    device=None,
) -> tuple[torch.Tensor, float]:
    """Llama 3.1 scaling: wavelengths above L0/low_freq_factor are divided by ``factor``, those below
    L0/high_freq_factor kept, and the band between blended smoothly."""
    inv_freq = default_inv_freq(dim, base, device)
    low_freq_wavelen = original_length / low_freq_factor
    high_freq_wavelen = original_length / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def p_rope_planes(planes: int, p: float) -> int:
    """How many of ``planes`` rotary planes keep rotating under p-RoPE: floor(p * planes), with transformers'
    float rounding for its ``proportional`` rope type (``int(p * head_dim // 2)``)."""
    return int(p * (2 * planes) // 2)


def p_rope(inv_freq: torch.Tensor, p: float) -> torch.Tensor:
    """p-RoPE (Barbero et al. 2024, "Round and round we go"): the :func:`p_rope_planes` highest of the
    frequencies ``inv_freq (F,)`` keep their value, the lowest others get 0, so those planes stop rotating and
    carry no position. p = 1 is RoPE, no plane left rotating is NoPE."""
    keep = p_rope_planes(len(inv_freq), p)
    rank = inv_freq.argsort(descending=True, stable=True).argsort()  # 0 for the highest frequency
    return torch.where(rank < keep, inv_freq, torch.zeros_like(inv_freq))


def cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: torch.Tensor | float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``(B, L, 2 * len(inv_freq))`` for ``positions (B, L)``, or one position per rotary plane
    ``(B, L, F)`` (DPE), and ``inv_freq`` of shape ``(F,)`` or one row per sequence ``(B, F)``; ``scaling`` is a
    number or one per sequence ``(B,)``."""
    if inv_freq.dim() == 1:
        inv_freq = inv_freq[None]
    per_plane = positions if positions.dim() == 3 else positions[..., None]  # (B, L, F) or (B, L, 1)
    freqs = per_plane.float() * inv_freq[:, None, :].float()  # (B, L, F)
    emb = torch.cat((freqs, freqs), dim=-1)
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.view(-1, 1, 1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


# How a model pairs its rotary features: pair i (frequency theta_i) of R rotated features is
HALF = "half"  # (i, i + R/2), turned by +theta: rotate-half (LLaMA, GPT-NeoX, Gemma), pos_swap's own rotation
INTERLEAVED = "interleaved"  # (2i, 2i + 1), turned by +theta (GPT-J, Cohere, GLM, Ernie 4.5, Helium)
HALF_SWAPPED = "half_swapped"  # (i + R/2, i), turned by +theta: rotate-half turned by -theta (NanoChat)
PAIRINGS = (HALF, INTERLEAVED, HALF_SWAPPED)


def to_half_pairs(x: torch.Tensor, rot_dim: int, pairing: str) -> torch.Tensor:
    """``x (..., D)`` with its first ``rot_dim`` features reordered from ``pairing`` into rotate-half pairs, so
    that :func:`rotate` turns each pair as the model does; the other features pass through. Queries and keys
    reordered alike keep every dot product, so attention needs no reordering back."""
    if pairing == HALF:
        return x
    half = rot_dim // 2
    if pairing == INTERLEAVED:
        paired = (x[..., 0:rot_dim:2], x[..., 1:rot_dim:2])  # features 0, 2, 4, ... then 1, 3, 5, ...
    elif pairing == HALF_SWAPPED:
        paired = (x[..., half:rot_dim], x[..., :half])
    else:
        raise ValueError(f"unknown rotary pairing {pairing!r}; one of {', '.join(PAIRINGS)}")
    return torch.cat((*paired, x[..., rot_dim:]), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dimension: the pairing LLaMA, GPT-NeoX and Gemma use."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """Rotate ``x (B, H, L, D)`` to ``positions (B, L)`` (or ``(B, L, F)``, one per rotary plane): :func:`rotate`
    with the tables of :func:`cos_sin`."""
    return rotate(x, *cos_sin(positions, inv_freq, scaling, x.dtype))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` features of ``x (B, H, L, D)`` with ``cos, sin (B, L, R)``; the
    remaining features (partial rotary) pass through."""
    rot_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    rotated = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


def rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` written into ``out`` (shaped like ``x``) without a temporary of x's size: for inference
    that reuses a buffer, where fresh pages for each call's keys cost more than the arithmetic. No gradient."""
    rot_dim, half = cos.shape[-1], cos.shape[-1] // 2
    cos, sin = cos[:, None], sin[:, None]
    torch.mul(x[..., :rot_dim], cos, out=out[..., :rot_dim])
    out[..., :half].addcmul_(x[..., half:rot_dim], sin[..., :half], value=-1)  # x1 cos - x2 sin
    out[..., half:rot_dim].addcmul_(x[..., :half], sin[..., half:])  # x2 cos + x1 sin
    out[..., rot_dim:] = x[..., rot_dim:]
    return out


def block_lengths(positions: torch.Tensor, block: int, trained_length: int) -> torch.Tensor:
    """The length whose frequencies a query at each position uses in per-position mode: its own length p + 1
    rounded up to a multiple of ``block`` (a function of p alone, so a prefill and a later decode step at the same
    position agree), but never past ``trained_length`` for a position inside it: those rows stay native."""
    rounded = (positions // block + 1) * block
    return torch.where(positions < trained_length, rounded.clamp(max=trained_length), rounded)


def resonance(inv_freq: torch.Tensor, length: float) -> torch.Tensor:
    """Resonance RoPE (Wang et al. 2024, arXiv 2403.00071): each plane whose wavelength 2 pi / theta is below
    ``length`` gets the nearest integer wavelength, theta~ = 2 pi / round(2 pi / theta), so every position past the
    trained context repeats a phase seen in training. Longer planes (and zero frequencies) are kept."""
    wavelength = 2 * math.pi / inv_freq.double()
    rounded = 2 * math.pi / wavelength.round()
    return torch.where(wavelength < length, rounded, inv_freq.double()).to(inv_freq.dtype)
