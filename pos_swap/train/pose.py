"""PoSE position ids (Zhu et al. 2024): a short training window whose positions cover a long target context.

The window of ``length`` tokens is cut into ``chunks`` contiguous chunks; chunk i keeps consecutive ids shifted by a
skip ``u_i``, with ``u_0 = 0`` and ``u_i`` drawn uniformly from ``u_{i-1} .. target_len - length``. Every id stays
below ``target_len``, ids increase along the window, and relative distances up to ``target_len - 1`` are trained.
"""

import torch

from ..errors import PosSwapError


def pose_position_ids(length: int, target_len: int, chunks: int = 2, generator: torch.Generator | None = None):
    """Position ids ``(length,)`` of one PoSE training window (see the module docstring)."""
    if not 1 <= chunks <= length:
        raise PosSwapError(f"PoSE needs between 1 and {length} chunks (the window length); got {chunks}.")
    if target_len < length:
        raise PosSwapError(
            f"--target-len ({target_len}) is below --seq-len ({length}); PoSE stretches a window to a longer "
            f"target. Give a target length of at least the sequence length."
        )
    cuts = torch.randperm(length - 1, generator=generator)[: chunks - 1].add(1).sort().values  # chunk starts > 0
    room = target_len - length
    skips = [0]
    for _ in range(chunks - 1):
        skips.append(int(torch.randint(skips[-1], room + 1, (), generator=generator)))
    chunk_of = torch.bucketize(torch.arange(length), cuts, right=True)  # (length,) index of each token's chunk
    return torch.arange(length) + torch.tensor(skips)[chunk_of]
