#!/usr/bin/env bash
# The checks still open on one GPU, sized for one call of about 6 minutes (most important
# first; each step saves its figures under OUT before the next starts):
#   1. the high-accuracy recipe on all 60k images: 40 epochs, then the epochs that fit 30 s
#      and 58 s at the speed measured (issue 6: 0.955 in 30 s, 0.960 in 60 s);
#   2. the default cnn-bn run in bf16, eager and with --compile, test accuracy after every
#      epoch (issue 5: a full default run to 0.93 in under 15 s after start-up).
#
#   DATA=path/to/data OUT=benchmarks/out bash benchmarks/gpu_next.sh
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

echo "=== 1. high-accuracy recipe ($(date +%T))"
python benchmarks/recipes.py --data-dir "$DATA" --set high-accuracy --mixed-precision bf16 \
    --out "$OUT" | tail -8

echo "=== 2. default cnn-bn run, bf16, eager and compiled ($(date +%T))"
python - "$DATA" "$OUT" <<'PY'
import json, sys, tempfile
from pathlib import Path

sys.path.insert(0, "benchmarks")
from benchmark import toolkit_time_to_accuracy  # the --accuracy run of benchmark.py

data, out = sys.argv[1], Path(sys.argv[2])
for name, extra in [("eager", []), ("compile", ["--compile"])]:
    with tempfile.TemporaryDirectory() as tmp:
        result = toolkit_time_to_accuracy(data, Path(tmp), ["--mixed-precision", "bf16", *extra])
    (out / f"default-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    shown = ("epochs", "startup_seconds", "training_seconds", "seconds_to_0.93",
             "best_checkpoint_test_accuracy", "wall_seconds")
    print(name, {key: result[key] for key in shown}, flush=True)
PY
echo "=== done ($(date +%T))"
