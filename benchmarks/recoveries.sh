#!/bin/bash
# Issue 24's real recoveries of SmolLM2-135M (8k trained) on the pydoc text, each one resumable command
# (LoRA r8 on q/k/v/o plus the norms; the held-out tail never trains), then retrieval of the recovered model with
# the evaluation package. docs/recovery.md has the figures and the times they took on the 2-core CPU.
#   bash benchmarks/recoveries.sh runs/recovery
set -e
out=${1:-runs/recovery}
mkdir -p "$out"
# The control: the same LoRA + norms training with no swap (what the text alone teaches), and the two trained
# retrofits at the same budget (300 steps of 256 tokens, about 12 minutes each on one thread).
recover_256() {  # NAME SCHEME-FLAGS...
    name=$1; shift
    python -m pos_swap finetune offline:smollm2 "$@" --seq-len 256 --max-steps 300 --learning-rate 4e-4 --train-norms \
        --eval-factors 1,2,4 --save-steps 100 --out "$out/$name" --resume
}
recover_256 native-control --scheme native
recover_256 nope-every4 --scheme nope --every 4
recover_256 p-rope25 --scheme p-rope --p 0.25
# RoPE -> ALiBi: 1,000 steps of 256 tokens, evaluated at 1x, 2x and 4x the training length (about 45 minutes),
# then passkey at 256 and 1k.
python -m pos_swap finetune offline:smollm2 --scheme alibi --seq-len 256 --max-steps 1000 --learning-rate 4e-4 \
    --train-norms --eval-factors 1,2,4 --save-steps 100 --out "$out/alibi" --resume
python -m pos_swap eval "$out/alibi/merged" --schemes saved --tasks passkey --retrieval-lengths 256,1k --trials 2 \
    --out "$out/alibi/passkey" --resume
# DroPE: RoPE dropped from every layer (nope), recalibrated on 512-token windows, evaluated to 16k (about 50
# minutes), then passkey at 16k, twice the trained context (native SmolLM2: 0 of 10 there).
python -m pos_swap finetune offline:smollm2 --scheme nope --seq-len 512 --max-steps 400 --learning-rate 4e-4 \
    --train-norms --eval-factors 1,2,16,32 --save-steps 100 --out "$out/drope" --resume
python -m pos_swap eval "$out/drope/merged" --schemes saved --tasks passkey --retrieval-lengths 16k \
    --out "$out/drope/passkey16k" --resume
# yarn x4 recovered with PoSE: 512-token windows whose positions span 32k, evaluated at 2k, 8k and 32k (not yet
# run: its three 32k evaluations alone take about 30 minutes on the 2-core CPU).
python -m pos_swap finetune offline:smollm2 --scheme yarn:factor=4 --seq-len 512 --target-len 32768 --pose \
    --max-steps 300 --learning-rate 4e-4 --train-norms --eval-factors 4,16 --save-steps 100 --out "$out/yarn4-pose" --resume
python -m pos_swap eval "$out/yarn4-pose/merged" --schemes saved --tasks passkey --retrieval-lengths 16k \
    --out "$out/yarn4-pose/passkey" --resume
