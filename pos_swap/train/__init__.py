"""Recovery fine-tuning: LoRA (peft) through transformers' Trainer after a swap, PoSE position ids, packed data.

    from pos_swap import train
    run = train.finetune(model, tokens, train.Settings(scheme="alibi", seq_len=256, max_steps=200), out="runs/a")
"""

from .data import PackedSequences, load_tokens, split
from .lora import lora_config, trainable
from .pose import pose_position_ids
from .run import Settings, finetune, finetune_from, load_adapter

__all__ = [
    "PackedSequences", "Settings", "finetune", "finetune_from", "load_adapter", "load_tokens", "lora_config", "pose_position_ids",
    "split", "trainable",
]  # fmt: skip
