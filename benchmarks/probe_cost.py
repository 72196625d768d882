"""A probed forward (every attention statistic recorded through ``pos_swap.observe``) against a plain one: time and
peak memory at growing lengths, in the same run.

    python benchmarks/probe_cost.py                                        # SmolLM2-135M, 1024 4096, CPU
    python benchmarks/probe_cost.py --lengths 4096 16384 --device cuda --out results/probe_cost
    python benchmarks/probe_cost.py --scheme dynamic-yarn --lengths 2048 --threads 1   # probing a patched model

Each length runs plain and probed forwards alternately (``--repeats`` pairs) and reports medians; the ratio is
probed / plain. Memory is measured as in ``patch_overhead.py`` (whose ``measure`` this script reuses): the CUDA
allocator's peak, or on CPU the growth of the peak RSS with glibc's malloc threshold fixed first, as in
``retrofit_cost.py``. The transformer body is timed without the LM head. Targets (issue 12): probed <= 1.3x plain
time; memory not growing as L^2 (the observer keeps O(L x heads x bins)).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import pos_swap
from pos_swap import offline
from pos_swap.probe.observers import attention_stats
from pos_swap.report import RunFolder, format_table, line_plot

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_overhead import measure  # noqa: E402 - the sibling benchmark's measurement, shared
from retrofit_cost import fix_malloc_threshold  # noqa: E402

TIME_TARGET = 1.3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:smollm2", help="Hub name, folder, or offline:smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--scheme", help="probe the model patched with this scheme (default: native)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating plain/probed pairs per length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch; 1 is steadier on a busy machine")
    parser.add_argument("--out", type=Path, help="folder for results.json and probe_cost.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        fix_malloc_threshold()
    model = AutoModelForCausalLM.from_pretrained(offline.resolve(args.model), attn_implementation="sdpa")
    model = model.to(args.device).eval()
    if args.scheme:
        pos_swap.patch(model, args.scheme)
    run = RunFolder(args.out, kind="probe_cost", meta=vars(args) | {"out": str(args.out)}, overwrite=True) if args.out else None
    rows = []
    for length in tqdm(args.lengths, desc="lengths"):
        ids = torch.randint(100, 10000, (1, length), generator=torch.Generator().manual_seed(0)).to(args.device)
        plain, probed = [], []
        measure(model.base_model, ids)  # warm-up: one-time allocations and kernel choices
        for _ in range(args.repeats):
            plain.append(measure(model.base_model, ids))
            with attention_stats(model):
                probed.append(measure(model.base_model, ids))
        row = {"length": length}
        for name, samples in (("plain", plain), ("probed", probed)):
            row[f"{name}_s"] = statistics.median(s for s, _ in samples)
            row[f"{name}_mib"] = statistics.median(m for _, m in samples)
        row["time_ratio"] = row["probed_s"] / row["plain_s"]
        row["memory_ratio"] = row["probed_mib"] / row["plain_mib"] if row["plain_mib"] > 1 else float("nan")
        rows.append(row)
        if run:
            run.add({"key": str(length), **row})
    print(format_table(rows, list(rows[0]), floats="{:.3f}"))
    print(f"target: probed <= {TIME_TARGET}x plain time; memory not growing as L^2")
    if run:
        lengths = [r["length"] for r in rows]
        line_plot(run.path / "probe_cost.png", {"time": (lengths, [r["time_ratio"] for r in rows]),
                                                "peak memory": (lengths, [r["memory_ratio"] for r in rows])},
                  xlabel="tokens", ylabel="probed / plain", logx=True,
                  title=f"probe cost (target {TIME_TARGET}x time), {args.model}{' + ' + args.scheme if args.scheme else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
