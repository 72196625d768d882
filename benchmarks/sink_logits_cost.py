"""What learned sink logits (GPT-OSS's ``sinks``) cost the fused passes: ReRoPE's two passes merged by log-sum-exp
(:func:`pos_swap.fused.windowed_attention`) with and without the sink correction, on the CPU kernel, at SmolLM2's
attention shape (9 query heads, 3 key heads, head dim 64). The median time of ``--repeats`` alternating pairs.

    python benchmarks/sink_logits_cost.py --lengths 4096 --repeats 7 --threads 1
"""

import argparse
import json
import statistics
import time

import torch

from pos_swap import fused


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="CPU threads for torch; 1 is steadier on a busy machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in args.lengths:
        near = (torch.randn(1, 9, length, 64, generator=generator), torch.randn(1, 3, length, 64, generator=generator))
        far = (torch.randn(1, 9, length, 64, generator=generator), near[1])
        value = torch.randn(1, 3, length, 64, generator=generator)
        sinks = torch.randn(9, generator=generator)

        def run(with_sinks):
            return lambda: fused.windowed_attention(
                fused.CPU_FLASH, near, far, value, 0.125, 0, args.window, sinks if with_sinks else None
            )  # fmt: skip

        run(True)()  # warm-up
        pairs = [(timed(run(False)), timed(run(True))) for _ in range(args.repeats)]
        plain, sinked = statistics.median(p for p, _ in pairs), statistics.median(s for _, s in pairs)
        rows.append({"length": length, "plain_s": round(plain, 4), "with_sinks_s": round(sinked, 4),
                     "ratio": round(statistics.median(s / p for p, s in pairs), 3)})  # fmt: skip
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
