"""ALiBi (Press et al. 2022, "Train Short, Test Long"): a linear attention bias per head."""

import math

import torch


def slopes(num_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The geometric slopes 2^(-8k/n), k = 1..n, for n a power of two; otherwise the c = 2^floor(log2 n) slopes of
    the c-head set followed by every other slope of the 2c-head set (the paper's code, BLOOM, MPT agree)."""
    closest = 2 ** math.floor(math.log2(num_heads))

    def geometric(n: int) -> list[float]:
        return [2 ** (-8 * k / n) for k in range(1, n + 1)]

    values = geometric(closest) + geometric(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(values, dtype=dtype)


def bias(
    query_positions: torch.Tensor, key_positions: torch.Tensor, head_slopes: torch.Tensor, symmetric: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # fmt: skip
    """The bias ``(B, H, Lq, Lk)`` in ``dtype``: -slope * (i - j) (causal form; future keys are left to the mask)
    or -slope * |i - j| (symmetric form, for encoders). Relative distances keep it exact near the diagonal."""
    distance = (query_positions[:, :, None] - key_positions[:, None, :]).to(dtype)  # (B, Lq, Lk)
    if symmetric:
        distance = distance.abs()
    return -head_slopes.to(dtype).view(1, -1, 1, 1) * distance[:, None]
