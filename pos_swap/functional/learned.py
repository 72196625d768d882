"""Learned absolute position tables: reading rows at fractional positions."""

import torch


def interpolate(weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``weight (N, D)`` at fractional ``positions``: linear interpolation between the two nearest rows,
    clamped to the table. Differentiable in ``weight``, so the stretched table can be fine-tuned."""
    positions = positions.float().clamp(0, weight.shape[0] - 1)
    low = positions.floor().long()
    high = (low + 1).clamp(max=weight.shape[0] - 1)
    fraction = (positions - low).unsqueeze(-1).to(weight.dtype)
    return torch.lerp(weight[low], weight[high], fraction)
