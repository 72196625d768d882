"""Native vs each retrofit scheme (alibi, rope, sinusoidal, learned-interpolate, nope, cope, self-extend, rerope,
dual-chunk, string, dpe): forward time and peak memory at several lengths.

    python benchmarks/retrofit_cost.py                       # GPT-2-small shape (random weights), 1024 4096 8192, CPU
    python benchmarks/retrofit_cost.py --lengths 256 512 --repeats 1 --out /tmp/retro_bench     # quick check
    python benchmarks/retrofit_cost.py --model offline:smollm2 --lengths 1024 4096              # a real RoPE model
    python benchmarks/retrofit_cost.py --model offline:smollm2 --attn flex_attention --schemes alibi nope
    python benchmarks/retrofit_cost.py --device cuda --dtype bfloat16 --lengths 8192 16384 --schemes alibi --out res/
    python benchmarks/retrofit_cost.py --schemes self-extend --params '{"self-extend": {"group": 8, "window": 1024}}'
    python benchmarks/retrofit_cost.py --threads 1 --lengths 1024 4096 --repeats 3    # steadier on a shared CPU
    python benchmarks/retrofit_cost.py --model offline:smollm2 --layers 4 --lengths 4096 8192 --schemes alibi self-extend cope
    python benchmarks/retrofit_cost.py --model offline:smollm2 --layers 4 --threads 1 --lengths 4096 8192 --repeats 3 \
        --schemes self-extend rerope dual-chunk

Each (scheme, length) step runs native and patched forwards alternately in the same process and reports medians;
ratios are patched / native, so > 1 means the retrofit costs time or memory. Peak memory is measured as in
``patch_overhead.py`` (whose ``measure`` this script reuses): the CUDA allocator's peak, or on CPU the growth of the
process's peak RSS. On CPU, glibc's malloc threshold is fixed at 1 MiB first, so that freed tensors leave RSS
and each forward's peak is its own (otherwise malloc keeps chunks of up to 32 MiB and later runs read as free).
On a CPU that other processes share, ``--threads 1`` avoids OpenMP threads waiting on a busy core (a 64-token
GPT-2 forward measured 0.13-2 s with 2 threads on a loaded 2-core machine, a steady 0.18 s with 1).

By default the transformer body is timed without the LM head: its logits (length x vocabulary floats) are the
same for every scheme and at long lengths dwarf the memory that positions cost; ``--head`` includes it.

Models: ``gpt2`` (default) is ``transformers.GPT2Config()`` with random weights (12 layers, 768 wide, 12 heads,
n_positions 1024): enough for cost. GPT-2 has no positions beyond its table, so past it the native reference is
the same weights with a table as long as the longest length (``n_positions`` = that length, rows past 1024
random), i.e. what a native GPT-2 of that context would cost. ``offline:smollm2`` (or a Hub name / folder) is a
real checkpoint; on RoPE models only the schemes for rotary positions run (alibi, nope, cope, self-extend, rerope,
dual-chunk, string, dpe), the others are skipped with the reason. Schemes that are not registered in this pos_swap are skipped too.

``--layers N`` keeps the first N decoder layers: every layer costs the same, so the ratios hold with fewer layers
and a SmolLM2 run at 8k fits a shared CPU. With sdpa in inference, ``alibi``, ``self-extend``, ``rerope`` and
``dual-chunk`` run the fused passes of ``pos_swap.fused``; the other schemes with score changes (cope) run the
chunked path. ``dual-chunk``'s default chunks (1536 - 128 = 1408 tokens) make 4k and 8k inputs span several.

Targets (issues 14 and 22, CPU sdpa): alibi <= 1.15x, self-extend, rerope and string <= 1.5x, dpe <= 1.6x,
dual-chunk <= 1.8x, cope <= 2.0x native time; memory <= 1.1x at 8k. ``string`` runs with its defaults (shift = a
third of the trained context, local window 128); ``dpe`` with the groups ``recommend`` measures at 16k on an 8k
model (sizes 2, 4, 4, 4; window = trained context / 8).
"""

import argparse
import copy
import ctypes
import gc
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GPT2Config

import pos_swap
from pos_swap import archs, offline
from pos_swap.evaluate.specs import format_length

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_overhead import measure  # noqa: E402 - the sibling benchmark's measurement, shared

