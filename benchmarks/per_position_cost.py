"""Per-position length-following RoPE (``dynamic-yarn``, ``dynamic``) against native: prefill time and peak
memory at several lengths, and the time of one decode step after a long cache.

    python benchmarks/per_position_cost.py                                  # SmolLM2, 4k 8k 16k, decode at 16k
    python benchmarks/per_position_cost.py --layers 4 --threads 1 --lengths 4096 8192 16384 --decode-at 16384 \\
        --repeats 3 --out runs/per_position                                 # steadier on a shared CPU
    python benchmarks/per_position_cost.py --lengths 64 --decode-at 64 --repeats 1 --out /tmp/pp   # quick check

Per position (the default of the schemes whose frequencies follow the length), each query row uses the
frequencies of its own position rounded up to a block of 512: within the trained context all rows share the
trained length's, beyond it every block of 512 rows has its own, and its keys are rotated once per block.
Prefill runs the transformer body (no LM head) without a cache; decode feeds successive tokens, one per step, after
a cache of ``--decode-at`` tokens (built once per variant, untimed), as generation does. The patched
model is a patched copy of the native one, patched once as in a generation (its hook's tables and key buffer
persist between calls). Native and patched runs alternate in the same process and medians are reported; ratios
are patched / native. Time and memory
are measured by ``patch_overhead.py``'s ``measure_call`` (peak memory: growth of the peak RSS on CPU).

``--layers N`` keeps the first N decoder layers (every layer costs the same, so the ratios hold);
``--threads 1`` avoids OpenMP threads waiting on a busy core.

Targets (issue 14, CPU sdpa): per-position forward <= 1.15x native in prefill (4k, 8k, 16k) and <= 1.1x per
decode step at 16k.
"""

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

import pos_swap
from pos_swap import report
from pos_swap.archs import CACHE_ARGUMENT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_overhead import measure_call  # noqa: E402 - the sibling benchmarks' measurement, shared
from retrofit_cost import fix_malloc_threshold, keep_layers, load_model  # noqa: E402

SCHEMES = {"dynamic-yarn": {}, "dynamic": {"factor": 4.0}}
PREFILL_TARGET, DECODE_TARGET = 1.15, 1.1


def prefill(model, ids):
    return lambda: model.base_model(input_ids=ids, use_cache=False)


def decode_steps(model, tokens, cache):
    """Successive decode steps after ``cache``, one token of ``tokens (1, n)`` per call, as in generation: every
    step has new positions, so nothing computed for the step before is reused by mistake."""
    one_by_one = iter(tokens.split(1, dim=1))

    def step():
        model.base_model(input_ids=next(one_by_one), use_cache=True, **{CACHE_ARGUMENT: cache})

    return step


def filled_cache(model, ids) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        model.base_model(input_ids=ids, use_cache=True, **{CACHE_ARGUMENT: cache})
    return cache


def compare(native_call, patched_call, repeats: int, device) -> dict:
    """Median (seconds, MiB) of native and patched calls alternated ``repeats`` times after one warm-up each."""
    native, patched = [], []
    for _ in range(repeats + 1):
        native.append(measure_call(native_call, device))
        patched.append(measure_call(patched_call, device))
    native, patched = native[1:], patched[1:]  # the warm-up pair
    t_native, t_patched = (statistics.median(t for t, _ in runs) for runs in (native, patched))
    m_native, m_patched = (statistics.median(m for _, m in runs) for runs in (native, patched))
    return dict(native_s=t_native, patched_s=t_patched, time_ratio=t_patched / t_native, native_mib=m_native,
                patched_mib=m_patched)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:smollm2", help="Hub name, folder, or offline:smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384], help="prefill lengths")
    parser.add_argument("--decode-at", type=int, default=16384, help="cache length before the timed decode step")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--repeats", type=int, default=3, help="alternating native/patched prefills per length")
    parser.add_argument("--decode-repeats", type=int, default=10, help="successive decode steps (alternating)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch; 1 is steadier on a busy machine")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers (same ratios, less time)")
    parser.add_argument("--out", type=Path, help="folder for results.json and per_position_cost.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fix_malloc_threshold()
    model = load_model(args.model, "sdpa", torch.float32, "cpu")
    if args.layers:
        keep_layers(model, args.layers)
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    run = report.RunFolder(args.out, kind="per_position_cost", meta=vars(args) | {"out": None}, overwrite=True)

    patched = {scheme: pos_swap.patch(copy.deepcopy(model), scheme, **SCHEMES[scheme]).model for scheme in args.schemes}
    rows = []
    progress = tqdm(total=(len(args.lengths) + 1) * len(args.schemes), desc="per-position cost", unit="run")
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
        for scheme in args.schemes:
            progress.set_postfix_str(f"prefill {scheme} @ {length}")
            row = dict(key=f"prefill {scheme} {length}", step="prefill", scheme=scheme, length=length)
            rows.append(row | compare(prefill(model, ids), prefill(patched[scheme], ids), args.repeats, device))
            run.add(rows[-1])
            progress.update()

    steps = args.decode_repeats + 1  # one warm-up
    ids = torch.randint(0, model.config.vocab_size, (1, args.decode_at + steps), generator=generator)
    context, tokens = ids[:, : args.decode_at], ids[:, args.decode_at :]
    for scheme in args.schemes:
        progress.set_postfix_str(f"decode {scheme} @ {args.decode_at}")
        native_step = decode_steps(model, tokens, filled_cache(model, context))
        cache = filled_cache(patched[scheme], context)  # unrotated keys: the patch rotates them at attention time
        row = dict(key=f"decode {scheme} {args.decode_at}", step="decode", scheme=scheme, length=args.decode_at)
        step = decode_steps(patched[scheme], tokens, cache)
        rows.append(row | compare(native_step, step, args.decode_repeats, device))
        run.add(rows[-1])
        progress.update()
    progress.close()

    print(f"\nper-position cost: {args.model}, cpu (torch threads: {torch.get_num_threads()}), float32, sdpa"
          + (f", first {args.layers} decoder layers" if args.layers else "")
          + f"; medians of {args.repeats} prefills / {args.decode_repeats} decode steps, alternating with native")
    print(report.format_table(rows, ["step", "scheme", "length", "native_s", "patched_s", "time_ratio", "native_mib",
                                     "patched_mib"], floats="{:.3f}"))  # fmt: skip
    for r in rows:
        target = PREFILL_TARGET if r["step"] == "prefill" else DECODE_TARGET
        verdict = "ok" if r["time_ratio"] <= target else "over"
        print(f"target {r['step']} {r['scheme']} at {r['length']}: {r['time_ratio']:.2f}x <= {target}x {verdict}")
    if run.path:
        lines = {(r["scheme"], r["step"]): [] for r in rows}
        for r in rows:
            lines[r["scheme"], r["step"]].append((r["length"], r["time_ratio"]))
        series = {f"{scheme} {step}": tuple(zip(*points)) for (scheme, step), points in lines.items()}
        report.line_plot(run.path / "per_position_cost.png", series, xlabel="tokens (prefill) or cache (decode step)",
                         ylabel="time, per-position / native", title=f"per-position RoPE on {args.model}",
                         logx=True)  # fmt: skip
        print(f"wrote {run.path / 'results.json'} and {run.path / 'per_position_cost.png'}")


if __name__ == "__main__":
    main()
