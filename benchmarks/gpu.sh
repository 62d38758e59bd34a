#!/usr/bin/env bash
# The GPU figures of issue 14 in one session on one GPU, most important first. Each run's
# figures are printed, with "met" or "not met" beside its target, and saved under OUT as soon
# as the run ends, so a session cut short keeps what it did:
#   0. the card (nvidia-smi), torch and accelerate versions;
#   1. the default cnn-bn run (`--mixed-precision bf16 --test-every-epoch`, early stopping):
#      first epoch at >= 0.93 test accuracy and its training time (target: within 10 s), epochs,
#      best-checkpoint test accuracy; eager, with --compile, and a candidate (batch 2048,
#      lr 6e-3, --compile);
#   2. fixed schedules fitted to 15 s and 45 s of training (targets 0.955 and 0.960, test
#      accuracy of the last checkpoint with its TTA, `fmnist-accel eval last --tta`): the
#      high-accuracy recipe (ResNet-9, --valid-size 0) and the accurate recipe (airbench-s).
#      A 2-epoch probe run first measures the first and the later epochs' seconds; each budget
#      then gets the first epoch and as many later ones as fit 98% of it;
#   3. cnn-bn throughput, batch 4096, bf16, --compile, 3 epochs (target: >= 700k img/s over
#      epochs 2-3);
#   4. `--recipe fast` once (a CPU recipe: its time and accuracy only), and
#   5. throughput at batch 8192: each only if it should end within TIME_BUDGET seconds.
# "Training time" is the run's own `elapsed` (metrics.jsonl): training and validation, without
# start-up, checkpoint writing or the per-epoch test evaluation; with --compile it includes the
# compilation of the first steps (the figures also give it without epoch 1's warm-up).
#
#   DATA=path/to/data OUT=benchmarks/out bash benchmarks/gpu.sh
#
# Needs torch with CUDA, accelerate, tensorboard, rich, click, safetensors; the package itself
# is taken from this checkout through PYTHONPATH (nothing is installed). Duration on one H100
# or H200: about 7 to 9 minutes. Steps 1-3 always run: 10 training processes of 10-20 s
# start-up each (about 45 s with --compile), the training itself (about 2.5 minutes, of which
# 2 x (15 + 45) s in the fitted runs) and 4 `eval --tta` processes; TIME_BUDGET (default
# 480 s) only decides whether steps 4 and 5 start. Give the command a 600 s limit. OUT gets
# four small files: machine.txt, results.jsonl (one JSON object per run, as it ends),
# results.md (the table so far) and runs.log (the last lines of each process's output).
# Exits 1 if a run failed, 2 without a CUDA device (unless TINY=1).
#
# TINY=1: the same steps on a CPU in a minute or two of CPU time, to check the script: a fake
# Fashion-MNIST (tests/support/fakedata.py, 1,000 training and 200 test images) replaces DATA,
# 1 or 2 epochs a run, budgets of 2 s and 4 s, no --compile (on a CPU it compiles C++ for minutes),
# no nvidia-smi; it then checks that every run produced its figures. The targets are not
# expected to be met there.
#
#   TINY=1 OUT=/tmp/gpu-check bash benchmarks/gpu.sh
set -uo pipefail
# DATA and OUT as given are relative to the caller's folder; the defaults to the repository's.
[[ -n ${DATA:-} ]] && DATA=$(realpath -m "$DATA")
[[ -n ${OUT:-} ]] && OUT=$(realpath -m "$OUT")
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DATA=${DATA:-data}
OUT=${OUT:-benchmarks/out}
TINY=${TINY:-0}
TIME_BUDGET=${TIME_BUDGET:-480}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
mkdir -p "$OUT"
rm -f "$OUT/machine.txt" "$OUT/results.jsonl" "$OUT/results.md" "$OUT/runs.log"
RUNS=$(mktemp -d)  # the run folders (checkpoints): not under OUT, which comes back
trap 'rm -rf "$RUNS"' EXIT

if [[ $TINY == 1 ]]; then
    DATA=$RUNS/fake-data
    "$PYTHON" -c 'import sys; sys.path.insert(0, "tests"); from support.fakedata import write_fashion_dir
