"""Which RoPE model types of the installed transformers pos_swap patches correctly: the coverage table.

For every model type that has a causal-LM class and a rotary module, build a tiny random instance from its config
class (a generic shrink of the default config), let pos_swap find its positional mechanism (a hand-written entry or
discovery, pos_swap/archs.py), and check:
  (a) static  -- ``linear`` x2 and ``yarn`` x4 patched give the float32 logits of the same weights built with
                 transformers' own ``rope_parameters``;
  (b) cache   -- under ``rerope`` (window 4) and ``dynamic-yarn`` (trained context 8, block 4, so frequencies change
                 within the test), logits of cached greedy generation equal those of recomputation without a cache;
  (c) unpatch -- removing each patch gives bit-identical logits;
  (d) native  -- ``rerope`` with a window and ``dynamic-yarn`` (where the model's rope_type is default) with a
                 trained context as long as the input rotate queries and keys at attention time (pos_swap's
                 rotation, in the pairs discovery found) with the native frequencies: their logits equal the
                 unpatched model's. (b) alone would not see a wrong pairing: cache and recomputation would share it.
A type on which pos_swap refuses the attention-time schemes (Llama 4: positions its cache cannot tell) is
``refused``, with (a) and (c) checked.
Each type is ``pass``, ``refused`` (pos_swap says why), ``failing`` (which check) or ``cannot-build`` (why).

    python benchmarks/rope_coverage.py --out rope_coverage.json          # every type (tens of minutes)
    python benchmarks/rope_coverage.py --types olmo2 mixtral --out x.json
"""

import argparse
import copy
import dataclasses
import importlib
import inspect
import json
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import pos_swap
from pos_swap import archs
from pos_swap.errors import IncompatibleSchemeError, PosSwapError, UnsupportedArchitectureError

LAYERS = 4
MAX_PARAMETERS = 5_000_000  # a shrink that leaves more than this is reported as cannot-build
SECONDS_PER_TYPE = 180
PROMPT, NEW_TOKENS = 10, 8
SHRINK = {  # config field -> tiny value, for fields whose default is a number
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim"), 64),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "n_group", "topk_group", "first_k_dense_replace"), 1),
    **dict.fromkeys(("sliding_window", "attention_chunk_size"), 8),
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 64,
    # Mamba layers of hybrids (Falcon-H1): 16 heads of 8 (the expanded width, 2 x 64), a small state; their CPU
    # reference path is slow at the defaults
    "mamba_d_ssm": 128, "mamba_n_heads": 16, "mamba_d_head": 8, "mamba_d_state": 16, "mamba_chunk_size": 16,
    "initializer_range": 0.1,  # tiny models barely react to positions at the default 0.02
}  # fmt: skip


def shrunk(name: str, default):
    """The tiny value of one numeric config field (its default when no rule applies)."""
    if name in SHRINK:
        return SHRINK[name]
    if "intermediate_size" in name or name in ("ffn_dim", "ffn_hidden_size"):
        return 64
    if name == "head_dim" or name.endswith("_head_dim"):
        return 16
    return default


def per_layer(values: list, layers: int, default_layers: int, name: str) -> list:
    """A per-layer list (one entry per default layer) cut to ``layers`` entries that keep every distinct value (so a
    hybrid keeps an attention layer), or a list of layer indices cut to those below ``layers``."""
    if len(values) == default_layers:
        distinct = list(dict.fromkeys(values))
        kept = [v for v in values[:layers]]
        for value in distinct:
            if value not in kept and distinct.index(value) < layers:
                kept[layers - 1 - distinct.index(value)] = value
        return kept
    if "layer" in name and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [v for v in values if v < layers] or [layers - 1]
    return values


def tiny_config(model_type: str):
    """The default config of ``model_type`` shrunk: small widths, LAYERS layers, few experts, token ids inside a
    small vocabulary, initializer_range 0.1; the sub-configs of a composite model (text, vision) shrunk alike."""
    return shrink_config(CONFIG_MAPPING[model_type])


