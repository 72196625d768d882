"""Training-free schemes on the held-out tail of a recovery run, measured by the run's own rule (every whole window
of each length over the same tokens, pooled), so a recovered model and the schemes it competes with compare on
equal terms: the same tokens, none of them trained on.

    python benchmarks/heldout_ppl.py runs/recovery/yarn4-pose --schemes rerope:window=4096:leaky_factor=16
    python benchmarks/heldout_ppl.py runs/recovery/yarn4-pose --schemes native,yarn:factor=4 --lengths 2048

The model, the text and the held-out size come from the run's results.json (``--text`` when the run read a file
that has moved). Prints the schemes beside the run's own stages and writes ``heldout_ppl.json`` in the run folder.
"""

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from pos_swap import report
from pos_swap.errors import PosSwapError
from pos_swap.evaluate.run import applied
from pos_swap.evaluate.specs import format_length, parse_lengths, parse_schemes
from pos_swap.loading import PYDOC_LABEL, load, tokenize
from pos_swap.train.data import read_source, split
from pos_swap.train.run import pooled_perplexity


def heldout_rows(model, held_out, lengths, specs, progress=True) -> list[dict]:
    """One row per scheme: its pooled perplexity at each length over ``held_out`` (the run's rule)."""
    rows = []
    for spec in tqdm(specs, desc="schemes", disable=not progress):
        with applied(model, spec):
            rows.append({"stage": spec.label, **{format_length(n): pooled_perplexity(model, held_out, n)["ppl"]
                                                 for n in lengths}})  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a pos-swap finetune run folder")
    parser.add_argument("--schemes", type=parse_schemes, required=True, help="comma-separated, as in pos-swap eval")
    parser.add_argument("--lengths", type=parse_lengths, help="comma-separated, e.g. 2k,32k (default: the run's)")
    parser.add_argument("--text", help="the run's text file or folder, if it has moved")
    args = parser.parse_args(argv)
    try:
        saved = json.loads((args.run / "results.json").read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"'{args.run}' holds no readable finetune results.json ({error}); give a pos-swap finetune run folder.")
    meta = saved["meta"]
    stages = [c for c in saved["cells"] if "stage" in c]
    lengths = args.lengths or sorted({c["length"] for c in stages})
    text = args.text or (None if meta["text"] == PYDOC_LABEL else meta["text"])
    try:
        content, label = read_source(text)
        model, tokenizer = load(meta["model"], dtype="float32", longest=max(lengths))
        _, held_out = split(tokenize(tokenizer, content, label), meta["seq_len"], meta["held_out_tokens"])  # the run's
        rows = heldout_rows(model, held_out, lengths, args.schemes)
    except PosSwapError as error:
        sys.exit(str(error))
    run_rows = [{"stage": f"run: {stage}", **{format_length(n): next((c["ppl"] for c in stages if c["stage"] == stage
                                                                        and c["length"] == n), None) for n in lengths}}
                for stage in ("before", "swapped", "recovered")]  # fmt: skip
    columns = ["stage"] + [format_length(n) for n in lengths]
    print(f"\n{meta['model']}, the last {meta['held_out_tokens']} tokens of {label} (run: {meta['scheme']})")
    print(report.format_table(run_rows + rows, columns, floats="{:.2f}"))
    (args.run / "heldout_ppl.json").write_text(json.dumps({"held_out_tokens": meta["held_out_tokens"], "rows": rows},
                                                          indent=1))  # fmt: skip
    print(f"wrote {args.run / 'heldout_ppl.json'}")


if __name__ == "__main__":
    main()