write_fashion_dir(sys.argv[1], 1000, 200)' "$DATA" || exit 1
    # cnn-bn runs: 2 epochs; --valid-size scales with the fake set (200 of 60k: 3 images)
    SHORT=(--epochs 2 --valid-size 200)
    COMPILE=()
    FIT=(--budgets "2,4" --max-epochs 1)
    FAST=(--epochs 1)
    VALID=(--valid-size 200)
    EPOCHS3=2  # throughput: epoch 1 (warm-up) and one measured epoch
else
    SHORT=()
    COMPILE=(--compile)
    FIT=(--budgets "15,45")
    FAST=()
    VALID=()
    EPOCHS3=3
fi

FAILED=()
NAMES=()
bench() {  # bench KIND NAME [OPTIONS] -- TRAIN_OPTIONS
    NAMES+=("$2")
    "$PYTHON" benchmarks/time_to_accuracy.py --data-dir "$DATA" --out "$OUT" --runs-dir "$RUNS" \
        "$@" || FAILED+=("$2")
}
step() { echo; echo "=== $* ($(date +%T), ${SECONDS} s in)"; }

step "0. machine"
{
    if [[ $TINY == 1 ]]; then
        echo "TINY check on the CPU ($(nproc) cores): fake data, no --compile, tiny budgets"
    else
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    fi
    "$PYTHON" -c 'import torch, accelerate
print("torch", torch.__version__, "(CUDA", torch.version.cuda, "available:",
      str(torch.cuda.is_available()) + ")", "accelerate", accelerate.__version__)'
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date '+%F %T')"
} | tee "$OUT/machine.txt"
CUDA_CHECK='import sys, torch; sys.exit(not torch.cuda.is_available())'
if [[ $TINY != 1 ]] && ! "$PYTHON" -c "$CUDA_CHECK"; then
    echo "no CUDA device: run this on a GPU, or TINY=1 for the CPU check" >&2
    exit 2
fi
TARGET=(--target 0.93 --budget 10)

step "1. default cnn-bn run to 0.93 test accuracy (target: within 10 s of training)"
bench reach default-eager "${TARGET[@]}" -- --mixed-precision bf16 "${SHORT[@]}"
bench reach default-compile "${TARGET[@]}" -- --mixed-precision bf16 "${COMPILE[@]}" "${SHORT[@]}"
bench reach b2048-lr6e-3-compile "${TARGET[@]}" -- --batch-size 2048 --lr 6e-3 \
    --mixed-precision bf16 "${COMPILE[@]}" "${SHORT[@]}"

step "2. fixed schedules fitted to 15 s and 45 s (targets 0.955 and 0.960, eval --tta)"
bench fitted high-accuracy "${FIT[@]}" -- --recipe high-accuracy --valid-size 0 \
    --mixed-precision bf16
bench fitted accurate "${FIT[@]}" -- --recipe accurate --mixed-precision bf16

step "3. cnn-bn throughput, batch 4096, bf16, compiled (target: 700k img/s)"
bench throughput throughput-b4096 -- --batch-size 4096 --mixed-precision bf16 "${COMPILE[@]}" \
    --epochs "$EPOCHS3" --no-early-stopping "${VALID[@]}"

step "4. the fast recipe (for CPUs: its time and accuracy here), if time allows"
if ((SECONDS + 40 <= TIME_BUDGET)) || [[ $TINY == 1 ]]; then
    bench once fast -- --recipe fast --mixed-precision bf16 "${FAST[@]}"
else
    echo "skipped: ${SECONDS} s in, TIME_BUDGET ${TIME_BUDGET} s"
fi

step "5. throughput at batch 8192, if time allows"
if ((SECONDS + 60 <= TIME_BUDGET)) || [[ $TINY == 1 ]]; then
    bench throughput throughput-b8192 -- --batch-size 8192 --mixed-precision bf16 \
        "${COMPILE[@]}" --epochs "$EPOCHS3" --no-early-stopping "${VALID[@]}"
else
    echo "skipped: ${SECONDS} s in, TIME_BUDGET ${TIME_BUDGET} s"
fi

step "results"
"$PYTHON" benchmarks/time_to_accuracy.py --out "$OUT" table
"$PYTHON" benchmarks/time_to_accuracy.py --out "$OUT" check "${NAMES[@]}" || FAILED+=(check)
echo "done in ${SECONDS} s; in $OUT: $(cd "$OUT" && echo *)"
if ((${#FAILED[@]})); then
    echo "failed: ${FAILED[*]}" >&2
    exit 1
fi
