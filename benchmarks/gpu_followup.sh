#!/usr/bin/env bash
# The second, shorter GPU session: what the first (gpu_session.sh) had no time left for, most
# important first: the high-accuracy recipe (40 epochs, all 60k images, TTA), cnn-bn
# throughput at batch 4096 compiled, and a larger-batch candidate for the default recipe.
#
#   DATA=path/to/data OUT=benchmarks/out bash benchmarks/gpu_followup.sh
source "$(dirname "$0")/gpu_env.sh"
RUNS=$(mktemp -d)
train() { python -m fmnist_accel.train --data-dir "$DATA" --output-dir "$RUNS" "$@"; }
keep() { cp "$RUNS/$1/metrics.jsonl" "$OUT/$1.metrics.jsonl"; cp "$RUNS/$1/summary.json" "$OUT/$1.summary.json"; }

echo "=== high-accuracy, 40 epochs ($(date +%T))"
SECONDS=0
train --run-name ha40 --recipe high-accuracy --valid-size 0 --epochs 40 --mixed-precision bf16 |
    grep -v "^epoch [0-9]*/40 " ; echo "wall ${SECONDS} s"
keep ha40
python -m fmnist_accel eval last --run-dir "$RUNS/ha40" --data-dir "$DATA" --tta --json > "$OUT/ha40.tta.json"
cut -c1-120 "$OUT/ha40.tta.json"

echo "=== cnn-bn throughput, batch 4096, bf16, compile ($(date +%T))"
train --run-name speed4096 --batch-size 4096 --mixed-precision bf16 --compile --epochs 3 --no-early-stopping
keep speed4096

echo "=== default candidate: batch 512, lr 3e-3 ($(date +%T))"
SECONDS=0
train --run-name b512 --batch-size 512 --lr 3e-3 --mixed-precision bf16 --test-every-epoch | tail -3
echo "wall ${SECONDS} s"
keep b512
echo "=== done ($(date +%T))"
