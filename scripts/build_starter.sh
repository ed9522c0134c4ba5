#!/usr/bin/env bash
# Build the starter model shipped in engine/starter/ from the chitchat-dataset corpus.
#
# What it makes: a GPT-2 trained from scratch in the DialoGPT format (turns joined by
# <|endoftext|>) with a fresh byte-level BPE tokenizer of 8k tokens, 256-token windows of
# whole turns, saved as fp16 safetensors with metrics.json and loss_curve.png next to it.
#
#   scripts/build_starter.sh                         # CPU: 4 layers x 192 (3.4M params, 6.7 MB), 10 minutes
#   scripts/build_starter.sh --minutes 1 --output /tmp/starter-test
#   scripts/build_starter.sh --device cuda --size large --minutes 10   # GPU: 6 x 384 (13.8M params, 27.6 MB)
#
# Options: --minutes N (training time budget, default 10; reading the corpus, training the
# tokenizer and the first evaluation add about half a minute), --device cpu|cuda|auto,
# --size small|large, --output DIR (default engine/starter, replaced if it exists).
# Anything after "--" goes to `mynah train` unchanged (e.g. -- --seed 1 --threads 2).
#
# The learning-rate schedule (warmup, cosine) ends with the time budget. On 2 CPU cores the
# small model trains at ~2,000 tokens/s when the machine is otherwise idle: 10 minutes is
# ~1.2M tokens, under half an epoch, and the loss is still falling when it stops. On one
# H200 the large model runs at ~420k tokens/s and early-stops (--patience 4) after ~2
# minutes and ~15 epochs at validation loss 4.18 (perplexity 65).
set -euo pipefail

minutes=10
device=cpu
size=small
output=""
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --minutes) minutes="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --size) size="$2"; shift 2 ;;
        --output) output="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "build_starter.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

case "$size" in
    small) model=(--n-layer 4 --n-embd 192 --n-head 4 --batch-size 16 --lr 2e-3 --warmup-steps 50 --eval-every 150) ;;
    large) model=(--n-layer 6 --n-embd 384 --n-head 6 --n-positions 512 --batch-size 64 --lr 1e-3 --warmup-steps 100 --eval-every 100) ;;
    *) echo "build_starter.sh: --size is small or large" >&2; exit 2 ;;
esac

[[ -n "$output" ]] && output="$(realpath -m "$output")"   # relative to where it was called from
cd "$(dirname "$0")/.."
output="${output:-engine/starter}"
if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi

set -x
"$python" -m scripts.cli train \
    --corpus chitchat \
    --init scratch --tokenizer-type bpe --vocab-size 8000 --format dialogpt \
    --max-len 256 --n-positions 256 --dropout 0.1 \
    "${model[@]}" \
    --valid-fraction 0.02 --epochs 50 --patience 4 --max-minutes "$minutes" \
    --device "$device" --seed 0 --save-dtype float16 \
    --output "$output" --overwrite \
    "${extra[@]}"