RETROFITS = "alibi rope sinusoidal learned-interpolate nope cope self-extend rerope dual-chunk string dpe".split()
PARAMS = {  # learned-interpolate's factor follows the longest length
    "self-extend": dict(group=4, window=512),
    "rerope": dict(window=1024),
    "dual-chunk": dict(chunk_size=1536, local_window=128),
    "dpe": dict(groups=[2, 4, 4, 4]),
}
# issues 14 and 22: forward time / native SDPA at 4k-8k
TIME_TARGETS = {"alibi": 1.15, "self-extend": 1.5, "rerope": 1.5, "dual-chunk": 1.8, "cope": 2.0, "string": 1.5,
                "dpe": 1.6}
MEMORY_TARGET, TARGET_LENGTH = 1.1, 8192  # peak memory / native at 8k
TARGETS = ", ".join(f"{s} <= {t}x" for s, t in TIME_TARGETS.items()) + f" native time; memory <= {MEMORY_TARGET}x at 8k"

MIN_MIB = 1.0  # below this a native peak is measurement noise (CPU RSS pages), and no ratio is given


def fix_malloc_threshold() -> bool:
    """Make glibc serve every allocation >= 1 MiB with its own mmap, returned on free, so RSS follows live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20)) and bool(libc.mallopt(-1, 1 << 20))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def load_model(name: str, attn: str, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    if name == "gpt2":
        model = AutoModelForCausalLM.from_config(GPT2Config(), attn_implementation=attn, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(offline.resolve(name), attn_implementation=attn, dtype=dtype)
    return model.to(device).eval()


def table_rows(model) -> int | None:
    """Positions a learned absolute table covers, or None for models without one (RoPE)."""
    spec = archs.lookup(model)
    if spec.family != archs.LEARNED:
        return None
    return archs.position_table(model).weight.shape[0] - spec.table_offset


def stretched_reference(model, length: int):
    """The same model with a position table of ``length`` rows (its own rows first, the rest random): the native
    model at lengths its own table does not cover, and as costly as a native model of that context."""
    table = archs.position_table(model)
    key = next(name for name, p in model.named_parameters() if p is table.weight)
    config = copy.deepcopy(model.config)
    config.max_position_embeddings = length  # n_positions for GPT-2 (attribute map)
    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation, dtype=model.dtype)
    state = model.state_dict()
    rows = wide.state_dict()[key].clone()
    rows[: table.weight.shape[0]] = state[key]
    state[key] = rows
    wide.load_state_dict(state)
    return wide.to(model.device).eval()


def why_skip(model, scheme: str, params: dict) -> str | None:
    """None when ``scheme`` can patch ``model`` with ``params``; otherwise why not (nothing is changed)."""
    if scheme not in pos_swap.list_schemes():
        return f"not registered in this pos_swap (registered: {', '.join(pos_swap.list_schemes())})"
    scheme_class = pos_swap.get_scheme(scheme)
    try:
        scheme_class.check_family(model, archs.lookup(model).family)
        scheme_class.configure(model, params)
    except pos_swap.PosSwapError as error:
        return str(error)
    return None


def keep_layers(model, count: int) -> None:
    """Keep the first ``count`` decoder layers: the ModuleList as long as the config's layer count."""
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == model.config.num_hidden_layers)
    del layers[count:]
    model.config.num_hidden_layers = count


def target_checks(rows: list[dict]) -> list[str]:
    """One line per scheme with a target: its time ratio at each length, its memory ratio at 8k, ok or over."""
    lines = []
    for scheme, target in TIME_TARGETS.items():
        mine = [r for r in rows if r["scheme"] == scheme and "error" not in r]
        checks = [f"time {r['time_ratio']:.2f}x at {r['length']} {'ok' if r['time_ratio'] <= target else 'over'}"
                  for r in mine]  # fmt: skip
        checks += [f"memory {r['memory_ratio']:.2f}x at {r['length']} {'ok' if r['memory_ratio'] <= MEMORY_TARGET else 'over'}"
                   for r in mine if r["length"] >= TARGET_LENGTH and r["memory_ratio"] is not None]  # fmt: skip
        if checks:
            lines.append(f"{scheme} against the targets (time <= {target}x): {', '.join(checks)}")
    return lines


def short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= 100 else text[:97] + "..."


def _ratio(value: float | None) -> str:
    return f"{value:6.3f}" if value is not None else f"{'n/a':>6s}"


