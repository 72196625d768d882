"""What every RoPE-scaling scheme shares: new frequencies for the model's rotary tables.

A static rule (linear, ntk, yarn, llama3) is written into the rotary module once: zero cost at run time. A rule
that follows the current length (dynamic, dynamic-yarn, longrope) sets the rotary to the identity and rotates at
attention time (:class:`~pos_swap.attention.DeferredRotation`), so cached keys never keep stale frequencies; by
default each query row follows its own (block-rounded) position, so cached generation equals recomputation.
"""

import dataclasses
import functools

import torch

from .. import archs
from ..attention import DeferredRotation, chunked_backend
from ..registry import MAX_FACTOR, MAX_POSITIONS, Scheme, SchemeConfig, greater_than, param


@dataclasses.dataclass
class RopeScalingConfig(SchemeConfig):
    original_max_position_embeddings: int = param(
        None, "context the checkpoint was trained for (default: read from the model)",
        greater_than(0, at_most=MAX_POSITIONS),
    )


@dataclasses.dataclass
class FollowsLengthConfig(RopeScalingConfig):
    per_position: bool = param(
        True,
        "each query row uses the frequencies of its own position (rounded up to a block, not past the trained "
        "context), so cached generation "
        "equals recomputation; False: every row uses the current length's, as transformers does",
    )
    block: int = param(512, "per-position block B: positions share frequencies within B", greater_than(0, at_most=MAX_POSITIONS))


def factor_param(example: float = 4.0):
    return param(
        None,
        f"context extension factor s > 1 (e.g. {example:g} for {example:g}x the trained context)",
        greater_than(1, " (1 leaves the model unchanged)", at_most=MAX_FACTOR),
        required=True,
    )


class RopeScaling(Scheme):
    """Base of the RoPE-scaling family. A static rule defines :meth:`frequencies`, a length-following one
    (``follows_length``) :meth:`per_sequence`."""

    families = (archs.ROTARY,)
    follows_length = False  # True: the frequencies depend on the current sequence length

    @classmethod
    def defaults(cls, model) -> dict:
        return {"original_max_position_embeddings": archs.trained_context(model.config)}

    def apply(self, patch) -> None:
        model = patch.model
        for slot in archs.rotary_slots(model):
            dim, base = slot.dim, slot.rope_parameters(model.config)["rope_theta"]
            if not self.follows_length:
                patch.set_rotary(slot, *self.frequencies(dim, base))
                continue
            patch.set_rotary_identity(slot)  # keys enter the cache unrotated
            hook = self.rotation(patch.tuned(functools.partial(self.per_sequence, dim, base)))
            patch.hook_attention(archs.attention_modules(model, slot.layer_type), hook, backend=self.backend(model))

    def rotation(self, frequencies) -> DeferredRotation:
        """The attention hook that rotates at attention time with ``frequencies`` (a length-following rule's):
        per position with this config's block, rows inside the trained context native."""
        return DeferredRotation(frequencies, self.block, self.original_length)

    def frequencies(self, dim: int, base: float) -> tuple[torch.Tensor, float]:
        """A static rule's ``(inv_freq, attention_scaling)`` for a rotary of ``dim`` features and ``base``."""
        raise NotImplementedError

    def per_sequence(self, dim: int, base: float, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inv_freq (B, F), scaling (B,))`` from each sequence's own length ``(B,)``: a static rule's rows are
        all equal; a length-following rule overrides this in tensor operations only, so torch.compile traces a
        decode step without reading the lengths."""
        inv_freq, scaling = self.frequencies(dim, base)
        rows = len(seq_lens)
        return inv_freq.to(seq_lens.device).expand(rows, -1), torch.full((rows,), scaling, device=seq_lens.device)

    def causal_consistent(self) -> bool:
        """Static rules and per-position rows depend on their prefix only; whole-window rotation by the current
        length changes every row's frequencies when the window grows."""
        return not self.follows_length or self.block is not None

    @property
    def block(self) -> int | None:
        """The per-position block of a length-following rule, or None for whole-window frequencies."""
        return self.config.block if getattr(self.config, "per_position", False) else None

    def backend(self, model) -> str | None:
        """Per-position attention runs in spans of rows with the model's mask cut to them, which eager and sdpa
        accept: other backends are routed to sdpa then; whole-window rotation keeps the model's backend."""
        return None if self.block is None else chunked_backend(model)

    @property
    def original_length(self) -> int:
        return self.config.original_max_position_embeddings
