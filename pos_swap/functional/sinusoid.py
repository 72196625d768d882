"""The fixed sinusoidal position table of the original Transformer (Vaswani et al. 2017)."""

import math

import torch


def table(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """PE(p, 2i) = sin(p / base^(2i/d)), PE(p, 2i+1) = cos(p / base^(2i/d)) for any (fractional) positions;
    returns ``(*positions.shape, dim)`` in float32."""
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, device=positions.device).float() / dim)
    angles = positions.float()[..., None] * inv_freq  # (..., ceil(dim/2))
    interleaved = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return interleaved[..., :dim]

