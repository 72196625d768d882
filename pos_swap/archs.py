"""The architecture map: per ``model_type``, where a model keeps its positional mechanism.

This is the only module that names model types or module paths. Schemes ask it for "the rotary tables" or
"the attention modules" and never look inside a model themselves.
"""

from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.pytorch_utils import Conv1D

from .errors import PosSwapError, UnsupportedArchitectureError
from .functional import rope

ROTARY, LEARNED = "rotary", "learned"
# the keyword a model's forward and generate take a KV cache under: transformers 5.24 renamed past_key_values
CACHE_ARGUMENT = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its positions. Paths are relative to ``model.base_model``; ``*`` walks a
    ``ModuleList``."""

    family: str  # the positional mechanism the checkpoint was trained with
    attention: str | tuple[str, ...]  # the attention modules: a pattern such as "layers.*.self_attn", or paths
    # with ``attention`` given as paths: the rotary table (layer type) each module's rotation comes from
    attention_layer_types: tuple[str | None, ...] | None = None
    rotary: str | None = None  # the rotary module that computes (cos, sin) once per forward
    # how the attention pairs rotary features (rope.PAIRINGS); pos_swap's attention function reorders queries and
    # keys of another pairing into rotate-half pairs before a hook rotates them
    pairing: str = rope.HALF
    # (attention path, why) of the attention modules pos_swap's attention-time hooks cannot serve (learned sink
    # logits, positions the cache cannot tell); static schemes still work on them
    hook_refusals: tuple[tuple[str, str], ...] = ()
    # (attention path, parameter) of the attention modules that add a learned per-head sink logit to their softmax
    # (GPT-OSS's ``sinks``, handed to attention as ``s_aux``): pos_swap's own attention adds it too
    sink_logits: tuple[tuple[str, str], ...] = ()
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


DISCOVERED = "_pos_swap_arch"  # the model attribute that keeps a discovered spec (copies and pickles keep it)


def lookup(model: nn.Module) -> ArchSpec:
    """The map entry for ``model``'s type, else the spec :func:`discover` derives from the model itself (kept on
    the model), else an error that names what is unusual about it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    spec = model.__dict__.get(DISCOVERED)
    if spec is None:
        spec = model.__dict__[DISCOVERED] = discover(model)
    return spec


def coverage(model: nn.Module) -> tuple[str, str]:
    """How pos_swap covers ``model``: ``("entry", ...)``, ``("discovery", ...)`` or ``("refused", why)``."""
    model_type = model.config.model_type
    if model_type in ARCHITECTURES:
        return "entry", f"'{model_type}' has a hand-written entry in pos_swap/archs.py"
    try:
        spec = lookup(model)
    except UnsupportedArchitectureError as error:
        return "refused", str(error)
    layers = len(spec.attention)
    tables = sorted({t for t in spec.attention_layer_types if t}) or ["one table"]
    return "discovery", (
        f"derived from the model: rotary '{spec.rotary}' ({', '.join(tables)}, {spec.pairing} pairs) reaches "
        f"{layers} attention module{'s' * (layers != 1)} through transformers' AttentionInterface"
    )


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

    def settings(self, inv_freq: torch.Tensor, attention_scaling: float) -> list[tuple[nn.Module, str, object]]:
        """``(module, attribute, value)`` changes that make this table give ``(cos, sin) * attention_scaling`` of
        ``inv_freq`` (already on the table's device and dtype): what a patch sets, and what discovery checks the
        rotary follows. rope_type "default" keeps transformers' dynamic_rope_update from recomputing them."""
        module, prefix = self.module, self.prefix
        changes = [(module, prefix + "inv_freq", inv_freq)]
        if prefix + "original_inv_freq" in module._buffers or prefix + "original_inv_freq" in vars(module):
            changes.append((module, prefix + "original_inv_freq", inv_freq.clone()))
        changes.append((module, prefix + "attention_scaling", float(attention_scaling)))
        rope_type = module.rope_type
        default = {**rope_type, self.layer_type: "default"} if isinstance(rope_type, dict) else "default"
        return [*changes, (module, "rope_type", default)]


