"""The architecture map: per ``model_type``, where a model keeps its positional mechanism.

This is the only module that names model types or module paths. Schemes ask it for "the rotary tables" or
"the attention modules" and never look inside a model themselves.
"""

from dataclasses import dataclass

import transformers
from packaging.version import Version
from torch import nn

from .errors import UnsupportedArchitectureError

ROTARY, LEARNED = "rotary", "learned"
# the keyword a model's forward and generate take a KV cache under: transformers 5.24 renamed past_key_values
CACHE_ARGUMENT = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its positions. Paths are relative to ``model.base_model``; ``*`` walks a
    ``ModuleList``."""

    family: str  # the positional mechanism the checkpoint was trained with
    attention: str  # the attention modules, e.g. "layers.*.self_attn"
    rotary: str | None = None  # the rotary module that computes (cos, sin) once per forward
    scaled_layer_types: tuple[str, ...] | None = None  # per-layer-type rotary tables (Gemma 3): the ones to rescale
    table: str | None = None  # the learned absolute position table
    table_offset: int = 0  # rows the table skips before position 0 (OPT: 2)
    # (1, max_positions) buffers of default ids that a longer context must outgrow: path -> "arange" or "zeros"
    index_buffers: tuple[tuple[str, str], ...] = ()
    # how the model calls its table: table(position_ids), or with the ids under this keyword (OPT calls
    # table(mask, past_length, position_ids=...))
    table_positions_keyword: str | None = None
    # the projections LoRA adapts (module-name suffixes) and whether they store weights as (in, out), like GPT-2's
    # Conv1D (peft's fan_in_fan_out)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_fan_in_fan_out: bool = False


_DECODER_ROPE = ArchSpec(family=ROTARY, attention="layers.*.self_attn", rotary="rotary_emb")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _DECODER_ROPE,
    "mistral": _DECODER_ROPE,
    "qwen2": _DECODER_ROPE,
    "qwen3": _DECODER_ROPE,
    "gemma": _DECODER_ROPE,
    "gemma2": _DECODER_ROPE,
    "gemma3_text": ArchSpec(
        family=ROTARY, attention="layers.*.self_attn", rotary="rotary_emb", scaled_layer_types=("full_attention",)
    ),
    "phi3": ArchSpec(family=ROTARY, attention="layers.*.self_attn", rotary="rotary_emb", lora_targets=("qkv_proj", "o_proj")),
    "gpt_neox": ArchSpec(
        family=ROTARY, attention="layers.*.attention", rotary="rotary_emb", lora_targets=("query_key_value", "dense")
    ),
    "gpt2": ArchSpec(
        family=LEARNED, attention="h.*.attn", table="wpe", lora_targets=("c_attn", "attn.c_proj"), lora_fan_in_fan_out=True
    ),
    "opt": ArchSpec(
        family=LEARNED, attention="decoder.layers.*.self_attn", table="decoder.embed_positions", table_offset=2,
        table_positions_keyword="position_ids", lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    ),  # fmt: skip
    "bert": ArchSpec(
        family=LEARNED,
        attention="encoder.layer.*.attention.self",
        table="embeddings.position_embeddings",
        index_buffers=(("embeddings.position_ids", "arange"), ("embeddings.token_type_ids", "zeros")),
        lora_targets=("query", "key", "value", "attention.output.dense"),
    ),
}


def lookup(model: nn.Module) -> ArchSpec:
    """The map entry for ``model``, or an error that lists what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"pos_swap does not know where a '{model_type}' model keeps its positions. Supported model types: "
            f"{supported}. To add one, describe it with an ArchSpec in pos_swap/archs.py."
        )
    return ARCHITECTURES[model_type]


def find_modules(model: nn.Module, path: str) -> list[nn.Module]:
    """The modules at a dotted ``path`` under ``model.base_model``; ``*`` expands every child."""
    found = [model.base_model]
    for part in path.split("."):
        found = [child for module in found for child in (module.children() if part == "*" else [getattr(module, part)])]
    return found


@dataclass
class RotarySlot:
    """One table of a rotary module: its inverse frequencies and attention scaling (Gemma 3 keeps one per layer
    type, under the prefix ``"{layer_type}_"``)."""

    module: nn.Module
    layer_type: str | None = None

    @property
    def prefix(self) -> str:
        return f"{self.layer_type}_" if self.layer_type else ""

    @property
    def inv_freq(self):
        return getattr(self.module, self.prefix + "inv_freq")

    @property
    def attention_scaling(self) -> float:
        return getattr(self.module, self.prefix + "attention_scaling")

    @property
    def dim(self) -> int:
        """Number of rotated features per head (less than head_dim under partial rotary)."""
        return 2 * self.inv_freq.shape[-1]

    def rope_parameters(self, config) -> dict:
        params = config.rope_parameters
        return params[self.layer_type] if self.layer_type else params


