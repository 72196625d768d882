"""A long stream through a KV cache: perplexity and cache memory along the stream, native against ``sinks``.

    python benchmarks/sinks_stream.py                                   # SmolLM2 (8k trained), 32k tokens of pydoc
    python benchmarks/sinks_stream.py --length 4096 --window 1020 --native-until 4096 --out /tmp/stream   # quick
    python benchmarks/sinks_stream.py --threads 1 --out runs/sinks_stream     # steadier on a shared CPU

The text (Python's pydoc topics) is fed ``--step`` tokens at a time through a cache, as a chat or a transcript
would arrive: the native model through a ``DynamicCache`` (every key kept; past the trained context its positions
are untrained), the ``sinks`` patch through its ``SinkCache`` (the first ``--sink-tokens`` tokens and the latest
``--window``). Per segment of ``--segment`` tokens it reports the perplexity, the keys the cache holds and their
memory (all layers, keys and values). The StreamingLLM claim to check (Xiao et al. 2024): perplexity stays flat far
past the trained context while the cache stays constant. ``--native-until`` stops the native stream early (its
cache, and its time per step, grow with the stream). Writes results.json, stream.png (perplexity) and
cache.png (cache memory) to ``--out``.
"""

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import pos_swap
from pos_swap import report
from pos_swap.evaluate import stream_losses
from pos_swap.loading import load, text_tokens
from pos_swap.schemes.sinks import SinkCache


def segments(losses: torch.Tensor, held: list[int], step: int, segment: int, kv_bytes_per_key: int) -> list[dict]:
    """Perplexity and cache size per ``segment`` tokens of the stream (``losses[i]`` is token i + 1's)."""
    rows = []
    for start in range(0, losses.numel(), segment):
        part = losses[start : start + segment]
        keys = held[(start + part.numel() - 1) // step]  # held after the step that fed its last input token
        rows.append({
            "end": start + part.numel() + 1, "ppl": math.exp(part.double().mean().item()), "held_keys": keys,
            "cache_mib": keys * kv_bytes_per_key / 2**20,
        })  # fmt: skip
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:smollm2", help="Hub name, folder, or offline:smollm2")
    parser.add_argument("--length", type=int, default=32768, help="tokens in the stream")
    parser.add_argument("--step", type=int, default=512, help="tokens fed per forward")
    parser.add_argument("--segment", type=int, default=2048, help="tokens per reported perplexity")
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--window", type=int, default=4092)
    parser.add_argument("--native-until", type=int, help="stop the native stream after this many tokens")
    parser.add_argument("--threads", type=int, help="torch threads (1 is steadier on a shared CPU)")
    parser.add_argument("--out", type=Path, default=Path("runs/sinks_stream"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load(args.model)
    tokens = text_tokens(tokenizer)[0][: args.length][None]
    config = model.config
    kv_bytes_per_key = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    trained = pos_swap.archs.trained_context(config)
    runs = {"native": args.native_until or args.length, "sinks": args.length}
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    run = report.RunFolder(args.out, kind="sinks_stream", meta={**settings, "trained_context": trained}, overwrite=True)
    results = {}
    for name, length in runs.items():
        ids = tokens[:, :length]
        started = time.perf_counter()
        if name == "native":
            losses, held = stream_losses(model, ids, DynamicCache(), step=args.step)
        else:
            with pos_swap.patched(model, "sinks", sink_tokens=args.sink_tokens, window=args.window):
                losses, held = stream_losses(model, ids, SinkCache(model), step=args.step)
        results[name] = {
            "seconds": time.perf_counter() - started, "ppl": math.exp(losses.double().mean().item()),
            "segments": segments(losses, held, args.step, args.segment, kv_bytes_per_key),
        }  # fmt: skip
        run.add({"key": name, **results[name]})

    columns = ["variant", "end", "ppl", "held_keys", "cache_mib"]
    rows = [{"variant": name, **row} for name, result in results.items() for row in result["segments"]]
    print(report.format_table(rows, columns))
    for name, result in results.items():
        print(f"{name}: perplexity {result['ppl']:.2f} over the stream, {result['seconds']:.0f} s")
    marks = {f"trained context ({trained})": trained}
    series = {name: ([r["end"] for r in res["segments"]], [r["ppl"] for r in res["segments"]]) for name, res in results.items()}
    report.line_plot(run.path / "stream.png", series, xlabel="position in the stream (tokens)", logy=True,
                     ylabel=f"perplexity per {args.segment} tokens", marks=marks, title="A long stream through a KV cache")  # fmt: skip
    memory = {name: ([r["end"] for r in res["segments"]], [r["cache_mib"] for r in res["segments"]]) for name, res in results.items()}
    report.line_plot(run.path / "cache.png", memory, xlabel="position in the stream (tokens)", ylabel="KV cache (MiB)",
                     marks=marks, title="KV cache along the stream")  # fmt: skip
    print(f"results and plots in {run.path}")


if __name__ == "__main__":
    main()
