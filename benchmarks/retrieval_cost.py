"""What a passkey sweep costs with a reused prefix against independent prefills, and whether both agree.

    python benchmarks/retrieval_cost.py                                   # SmolLM2-135M, 4k, 5 depths x 3 trials
    python benchmarks/retrieval_cost.py --length 16384 --scheme rerope:window=4096:leaky_factor=16
    python benchmarks/retrieval_cost.py --length 16384 --count-only       # tokens prefilled each way, no model

One sweep of ``--depths`` x ``--trials`` prompts at ``--length``, run twice: every prompt prefilled from scratch,
then through one cache that each prompt continues from the filler it shares with the previous one
(``pos_swap.evaluate.retrieval.sweep``). Prints wall time and prompt tokens prefilled by each, their ratios, and the
largest difference in reply and answer log-probability between the two.
"""

import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from pos_swap import offline, report
from pos_swap.evaluate import parse_schemes, retrieval
from pos_swap.loading import load
from pos_swap.evaluate.run import applied


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:smollm2", help="Hub name, folder, or offline:smollm2")
    parser.add_argument("--scheme", default="native", help="one scheme entry as in `pos-swap eval --schemes`")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="folder for results.json")
    parser.add_argument("--count-only", action="store_true", help="only count the prompt tokens each way prefills")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(offline.resolve(args.model))
    depths = [float(d) for d in args.depths.split(",")]
    cells = retrieval.retrieval_cells("passkey", [args.length], depths, args.trials)
    needles = [retrieval.needle_for(tokenizer, "passkey", *cell, seed=0) for cell in cells]
    if args.count_only:
        fresh = sum(len(n.ids) for n in needles)
        reused = fresh - sum(kept for _, kept in retrieval.reuse_plan(tokenizer, needles))
        print(f"{len(needles)} prompts of {args.length} tokens: fresh prefills {fresh} tokens, reused prefix "
              f"{reused} tokens ({reused / fresh:.2f}x)")  # fmt: skip
        return
    model, tokenizer = load(args.model, device=args.device, longest=args.length)
    (spec,) = parse_schemes(args.scheme)
    results, row = {}, {"scheme": spec.label, "length": args.length, "prompts": len(needles)}
    with applied(model, spec):
        for name, reuse in (("fresh", False), ("reused", True)):
            start = time.perf_counter()
            results[name] = dict(retrieval.sweep(model, tokenizer, needles, reuse=reuse))
            row[f"{name}_s"] = time.perf_counter() - start
            row[f"{name}_tokens"] = sum(r["prefilled"] for r in results[name].values())
    row["time_ratio"] = row["reused_s"] / row["fresh_s"]
    row["token_ratio"] = row["reused_tokens"] / row["fresh_tokens"]
    row["same_replies"] = all(results["fresh"][i]["reply"] == results["reused"][i]["reply"] for i in range(len(cells)))
    row["max_logprob_diff"] = max(abs(results["fresh"][i]["answer_logprob"] - results["reused"][i]["answer_logprob"])
                                  for i in range(len(cells)))  # fmt: skip
    row["correct"] = sum(retrieval.answer_of(r["reply"]) == needles[i].answer for i, r in results["fresh"].items())
    print(report.format_table([row], list(row), floats="{:.3g}"))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
