#!/bin/bash
# The figures issues 20 and 22 ask for on SmolLM2 (8k trained, pydoc text), one resumable run after another:
# passkey at 16k (5 depths x 2 trials) and at 8k, perplexity by position to 32k, recommend at 16k.
# About 2 hours on an idle 2-core CPU; rerun the same command to continue after an interruption.
#   bash benchmarks/retrieval_figures.sh runs/figures
set -e
out=${1:-runs/figures}
mkdir -p "$out"
S16="native,dynamic-yarn,self-extend:window=1026:group=3,rerope:window=4096:leaky_factor=16,string:shift=2730:local_window=128:rope_factor=1.69,dpe:window=1024:groups=[2;4;4;4]"
S32="native,yarn:factor=4,dynamic-yarn,self-extend:window=1025:group=5,rerope:window=4096:leaky_factor=16,string:shift=2730:local_window=128:rope_factor=3.69,rerope:window=4096,dual-chunk:chunk_size=6144:local_window=512"
pos-swap eval offline:smollm2 --schemes "$S16" --tasks passkey --retrieval-lengths 16k --trials 2 --out "$out/passkey16k" --resume
pos-swap eval offline:smollm2 --schemes native,string:shift=2730:local_window=128 --tasks passkey --retrieval-lengths 8k --trials 2 --out "$out/passkey8k" --resume
pos-swap eval offline:smollm2 --schemes "$S32" --lengths 8k,16k,32k --out "$out/ppl32k" --resume
pos-swap recommend offline:smollm2 --length 16k --quick --out "$out/recommend16k" --resume