def table_layer_types(module: nn.Module) -> tuple[str, ...]:
    """The layer types a rotary module keeps tables for (Gemma 3: ``full_attention_inv_freq``, ...); () when it
    keeps a single ``inv_freq``."""
    names = [name for name, _ in module.named_buffers(recurse=False)]
    return tuple(name.removesuffix("_inv_freq") for name in names
                 if name.endswith("_inv_freq") and not name.endswith("original_inv_freq"))  # fmt: skip


def rotary_slots(model: nn.Module, every_layer_type: bool = False) -> list[RotarySlot]:
    """The rotary tables a RoPE-scaling scheme rescales (or, with ``every_layer_type``, all of them)."""
    spec = lookup(model)
    if spec.rotary is None:
        return []
    (module,) = find_modules(model, spec.rotary)
    layer_types = spec.scaled_layer_types
    if layer_types and every_layer_type:
        layer_types = table_layer_types(module)
    return [RotarySlot(module, layer_type) for layer_type in layer_types or (None,)]


LENGTH_FOLLOWING_ROPE_TYPES = ("dynamic", "longrope")  # transformers recomputes these per forward from its length


def follows_length(model: nn.Module) -> bool:
    """Whether the model's own rotary tables change with the whole window's length (transformers' ``dynamic``
    and ``longrope`` rope types), so a token's output also depends on how long the window is."""
    types = {slot.rope_parameters(model.config).get("rope_type", "default") for slot in rotary_slots(model, every_layer_type=True)}
    return bool(types & set(LENGTH_FOLLOWING_ROPE_TYPES))


def reordered_attention(model: nn.Module) -> list[tuple[nn.Module, int, str]]:
    """``(attention module, rotated features, pairing)`` of each attention module whose rotary pairs are not
    rotate-half (interleaved: Cohere, GLM, ...), which pos_swap's attention function reorders; [] for the others."""
    pairing = lookup(model).pairing
    if pairing == rope.HALF:
        return []
    return [(module, slot.dim, pairing) for slot in rotary_slots(model, every_layer_type=True)
            for module in attention_modules(model, slot.layer_type)]  # fmt: skip


def hook_refusal(model: nn.Module, modules) -> str | None:
    """Why pos_swap's attention-time hooks cannot serve one of the attention ``modules`` (discovery found out), or
    None when they serve all of them."""
    refusals = dict(lookup(model).hook_refusals)
    if not refusals:
        return None
    names = {id(m): name for name, m in model.base_model.named_modules()}
    return next((refusals[names[id(m)]] for m in modules if names.get(id(m)) in refusals), None)


