"""Attention temperature by position: a factor on each query row from its own position, so the row's logits sharpen
as the context it reads grows. ``positions`` are 0-based; a causal row at position p sees n = p + 1 keys.

- LogN (Qwen): max(1, ln n / ln L), L the trained context: 1 inside it.
- Llama 4 (its no-RoPE layers): 1 + beta ln(floor(n / F) + 1), F the floor scale (8192 there), beta 0.1.
- Scalable-Softmax (Nakanishi 2025, arXiv 2501.19399): s ln n, here with s = 1 / ln L so that the factor is 1 at
  the trained context (the paper learns s; a pretrained model without it needs one that keeps its trained range).
"""

import math

import torch


def logn(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Qwen's LogN factor max(1, ln(p + 1) / ln L) per position."""
    return (torch.log((positions + 1).double()) / math.log(length)).clamp(min=1.0)


def llama4(positions: torch.Tensor, floor: int, beta: float) -> torch.Tensor:
    """Llama 4's factor 1 + beta ln(floor((p + 1) / F) + 1) per position."""
    return 1.0 + beta * torch.log(torch.floor((positions + 1).double() / floor) + 1.0)


def scalable_softmax(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Scalable-Softmax's factor s ln(p + 1) with s = 1 / ln L per position."""
    return torch.log((positions + 1).double()) / math.log(length)
