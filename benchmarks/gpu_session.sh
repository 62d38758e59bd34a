#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one session, most important first; each step
# writes its results under OUT as soon as it ends, so a session cut short keeps what it did.
#
#   DATA=path/to/data OUT=benchmarks/out bash benchmarks/gpu_session.sh
#
# Needs torch with CUDA, accelerate, tensorboard, rich, click, safetensors (the package itself
# is taken from this checkout through PYTHONPATH: nothing is installed).
source "$(dirname "$0")/gpu_env.sh"
# Only JSON is kept under OUT (the tables are made again from it): at most 8 files come back.
step() { rm -f "$OUT"/*.md; echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__)'

step "1. speed: seed loop vs toolkit (cnn-bn), and time to 0.92/0.93 test accuracy"
python benchmarks/benchmark.py --data-dir "$DATA" --models cnn-bn --seed-seconds 10 \
    --epochs 4 --accuracy --seed-budget 45 --out "$OUT"

step "2. candidates for the default cnn-bn recipe (full runs, bf16)"
python benchmarks/recipes.py --data-dir "$DATA" --set default-sweep --mixed-precision bf16 --out "$OUT"

step "3. high-accuracy recipe: 30 s and 60 s of training"
python benchmarks/recipes.py --data-dir "$DATA" --set high-accuracy --mixed-precision bf16 --out "$OUT"

step "4. the seed's table with the default recipe"
# (the cnn-bn row is step 1's default run)
python benchmarks/recipes.py --data-dir "$DATA" --set seed-table --models mlp,cnn \
    --mixed-precision bf16 --out "$OUT"

step "5. fp16 (loss scaling) smoke run"
python -m fmnist_accel.train --model cnn-bn --epochs 2 --mixed-precision fp16 \
    --data-dir "$DATA" --output-dir /tmp/fp16 --run-name fp16 &&
    python -m fmnist_accel eval last --run-dir /tmp/fp16/fp16 --json | cut -c1-200
step "done"