def shrink_config(config_class, defaults=None):
    defaults = defaults or config_class()
    default_layers = getattr(defaults, "num_hidden_layers", None)
    kwargs = {}
    for field in dataclasses.fields(config_class):
        value = getattr(defaults, field.name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if shrunk(field.name, value) != value:
                kwargs[field.name] = shrunk(field.name, value)
        elif field.name.endswith("token_id") and value is not None:
            kwargs[field.name] = None
        elif isinstance(value, list) and value and default_layers:
            kwargs[field.name] = per_layer(value, LAYERS, default_layers, field.name)
        elif isinstance(value, transformers.PreTrainedConfig):
            kwargs[field.name] = shrink_config(type(value), value)
    kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    factors = [p.get("partial_rotary_factor", 1.0) for p in _rope_dicts(getattr(defaults, "rope_parameters", None))]
    if kwargs.get("head_dim") == 16 and any(int(16 * f) % 2 for f in factors):
        kwargs["head_dim"] = 24  # an even number of rotated features (MiMo's 0.334)
    return config_class(**kwargs)


def _rope_dicts(params) -> list[dict]:
    if not isinstance(params, dict):
        return []
    return [params] if "rope_theta" in params else [p for p in params.values() if isinstance(p, dict)]


def causal_lm_class(model_type: str):
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def has_rotary(model_type: str) -> bool:
    """Whether the modeling file of the type's causal-LM class defines a rotary embedding module."""
    module = importlib.import_module(causal_lm_class(model_type).__module__)
    return any(name.endswith("RotaryEmbedding") for name, _ in inspect.getmembers(module, inspect.isclass))


def model_types() -> list[str]:
    """Every model type with a causal-LM class and a rotary module."""
    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            if model_type in CONFIG_MAPPING and has_rotary(model_type):
                found.append(model_type)
        except (ImportError, AttributeError):  # a class that needs an optional package
            continue
    return found


def build(model_type: str, config=None):
    """A tiny random float32 instance (eval mode, sdpa where the class has it) of ``model_type``'s causal LM."""
    config = config or tiny_config(model_type)
    model_class = causal_lm_class(model_type)
    if not isinstance(config, model_class.config_class):  # a text-only class of a composite type (Qwen 3.5)
        config = config.get_text_config(decoder=True)
    with torch.device("meta"):
        size = sum(p.numel() for p in model_class._from_config(copy.deepcopy(config)).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the generic shrink leaves {size / 1e6:.0f}M parameters")
    torch.manual_seed(0)
    return model_class._from_config(config, dtype=torch.float32).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


SCALING_KEYS = ("rope_type", "factor", "attention_factor", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "truncate", "low_freq_factor", "high_freq_factor", "long_factor", "short_factor")


def hf_reference(model, rope: dict):
    """The same weights built by transformers with ``rope`` in ``rope_parameters`` (per layer type: only the
    tables pos_swap rescales), or None when the config or rotary class refuses that rope type."""
    config = copy.deepcopy(model.config)
    vars(config).pop(archs.DISCOVERED, None)
    params = copy.deepcopy(config.rope_parameters)
    for slot in archs.rotary_slots(model):
        keep = {k: v for k, v in slot.rope_parameters(model.config).items() if k not in SCALING_KEYS}
        if slot.layer_type:
            params[slot.layer_type] = {**keep, **rope}
        else:
            params = {**keep, **rope}
    config.rope_parameters = params
    if getattr(config, "head_dim", 0) is None:  # transformers' yarn reads head_dim None as a number (Mixtral)
        config.head_dim = archs.head_dim(config)
    try:
        config.validate_rope()
    except (ValueError, KeyError, TypeError):
        return None
    torch.manual_seed(0)
    try:
        reference = type(model)._from_config(config, dtype=torch.float32).eval()
    except ValueError:  # the rotary class itself refuses the rope type (RecurrentGemma's accepts default only)
        return None
    reference.load_state_dict(model.state_dict())
    return reference


def check_static(model, ids, native, skipped: list | None = None) -> list[str]:
    """(a) and (c) for ``linear`` x2 and ``yarn`` x4: problems found (empty: passed); schemes transformers has no
    reference for are appended to ``skipped``."""
    problems, skipped = [], [] if skipped is None else skipped
    trained = archs.trained_context(model.config)
    for scheme, rope in [("linear", {"rope_type": "linear", "factor": 2.0}),
                         ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": trained})]:  # fmt: skip
        reference = hf_reference(model, rope)
        with pos_swap.patched(model, scheme, factor=rope["factor"]):
            got = logits(model, ids)
        if not torch.equal(logits(model, ids), native):
            problems.append(f"unpatching {scheme} changed the logits")
        if reference is None:
            skipped.append(scheme)  # transformers refuses this rope type here (Phi-3 accepts longrope only)
            continue
        expected = logits(reference, ids)
        error = float((got - expected).abs().max())
        if error > 1e-4 * max(1.0, float(expected.abs().max())):
            problems.append(f"{scheme} differs from transformers' rope_parameters by {error:.2e}")
        if float((expected - native).abs().max()) < 1e-3:
            problems.append(f"{scheme}: the tiny model does not react to positions (the check would be vacuous)")
    return problems


def cached_generation_logits(model, ids, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation with a KV cache: the sequence ``(1, L + new)`` and the logits of each step ``(new, V)``."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    return out.sequences, torch.cat(out.logits).float()


def check_native_rotation(model, ids, native) -> list[str]:
    """(d): attention-time rotation at the native positions and frequencies gives the native logits (rerope's
    window and dynamic-yarn's trained context cover the input ``ids``; dynamic-yarn only for a model whose own
    rope_type is default, as its frequencies within the trained context are the default ones)."""
    problems, length = [], ids.shape[1]
    schemes = [("rerope", dict(window=length))]
    if all(slot.rope_parameters(model.config).get("rope_type", "default") == "default"
           for slot in archs.rotary_slots(model, every_layer_type=True)):  # else its own frequencies are not yarn's
        schemes.append(("dynamic-yarn", dict(original_max_position_embeddings=length, block=4)))  # fmt: skip
    for scheme, params in schemes:
        with pos_swap.patched(model, scheme, **params):
            got = logits(model, ids)
        error = float((got - native).abs().max())
        if error > 1e-4 * max(1.0, float(native.abs().max())):
            problems.append(f"{scheme} at native positions differs from the unpatched model by {error:.2e}")
    return problems


def check_cache(model, ids, native) -> list[str]:
    """(b) and (c) for ``rerope`` and ``dynamic-yarn``: problems found (empty: passed)."""
    problems = []
    for scheme, params in [("rerope", dict(window=4)),
                           ("dynamic-yarn", dict(original_max_position_embeddings=8, block=4))]:  # fmt: skip
        with pos_swap.patched(model, scheme, **params):
            sequence, cached = cached_generation_logits(model, ids, NEW_TOKENS)
            recomputed = logits(model, sequence)[0, ids.shape[1] - 1 : -1]
        if not torch.equal(logits(model, ids), native):
            problems.append(f"unpatching {scheme} changed the logits")
        error = float((cached - recomputed).abs().max())
        if error > 1e-4 * max(1.0, float(recomputed.abs().max())):
            problems.append(f"{scheme}: cached generation differs from recomputation by {error:.2e}")
    return problems


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout(f"took over {SECONDS_PER_TYPE} s")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def check_type(model_type: str) -> dict:
    """One row of the table: ``{"model_type", "status", "reason", "covered_by", "seconds"}``."""
    row, start = {"model_type": model_type}, time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_TYPE)
    try:
        try:
            model = build(model_type)
            if getattr(model.config, "max_position_embeddings", None) is None:  # what pos_swap's error asks for
                model.config.max_position_embeddings = SHRINK["max_position_embeddings"]
                row["note"] = "config has no max_position_embeddings: set as pos_swap's error asks"
            ids = (torch.arange(PROMPT) * 5 + 3)[None] % model.config.get_text_config().vocab_size
            native = logits(model, ids)
        except Exception as error:  # any failure of transformers to build or run the tiny model
            return {**row, "status": "cannot-build", "reason": first_line(error)}
        try:
            covered, why = archs.coverage(model)
            row["covered_by"] = covered
            if covered == "refused":
                return {**row, "status": "refused", "reason": why}
            skipped, problems = [], []
            problems += check_static(model, ids, native, skipped)
            if skipped:
                row["note"] = f"transformers refuses rope_type {' and '.join(skipped)} here: (a) not checked for it"
            problems += check_native_rotation(model, ids, native) + check_cache(model, ids, native)
        except IncompatibleSchemeError as error:  # pos_swap refuses the attention-time schemes on this model
            if problems:
                return {**row, "status": "failing", "reason": "; ".join(problems)}
            return {**row, "status": "refused", "reason": f"{error} (static schemes pass (a) and (c))"}
        except (Exception, Timeout) as error:
            problems = [first_line(error)]
        return {**row, "status": "failing" if problems else "pass", "reason": "; ".join(problems)}
    except Timeout as error:
        return {**row, "status": "cannot-build", "reason": first_line(error)}
    finally:
        signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 1)


def coverage(types: list[str]) -> list[dict]:
    rows = []
    for model_type in tqdm(types, desc="model types", file=sys.stderr):
        row = check_type(model_type)
        rows.append({**row, "seconds": row.get("seconds")})
    return rows


def counts(rows: list[dict]) -> dict:
    statuses = ("pass", "refused", "failing", "cannot-build")
    return {status: sum(row["status"] == status for row in rows) for status in statuses}


def print_table(rows: list[dict]) -> None:
    for row in rows:
        print(f"{row['model_type']:28s} {row['status']:13s} {row.get('covered_by') or '':10s} {row.get('reason', '')}")
    total = counts(rows)
    built = total["pass"] + total["refused"] + total["failing"]
    print(f"\n{len(rows)} types: " + ", ".join(f"{n} {s}" for s, n in total.items())
          + (f"; {total['pass'] / built:.0%} of the {built} that build pass" if built else ""))  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", help="model types to check (default: every causal-LM RoPE type)")
    parser.add_argument("--out", type=Path, default=Path("rope_coverage.json"), help="JSON file to write")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    types = args.types or model_types()
    rows = coverage(types)
    print_table(rows)
    args.out.write_text(json.dumps({
        "transformers": transformers.__version__, "torch": torch.__version__, "counts": counts(rows), "types": rows,
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