def sink_attention(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(attention module, parameter name)`` of each attention module whose softmax has a learned per-head sink
    logit, that parameter of the module (GPT-OSS's ``sinks``); [] for models without."""
    return [(find_modules(model, path)[0], name) for path, name in lookup(model).sink_logits]


def attention_modules(model: nn.Module, layer_type: str | None = None) -> list[nn.Module]:
    """The attention modules, optionally only those of one layer type (Gemma 3's ``full_attention``)."""
    spec = lookup(model)
    if isinstance(spec.attention, str):
        modules = find_modules(model, spec.attention)
        if layer_type is not None:
            modules = [m for m in modules if getattr(m, "layer_type", None) == layer_type]
        return modules
    return [module for path, kind in zip(spec.attention, spec.attention_layer_types)
            for module in find_modules(model, path) if layer_type is None or kind == layer_type]  # fmt: skip


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
    flat = [params] if "rope_type" in params else [p for p in params.values() if p]  # per layer type: some None
    originals = [p["original_max_position_embeddings"] for p in flat if p.get("original_max_position_embeddings")]
    originals.append(getattr(config, "original_max_position_embeddings", None))
    originals.append(getattr(config, "max_position_embeddings", None))
    trained = next((length for length in originals if length), None)
    if trained is None:
        raise PosSwapError(
            f"The config of this '{config.model_type}' model gives no max_position_embeddings, so pos_swap cannot "
            f"tell the context it was trained for. Set model.config.max_position_embeddings = N (the trained "
            f"context, from the model card) before patching."
        )
    return trained


def attention_backends(model: nn.Module) -> list[str]:
    """Attention backends the model class supports (from transformers' class flags)."""
    flags = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn", "flash_attention_2": "_supports_flash_attn"}
    return ["eager"] + [name for name, flag in flags.items() if getattr(model, flag, False)]


def has_entry(config) -> bool:
    """Whether the model type has a hand-written entry (else :func:`discover` derives one, running the model)."""
    return config.model_type in ARCHITECTURES


def summarize(model: nn.Module) -> dict:
    """What ``pos-swap info`` shows: how pos_swap covers the model (entry, discovery, or refused and why), its
    positional mechanism and trained context."""
    config = model.config
    covered, why = coverage(model)
    summary = {"model_type": config.model_type, "class": type(model).__name__, "covered_by": covered, "coverage": why}
    if covered == "refused":
        return summary
    spec = lookup(model)
    summary |= {
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
                "pairing": spec.pairing,
                "rope_theta": slot.rope_parameters(config)["rope_theta"],
                "rope_type": slot.rope_parameters(config).get("rope_type", "default"),
            }
            for slot in rotary_slots(model)
        ]
    if spec.hook_refusals:  # the first reason; the modules share it in every model seen so far
        summary["attention_time_schemes"] = (
            f"refused on {len(spec.hook_refusals)} attention module(s): {spec.hook_refusals[0][1]} The static "
            f"frequency schemes (linear, ntk, yarn, llama3) apply."
        )
    if spec.table:
        rows = position_table(model).num_embeddings - spec.table_offset
        summary["table"] = {"path": spec.table, "positions": rows, "offset": spec.table_offset}
    return summary


# -- discovery: the ArchSpec of a rotary model type without an entry, derived from the model itself ----------------
TRACE = "pos_swap_trace"  # the attention implementation discovery runs a model under
TRACE_TOKENS = 8
WINDOWED = ("sliding_window", "attention_chunk_size")  # attributes of attention modules that see a window only
UNKNOWN_SINKS = "?"  # what discovery records for sink logits handed to attention that are no parameter of the module


def _record_and_silence(module, query, key, value, attention_mask, **kwargs):
    """Discovery's attention function: remember the queries and keys a module hands to attention (already rotated),
    whether it hands over ``position_ids``, and which of its own parameters it hands over as sink logits (``s_aux``:
    its name, :data:`UNKNOWN_SINKS` for another tensor, None without); return zeros, so no layer's input depends on
    the rotation and the queries of two runs compare exactly."""
    sinks = kwargs.get("s_aux")
    own = next((name for name, p in module.named_parameters(recurse=False) if p is sinks), UNKNOWN_SINKS)
    traced = (query.detach().clone(), key.detach().clone(), "position_ids" in kwargs, None if sinks is None else own)
    module.__dict__.setdefault("_pos_swap_traced", []).append(traced)
    batch, _, length, _ = query.shape
    return value.new_zeros(batch, length, query.shape[1], value.shape[-1]), None


AttentionInterface.register(TRACE, _record_and_silence)
AttentionMaskInterface.register(TRACE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def refuse(model: nn.Module, unusual: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"pos_swap cannot patch this '{model.config.model_type}' model ({type(model).__name__}): {unusual} "
        f"Supported model types: {', '.join(sorted(ARCHITECTURES))}, and the RoPE models discovery derives "
        f"(`pos-swap info MODEL` tells)."
    )


def discover(model: nn.Module) -> ArchSpec:
    """The spec of a RoPE model whose type has no entry, from the model itself: the rotary module holding
    ``inv_freq`` under ``base_model`` (one table, or one per layer type as in Gemma 3), and the attention modules its
    output reaches, found by running the model on a few tokens through a recording attention function (twice: with
    the rotary's output and with the identity rotation). Each module's queries and keys must be the unrotated ones
    turned by pos_swap's own rotation of that table (leading features, in pairs of one of ``rope.PAIRINGS``, the
    same for every module), so static and attention-time schemes reproduce the model exactly. Raises
    :class:`UnsupportedArchitectureError` naming what is unusual where that pattern does not hold."""
    config = model.config
    _refuse_by_config(model)
    if any(p.is_meta for p in model.parameters()):
        raise PosSwapError(
            f"pos_swap finds where a '{config.model_type}' model keeps its positions by running it on "
            f"{TRACE_TOKENS} tokens, which needs its weights: load it with them (this one is on the meta device)."
        )
    base = model.base_model
    rotaries = [(name, m) for name, m in base.named_modules() if "inv_freq" in dict(m.named_buffers(recurse=False))
                or table_layer_types(m)]  # fmt: skip
    if not rotaries:
        raise refuse(model, (
            "found no positional mechanism: no rotary module holding inv_freq under its base model, and no "
            "hand-written entry in pos_swap/archs.py. A learned position table or ALiBi model needs an ArchSpec "
            "entry there (see 'gpt2' and 'opt')."
        ))  # fmt: skip
    if len(rotaries) > 1:
        names = ", ".join(name for name, _ in rotaries[:4])
        raise refuse(model, f"it keeps rotary modules in {len(rotaries)} places ({names}, ...); pos_swap rescales "
                            "one rotary module per model.")  # fmt: skip
    rotary_path, rotary = rotaries[0]
    slots = [RotarySlot(rotary, layer_type) for layer_type in table_layer_types(rotary) or (None,)]
    if not all(_has_theta(slot, config) for slot in slots):
        raise refuse(model, "its config's rope_parameters give no rope_theta for each of its rotary tables, which "
                            "pos_swap's frequencies start from.")  # fmt: skip
    if any(bool((slot.inv_freq == 0).any()) for slot in slots):
        raise refuse(model, "some planes of its rotary have frequency 0 (rope_type 'proportional', p-RoPE), which "
                            "pos_swap's frequency rules do not keep.")  # fmt: skip
    reached, sink_logits = _trace(model, rotary, slots)  # [(path, layer type, pairing, why not hooked)]
    pairings = sorted({pairing for _, _, pairing, _ in reached}, key=rope.PAIRINGS.index)
    if len(pairings) > 1:
        raise refuse(model, f"its attention modules pair rotary features in different ways ({', '.join(pairings)}); "
                            "pos_swap reorders one pairing per model.")  # fmt: skip
    hook_refusals = tuple((path, why) for path, _, _, why in reached if why)
    reached = [(path, kind) for path, kind, *_ in reached]
    names = {id(m): name for name, m in base.named_modules()}
    modules = [find_modules(model, path)[0] for path, _ in reached]
    scaled = None
    if slots[0].layer_type is not None:
        unwindowed = {kind for (_, kind), m in zip(reached, modules) if not any(getattr(m, a, None) for a in WINDOWED)}
        scaled = tuple(slot.layer_type for slot in slots if slot.layer_type in unwindowed) or tuple(
            slot.layer_type for slot in slots if slot.layer_type in {kind for _, kind in reached}
        )
    targets, conv1d = _lora_targets(model, modules, names)
    return ArchSpec(
        family=ROTARY, rotary=rotary_path, pairing=pairings[0], hook_refusals=hook_refusals, sink_logits=sink_logits,
        attention=tuple(path for path, _ in reached),
        attention_layer_types=tuple(kind for _, kind in reached), scaled_layer_types=scaled,
        lora_targets=targets, lora_fan_in_fan_out=conv1d,
    )  # fmt: skip


def _has_theta(slot: RotarySlot, config) -> bool:
    try:
        return "rope_theta" in slot.rope_parameters(config)
    except (KeyError, TypeError):
        return False


def _refuse_by_config(model: nn.Module) -> None:
    """Refuse what the config alone shows to be outside discovery's pattern."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise refuse(model, "it is an encoder-decoder; discovery covers decoder-only RoPE models.")
    text = config.get_text_config(decoder=True)
    if text is not config:
        inner = [name for name, m in model.named_modules() if name and getattr(m, "config", None) is text]
        how = f"pos_swap.patch(model.{inner[0]}, ...)" if inner else "pos_swap.patch on its text model"
        raise refuse(model, (
            f"it is a multimodal wrapper. Patch its language model instead: {how} (a '{text.model_type}' model); "
            f"the wrapper's generate() then runs the patched language model."
        ))  # fmt: skip
    if getattr(config, "kv_lora_rank", None) or getattr(config, "qk_rope_head_dim", None):
        raise refuse(model, (
            "it uses multi-head latent attention (DeepSeek V2/V3 MLA): the rotary turns a qk_rope_head_dim slice of "
            "each head built by a latent projection, not the leading features of each head that pos_swap rotates."
        ))  # fmt: skip


Traced = tuple[str, str | None, str, str | None]  # (path, layer type, pairing, why hooks cannot serve it or None)


def _trace(
    model: nn.Module, rotary: nn.Module, slots: list[RotarySlot]
) -> tuple[list[Traced], tuple[tuple[str, str], ...]]:
    """Run ``model`` on a few tokens under :func:`_record_and_silence`: with the rotary's output, with the identity
    rotation in its place, and once per table with that table's frequencies set to 0 as a patch sets them (the
    modules it leaves unrotated are that table's, even where two tables are equal, as in OLMo 3). Return
    ``(path, layer type, pairing, why attention-time hooks cannot serve it or None)`` of each attention module whose
    queries and keys the rotary's output turns, in model order (modules that no table turns, NoPE layers such as
    SmolLM3's, left out), and ``(path, parameter)`` of every attention module whose softmax adds that parameter's
    learned sink logits (:attr:`ArchSpec.sink_logits`)."""
    device = next(model.parameters()).device
    ids = (torch.arange(TRACE_TOKENS, device=device) * 7 + 3)[None] % model.config.vocab_size  # (1, L)
    positions = torch.arange(TRACE_TOKENS, device=device)[None]
    native, identity = _traced_run(model, rotary, ids), _traced_run(model, rotary, ids, identity=True)
    if not torch.equal(native.pop("output"), identity.pop("output")):
        raise refuse(model, (
            "its rotary's output reaches computation that does not go through transformers' AttentionInterface "
            "(attention written into the model's own code), where pos_swap's attention-time schemes cannot act."
        ))  # fmt: skip
    if not native:
        raise refuse(model, "none of its modules calls attention through transformers' AttentionInterface.")
    zeroed = [_traced_run(model, rotary, ids, changes=slot.settings(torch.zeros_like(slot.inv_freq), 1.0))
              for slot in slots]  # fmt: skip
    names = {id(m): name for name, m in model.base_model.named_modules()}
    reached, sink_logits = [], []
    for module, calls in native.items():
        name = names[id(module)]
        if len(calls) != 1:
            raise refuse(model, f"its module '{name}' calls attention {len(calls)} times a forward.")
        if calls[0][3] not in (None, UNKNOWN_SINKS):  # NoPE layers' sinks too: pos_swap routes their attention
            sink_logits.append((name, calls[0][3]))
        (query, key, with_positions, sinks), (query0, key0, *_) = calls[0], identity[module][0]
        if torch.equal(query, query0) and torch.equal(key, key0):
            continue  # a layer without positions (NoPE)
        owners = [slot for slot, run in zip(slots, zeroed) if all(map(torch.equal, run[module][0][:2], (query0, key0)))]
        if len(owners) != 1:
            raise refuse(model, (
                f"its attention '{name}' stays rotated when the frequencies of {'each' if owners else 'any'} "
                f"rotary table are set to 0: its rotary does not compute (cos, sin) from its inv_freq buffer alone "
                f"(PhiMoE's recomputes them from the config), and that buffer is what pos_swap changes."
                if not owners else
                f"its attention '{name}' loses its rotation when either of the tables "
                f"{', '.join(slot.layer_type for slot in owners)} is set to 0."
            ))  # fmt: skip
        (slot,) = owners
        pairing = next((p for p in rope.PAIRINGS if _turned_by(slot, p, positions, (query0, key0), (query, key))), None)
        if pairing is None:
            raise refuse(model, (
                f"its attention '{name}' rotates queries and keys other than pos_swap can (the rotary's cos and "
                f"sin on the leading features of each head, in pairs {' or '.join(rope.PAIRINGS)}): e.g. the rotary "
                f"part placed elsewhere in the head."
            ))  # fmt: skip
        why_not_hooked = None
        if sinks == UNKNOWN_SINKS:
            why_not_hooked = (f"its attention '{name}' adds learned sink logits (s_aux) to its softmax that are no "
                              f"parameter of the module, so pos_swap's own attention cannot read them.")  # fmt: skip
        elif any(getattr(model.config, window, None) for window in WINDOWED) and not with_positions:
            why_not_hooked = (f"its attention '{name}' is not handed position_ids and the model windows attention "
                              f"({' / '.join(WINDOWED)}), so its cache holds fewer keys than positions and pos_swap "
                              f"would take cache slots for positions.")  # fmt: skip
        reached.append((name, slot.layer_type, pairing, why_not_hooked))
    if not reached:
        raise refuse(model, "its rotary's output turns the queries and keys of none of its attention modules.")
    return reached, tuple(sink_logits)


def _traced_run(model: nn.Module, rotary: nn.Module, ids: torch.Tensor, identity: bool = False,
                changes: list[tuple[nn.Module, str, object]] = ()) -> dict:  # fmt: skip
    """One forward under the recording attention: ``{attention module: [(query, key, position_ids given, s_aux
    given)],
    "output": hidden states}``, with the rotary's output replaced by the identity rotation when ``identity``, and
    the attribute ``changes`` (:meth:`RotarySlot.settings`) made for the run. The model is left as it was."""

    def to_identity(module, args, output):
        if torch.is_tensor(output) and output.is_complex():  # one table cos + i sin (Llama 4's freqs_cis)
            return torch.ones_like(output)
        if not (isinstance(output, tuple) and len(output) == 2 and all(torch.is_tensor(t) for t in output)):
            raise refuse(model, f"its rotary module returns {type(output).__name__}, neither the pair (cos, sin) nor "
                                "one complex table.")  # fmt: skip
        return torch.ones_like(output[0]), torch.zeros_like(output[1])

    config, training = model.config, model.training
    backend = config._attn_implementation
    handle = rotary.register_forward_hook(to_identity) if identity else None
    restore = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        config._attn_implementation = TRACE
        model.eval()
        with torch.no_grad():
            output = model(input_ids=ids, use_cache=False)[0]  # the logits (or a base model's hidden states)
    except PosSwapError:
        raise
    except Exception as error:  # transformers could not run the model as discovery calls it
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise refuse(model, f"discovery could not run it on {TRACE_TOKENS} tokens ({type(error).__name__}: {reason}).")
    finally:
        config._attn_implementation = backend
        model.train(training)
        if handle is not None:
            handle.remove()
        for obj, name, value in reversed(restore):
            setattr(obj, name, value)
    traced = {m: m.__dict__.pop("_pos_swap_traced") for m in model.modules() if "_pos_swap_traced" in m.__dict__}
    return {**traced, "output": output}


def _turned_by(slot: RotarySlot, pairing: str, positions, unrotated, rotated) -> bool:
    """Whether ``rotated`` queries and keys are ``unrotated`` ones turned by pos_swap's rotation with ``slot``'s
    table at ``positions``, their features paired as ``pairing`` says (to the tolerance of their dtype)."""
    cos, sin = rope.cos_sin(positions, slot.inv_freq, slot.attention_scaling, unrotated[0].dtype)
    rot_dim = cos.shape[-1]
    for before, after in zip(unrotated, rotated):
        if rot_dim > before.shape[-1]:
            return False
        before, after = rope.to_half_pairs(before, rot_dim, pairing), rope.to_half_pairs(after, rot_dim, pairing)
        expected = rope.rotate(before, cos, sin)
        tolerance = 1e-4 if before.dtype == torch.float32 else 2e-2
        if not torch.allclose(expected.float(), after.float(), atol=tolerance * float(after.abs().max()), rtol=0):
            return False
    return True


def _lora_targets(model: nn.Module, attention: list[nn.Module], names: dict) -> tuple[tuple[str, ...], bool]:
    """The projections inside the attention modules (module-name suffixes peft matches), qualified by the
    attention module's own name where the bare name also ends a projection outside attention (NoPE layers' own
    attention counts as attention); and whether they are GPT-2's Conv1D (weights stored as (in, out))."""
    kinds = {type(m) for m in attention}
    inside = {id(p) for m in model.base_model.modules() if type(m) in kinds for p in m.modules()}
    projections = [(name, p) for m in attention for name, p in m.named_modules() if isinstance(p, (nn.Linear, Conv1D))]
    elsewhere = [names[id(p)] for p in model.base_model.modules()
                 if isinstance(p, (nn.Linear, Conv1D)) and id(p) not in inside]  # fmt: skip
    owner = names[id(attention[0])].rsplit(".", 1)[-1]
    targets = []
    for name, _ in projections:
        clash = any(other == name or other.endswith("." + name) for other in elsewhere)
        target = f"{owner}.{name}" if clash else name
        if target not in targets:
            targets.append(target)
    return tuple(targets), any(isinstance(p, Conv1D) for _, p in projections)