def rotary_slots(model: nn.Module, every_layer_type: bool = False) -> list[RotarySlot]:
    """The rotary tables a RoPE-scaling scheme rescales (or, with ``every_layer_type``, all of them)."""
    spec = lookup(model)
    if spec.rotary is None:
        return []
    (module,) = find_modules(model, spec.rotary)
    layer_types = spec.scaled_layer_types
    if layer_types and every_layer_type:
        layer_types = tuple(module.layer_types)
    return [RotarySlot(module, layer_type) for layer_type in layer_types or (None,)]


LENGTH_FOLLOWING_ROPE_TYPES = ("dynamic", "longrope")  # transformers recomputes these per forward from its length


def follows_length(model: nn.Module) -> bool:
    """Whether the model's own rotary tables change with the whole window's length (transformers' ``dynamic``
    and ``longrope`` rope types), so a token's output also depends on how long the window is."""
    types = {slot.rope_parameters(model.config).get("rope_type", "default") for slot in rotary_slots(model, every_layer_type=True)}
    return bool(types & set(LENGTH_FOLLOWING_ROPE_TYPES))


def attention_modules(model: nn.Module, layer_type: str | None = None) -> list[nn.Module]:
    """The attention modules, optionally only those of one layer type (Gemma 3's ``full_attention``)."""
    modules = find_modules(model, lookup(model).attention)
    if layer_type is not None:
        modules = [m for m in modules if getattr(m, "layer_type", None) == layer_type]
    return modules


def is_causal(model: nn.Module) -> bool:
    """Whether the model's attention is causal, as its attention modules say (transformers' ``is_causal``, the
    flag pos_swap's attention function reads too): one source for the whole package."""
    return all(getattr(module, "is_causal", True) for module in attention_modules(model))


def position_table(model: nn.Module) -> nn.Embedding:
    """The learned absolute position table (GPT-2's ``wpe``, OPT's ``embed_positions``, ...)."""
    (table,) = find_modules(model, lookup(model).table)
    return table


def table_rows(model: nn.Module):
    """The learned table's rows for positions 0, 1, ... (the ``table_offset`` rows before them skipped)."""
    return position_table(model).weight[lookup(model).table_offset :]


def norm_names(model: nn.Module) -> list[str]:
    """Names (as ``model.named_modules`` gives them) of the normalization layers: LayerNorm and the RMSNorm
    classes every RoPE family defines for itself (LongLoRA trains them with the adapter)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")]  # fmt: skip


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def trained_context(config) -> int:
    """The context length the checkpoint was trained for: an ``original_max_position_embeddings`` in its RoPE
    parameters or config (Phi-3 keeps it there), else ``max_position_embeddings``."""
    params = getattr(config, "rope_parameters", None) or {}
    flat = [params] if "rope_type" in params else list(params.values())
    originals = [p["original_max_position_embeddings"] for p in flat if p.get("original_max_position_embeddings")]
    originals.append(getattr(config, "original_max_position_embeddings", None))
    return next((length for length in originals if length), config.max_position_embeddings)


def attention_backends(model: nn.Module) -> list[str]:
    """Attention backends the model class supports (from transformers' class flags)."""
    flags = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn", "flash_attention_2": "_supports_flash_attn"}
    return ["eager"] + [name for name, flag in flags.items() if getattr(model, flag, False)]


def summarize(model: nn.Module) -> dict:
    """What ``pos-swap info`` shows: the architecture, its positional mechanism and trained context."""
    spec, config = lookup(model), model.config
    summary = {
        "model_type": config.model_type,
        "class": type(model).__name__,
        "positions": spec.family,
        "trained_context": trained_context(config),
        "causal": is_causal(model),
        "attention_backends": attention_backends(model),
        "attention_implementation": config._attn_implementation,
    }
    if spec.rotary:
        summary["rotary"] = [
            {
                "layer_type": slot.layer_type,
                "rotary_dim": slot.dim,
                "rope_theta": slot.rope_parameters(config)["rope_theta"],
                "rope_type": slot.rope_parameters(config).get("rope_type", "default"),
            }
            for slot in rotary_slots(model)
        ]
    if spec.table:
        rows = position_table(model).num_embeddings - spec.table_offset
        summary["table"] = {"path": spec.table, "positions": rows, "offset": spec.table_offset}
    return summary
