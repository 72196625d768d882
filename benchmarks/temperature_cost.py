"""The attention-temperature modifier's cost over its base scheme: forward time of ``SCHEME`` against
``SCHEME + temperature`` (issue 22's target: <= 1.02x on the fused path).

    python benchmarks/temperature_cost.py --layers 4 --threads 1 --lengths 4096 --repeats 5
    python benchmarks/temperature_cost.py --schemes rerope string --temperature ssmax --out /tmp/temperature_cost

For each base scheme and length, the base and the base with the temperature run alternately on the same model
(patched, measured, unpatched), and the ratio is the median over ``--repeats`` pairs. ``yarn`` (a static rotary
table, native attention) shows the cost of routing attention through pos_swap for the temperature alone.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import pos_swap
from pos_swap import offline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrofit_cost import keep_layers  # noqa: E402 - the sibling benchmark's layer cut, shared

BASES = {"rerope": dict(window=1024), "string": {}, "alibi": {}, "yarn": dict(factor=4.0)}
TARGET = 1.02


def timed(model, ids) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.base_model(ids)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:smollm2")
    parser.add_argument("--schemes", nargs="+", default=list(BASES), help=f"base schemes (default: {' '.join(BASES)})")
    parser.add_argument("--temperature", default="logn", help="logn, llama4 or ssmax (default: logn)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers")
    parser.add_argument("--threads", type=int, help="CPU threads for torch; 1 is steadier on a busy machine")
    parser.add_argument("--out", type=Path, help="folder for results.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(offline.resolve(args.model), attn_implementation="sdpa").eval()
    if args.layers:
        keep_layers(model, args.layers)
    # a length of 2 makes every row past the first scale, so the cost is measured on real work at any length
    modifier = dict(temperature=args.temperature, temperature_length=2)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for scheme in tqdm(args.schemes, desc="temperature cost", unit="scheme"):
        for length in args.lengths:
            ids = torch.randint(100, 40000, (1, length), generator=generator)
            times = {"base": [], "temperature": []}
            for repeat in range(args.repeats + 1):  # the first pair warms up
                for label, extra in (("base", {}), ("temperature", modifier)):
                    with pos_swap.patched(model, scheme, **BASES.get(scheme, {}), **extra):
                        elapsed = timed(model, ids)
                    if repeat:
                        times[label].append(elapsed)
            ratio = statistics.median(t / b for b, t in zip(times["base"], times["temperature"]))
            row = dict(scheme=scheme, length=length, base_s=statistics.median(times["base"]),
                       temperature_s=statistics.median(times["temperature"]), ratio=ratio)  # fmt: skip
            rows.append(row)
            tqdm.write(f"{scheme:8s} {length:6d}  base {row['base_s']:.3f} s  +{args.temperature} "
                       f"{row['temperature_s']:.3f} s  ratio {ratio:.3f} ({'ok' if ratio <= TARGET else 'over'} "
                       f"the {TARGET}x target)")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (args.out / "results.json").write_text(json.dumps(dict(settings=settings, rows=rows), indent=2))


if __name__ == "__main__":
    main()
