"""Perplexity of the packaged SmolLM2 (trained on 8k tokens) on Python's documentation at several lengths,
native and under RoPE-scaling schemes. Writes a JSON table and a PNG plot.

    python examples/long_context_perplexity.py --lengths 2048 8192 16384 --out ppl/
"""

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import pos_swap
from pos_swap import offline

SCHEMES = {"native": None, "yarn x2": ("yarn", dict(factor=2.0)), "dynamic x2": ("dynamic", dict(factor=2.0)),
           "dynamic-yarn": ("dynamic-yarn", {})}  # fmt: skip


def perplexity(model, ids) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids, use_cache=False).loss.item())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--out", type=Path, default=Path("ppl"))
    args = parser.parse_args(argv)

    path = offline.resolve(args.model)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = AutoTokenizer.from_pretrained(path)(offline.pydoc_text(), return_tensors="pt").input_ids
    results = {}
    for name, spec in tqdm(SCHEMES.items(), desc="schemes"):
        handle = pos_swap.patch(model, spec[0], **spec[1]) if spec else None
        results[name] = {length: perplexity(model, tokens[:, :length]) for length in tqdm(args.lengths, leave=False)}
        if handle:
            handle.remove()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perplexity.json").write_text(json.dumps(results, indent=2))
    print(f"{'':14s}" + "".join(f"{length:>10d}" for length in args.lengths))
    for name, row in results.items():
        print(f"{name:14s}" + "".join(f"{row[length]:10.2f}" for length in args.lengths))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in results.items():
        ax.plot(args.lengths, [row[length] for length in args.lengths], marker="o", label=name)
    ax.axvline(8192, color="gray", lw=0.8, ls="--", label="trained context")
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="perplexity", title="SmolLM2-135M on pydoc text")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "perplexity.png", dpi=120)
    print(f"wrote {args.out / 'perplexity.json'} and {args.out / 'perplexity.png'}")


if __name__ == "__main__":
    main()