def plot(rows: list[dict], schemes: list[str], title: str, path: Path) -> None:
    """Time and memory ratio against length, one line per scheme (log y once the ratios spread past 3x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [("time_ratio", "forward time, patched / native"), ("memory_ratio", "peak memory, patched / native")]
    for ax, (key, name) in zip(axes, panels):
        if not any(r.get(key) is not None for r in rows):  # e.g. memory below the measurable size
            ax.set_axis_off()
            ax.set_title(f"{name}: not measured")
            continue
        for scheme in schemes:
            mine = [r for r in rows if r["scheme"] == scheme and r.get(key) is not None]
            line, = ax.plot([r["length"] for r in mine], [r[key] for r in mine], marker="o", label=scheme)
            if key == "time_ratio" and scheme in TIME_TARGETS:  # each scheme's time target in its colour
                target = TIME_TARGETS[scheme]
                ax.axhline(target, color=line.get_color(), lw=0.8, ls="--", label=f"{scheme} target {target}x")
        if key == "memory_ratio":
            ax.axhline(MEMORY_TARGET, color="red", lw=0.8, ls="--", label=f"target {MEMORY_TARGET}x")
        ratios = [r[key] for r in rows if r.get(key) is not None]
        ax.axhline(1.0, color="gray", lw=0.8)
        log_y = ratios and min(ratios) > 0 and max(ratios) / min(ratios) > 3
        ax.set(xscale="log", yscale="log" if log_y else "linear", xlabel="sequence length", title=name)
        lengths = sorted({r["length"] for r in rows})
        ax.set_xticks(lengths, [format_length(n) for n in lengths], minor=False)  # 4k, 8k rather than 4 x 10^3
        ax.set_xticks([], minor=True)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="gpt2 (GPT2Config(), random weights), offline:smollm2, folder")
    parser.add_argument("--lengths", type=int, nargs="+", help="default 1024 4096 8192 (and 16384 on cuda)")
    parser.add_argument("--schemes", nargs="+", default=RETROFITS, help=f"default: {' '.join(RETROFITS)}")
    parser.add_argument("--params", type=json.loads, default={}, help="""JSON per scheme: '{"cope": {"npos": 32}}'""")
    parser.add_argument("--repeats", type=int, default=5, help="alternating native/patched pairs per length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex_attention"])
    parser.add_argument("--threads", type=int, help="CPU threads for torch; 1 is steadier on a busy machine")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers (same ratios, less time)")
    parser.add_argument("--head", action="store_true", help="time the whole model, LM head (logits) included")
    parser.add_argument("--out", type=Path, help="folder for results.json and retrofit_cost.png")
    args = parser.parse_args(argv)
    lengths = args.lengths or ([1024, 4096, 8192] + ([16384] if args.device.startswith("cuda") else []))
    on_cpu = not args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_fixed = on_cpu and fix_malloc_threshold()

    try:
        model = load_model(args.model, args.attn, getattr(torch, args.dtype), args.device)
    except ValueError as error:  # e.g. GPT-2 with flex_attention
        why = "GPT-2 has no flex_attention support in transformers" if args.model == "gpt2" else short(error)
        print(f"skipped: {args.model} with attention '{args.attn}': {why}. Use --attn sdpa or eager.")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            results = dict(model=args.model, attn=args.attn, skipped={"*": why}, rows=[])
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
        return
    if args.layers:
        keep_layers(model, args.layers)
    forward = (lambda m: m) if args.head else (lambda m: m.base_model)

    rows_in_table = table_rows(model)
    params = {s: dict(PARAMS.get(s, {})) for s in args.schemes}
    if "learned-interpolate" in params and rows_in_table:
        params["learned-interpolate"].setdefault("factor", max(4.0, max(lengths) / rows_in_table))
    for scheme, given in args.params.items():
        params.setdefault(scheme, {}).update(given)
    skipped = {s: why for s in args.schemes if (why := why_skip(model, s, params[s]))}
    plan = [s for s in args.schemes if s not in skipped]

    references = {}  # length -> native model
    if rows_in_table and max(lengths) > rows_in_table:
        wide = stretched_reference(model, max(lengths))
        references = {length: wide for length in lengths if length > rows_in_table}
        reference = (f"the unpatched model up to {rows_in_table} tokens; beyond, the same weights with a "
                     f"{max(lengths)}-row table (max_position_embeddings={max(lengths)}, rows >= {rows_in_table} random)")  # fmt: skip
    else:
        reference = "the unpatched model"

    generator = torch.Generator().manual_seed(0)
    rows, warm, native_failed = [], set(), {}
    steps = [(scheme, length) for scheme in plan for length in lengths]
    progress = tqdm(steps, desc="retrofit cost", unit="run")
    for scheme, length in progress:
        progress.set_postfix_str(f"{scheme} @ {length}")
        native_model = references.get(length, model)
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(args.device)
        row = dict(scheme=scheme, length=length)
        if (id(native_model), length) in native_failed:  # the native run failed at this length already
            rows.append(dict(row, error=native_failed[id(native_model), length]))
            continue
        stage = "native"
        try:
            if (id(native_model), length) not in warm:
                measure(forward(native_model), ids)  # warm-up
                warm.add((id(native_model), length))
            stage = "patched"
            with pos_swap.patched(model, scheme, **params[scheme]):
                measure(forward(model), ids)  # warm-up (flex_attention compiles here)
            native, patched = [], []
            for _ in range(args.repeats):
                stage = "native"
                native.append(measure(forward(native_model), ids))
                stage = "patched"
                with pos_swap.patched(model, scheme, **params[scheme]):
                    patched.append(measure(forward(model), ids))
            t_native, t_patched = (statistics.median(t for t, _ in runs) for runs in (native, patched))
            m_native, m_patched = (statistics.median(m for _, m in runs) for runs in (native, patched))
            row.update(native_s=t_native, patched_s=t_patched, time_ratio=t_patched / t_native,
                       native_mib=m_native, patched_mib=m_patched, memory_ratio=m_patched / m_native if m_native >= MIN_MIB else None)  # fmt: skip
        except Exception as error:  # out of memory, a scheme's bug at this length: record it and go on
            row["error"] = f"{stage}: {short(error)}"
            if stage == "native":
                native_failed[id(native_model), length] = row["error"]
            tqdm.write(f"{scheme} @ {length}: {row['error']}")
        finally:
            del ids
            gc.collect()
            if not on_cpu:
                torch.cuda.empty_cache()
        rows.append(row)

    device = torch.cuda.get_device_name(args.device) if not on_cpu else f"cpu (torch threads: {torch.get_num_threads()})"
    memory = ("CUDA allocator peak above the memory before the forward" if not on_cpu else
              "growth of the process's peak RSS during the forward" +
              (" (glibc mmap threshold fixed at 1 MiB)" if malloc_fixed else " (glibc threshold NOT fixed: noisy)"))  # fmt: skip
    header = [
        f"retrofit cost: {args.model}" + (" (GPT2Config(): 12 layers, 768 wide, 12 heads, n_positions 1024, random "
                                          "weights)" if args.model == "gpt2" else ""),  # fmt: skip
        f"device {device}, dtype {args.dtype}, attention backend {args.attn}; "
        f"{'whole model (LM head included)' if args.head else 'transformer body (no LM head)'}; "
        f"median of {args.repeats} alternating native/patched runs"
        + (f"; first {args.layers} decoder layers only" if args.layers else ""),
        f"native reference: {reference}",
        f"peak memory: {memory}",
        f"targets (issue): {TARGETS}",
        "params: " + ", ".join(f"{s} {params[s]}" for s in plan),
    ]
    print("\n" + "\n".join(header))
    for scheme, why in skipped.items():
        print(f"skipped {scheme}: {why}")
    print(f"\n{'scheme':19s} {'length':>7s} {'native s':>9s} {'patched s':>10s} {'time x':>7s} {'native MiB':>11s} "
          f"{'patched MiB':>12s} {'mem x':>6s}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['scheme']:19s} {r['length']:7d}  error: {r['error']}")
            continue
        print(f"{r['scheme']:19s} {r['length']:7d} {r['native_s']:9.3f} {r['patched_s']:10.3f} {r['time_ratio']:7.3f} "
              f"{r['native_mib']:11.1f} {r['patched_mib']:12.1f} {_ratio(r['memory_ratio'])}")  # fmt: skip
    where = "" if on_cpu and args.attn == "sdpa" else f" (targets are for CPU sdpa; this run is {args.device} {args.attn})"
    for line in target_checks(rows):
        print(f"{line}{where}")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        results = dict(model=args.model, device=device, dtype=args.dtype, attn=args.attn, head=args.head,
                       repeats=args.repeats, native_reference=reference, memory=memory, targets=TARGETS,
                       params={s: params[s] for s in plan}, skipped=skipped, rows=rows)  # fmt: skip
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        title = f"{args.model} on {args.device} ({args.dtype}, {args.attn})" + (f", first {args.layers} layers" if args.layers else "")
        plot(rows, plan, title, args.out / "retrofit_cost.png")
        print(f"wrote {args.out / 'results.json'} and {args.out / 'retrofit_cost.png'}")


if __name__ == "__main__":
    main()
