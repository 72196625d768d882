"""What a perplexity evaluation costs against plain forwards of the same window, in one process.

    python benchmarks/eval_cost.py                                  # SmolLM2-135M, 4k / 8k / 16k, CPU
    python benchmarks/eval_cost.py --lengths 1024 4096 --device cuda --out results/

Three calls per length, alternating, medians of ``--repeats``: ``model(ids)`` (the plain forward, with its
L x vocab logits), the model's backbone alone (``model.base_model(ids)``: the forward without logits), and
``pos_swap.evaluate.token_losses`` (backbone + the head and loss over chunks of positions). Targets (issue 10):
evaluation time and memory within 1.1x of the forward without logits (the backbone; issue 20 re-measured it
at 4k, 8k and 16k). Peak memory as in
patch_overhead.py: the CUDA allocator's peak, or the growth of the process's peak RSS on CPU.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from patch_overhead import measure_call
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from pos_swap import offline, report
from pos_swap.evaluate import token_losses

CALLS = {
    "forward": lambda model, ids: model(ids, use_cache=False),
    "backbone": lambda model, ids: model.base_model(input_ids=ids, use_cache=False),
    "evaluation": lambda model, ids: token_losses(model, ids),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:smollm2", help="Hub name, folder, or offline:smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="folder for results.json and eval_cost.png")
    args = parser.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(offline.resolve(args.model)).to(args.device).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in tqdm(args.lengths, desc="lengths"):
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(args.device)
        runs = {name: [] for name in CALLS}
        for _ in range(args.repeats):
            for name, call in CALLS.items():
                runs[name].append(measure_call(lambda: call(model, ids), ids.device))
        row = {"length": length}
        for name, values in runs.items():
            row[f"{name}_s"] = statistics.median(t for t, _ in values)
            row[f"{name}_mib"] = statistics.median(m for _, m in values)
        for reference in ("forward", "backbone"):
            row[f"time_x_{reference}"] = row["evaluation_s"] / row[f"{reference}_s"]
            # no growth measured (a CPU process whose peak RSS was set by an earlier call): no ratio
            grown = row[f"{reference}_mib"]
            row[f"mem_x_{reference}"] = row["evaluation_mib"] / grown if grown > 0 else math.nan
        rows.append(row)

    print(f"\nmodel {args.model} on {args.device}, median of {args.repeats} alternating runs")
    columns = ["length", "forward_s", "backbone_s", "evaluation_s", "time_x_forward", "time_x_backbone",
               "forward_mib", "backbone_mib", "evaluation_mib", "mem_x_forward", "mem_x_backbone"]  # fmt: skip
    print(report.format_table(rows, columns, floats="{:.3f}"))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
        xs = [r["length"] for r in rows]
        series = {f"{name} MiB": (xs, [r[f"{name}_mib"] for r in rows]) for name in CALLS}
        report.line_plot(args.out / "eval_cost.png", series, xlabel="tokens", ylabel="peak extra MiB",
                         title="perplexity evaluation vs plain forwards", logx=True)  # fmt: skip
        print(f"wrote {args.out / 'results.json'} and {args.out / 'eval_cost.png'}")


if __name__ == "__main__":
    main()
