#!/usr/bin/env bash
# Runs every benchmark for real, one after the other (never two at once: they would disturb each
# other), writing benchmarks/results/<name>.json and benchmarks/table_count.png.
# Usage (from the repository root, in the project's virtual environment):
#   pip install pandas            # optional, for bench_vocab's comparison only
#   bash benchmarks/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT=benchmarks/results
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
run() { echo "== $*"; "$PY" "$@"; }
run benchmarks/bench_train_step.py --profile --what-if --reps 150 --out "$OUT/train_step.json"
run benchmarks/bench_config_commands.py --rounds 20 --out "$OUT/config_commands.json"
run benchmarks/bench_vocab.py --out "$OUT/vocab.json"
run benchmarks/bench_meta_instantiate.py --out "$OUT/meta_instantiate.json"
run benchmarks/bench_table_count.py --out "$OUT/table_count.json"
run benchmarks/bench_pretrained_load.py --profile --out "$OUT/pretrained_load.json"
run benchmarks/bench_train_app.py --out "$OUT/train_app.json"
# Builds (once, then reuses) two venvs under ~/.cache/recap_embed/bench_venvs: about 4 minutes the first time.
run benchmarks/bench_neighbour.py --out "$OUT/neighbour.json"
# On a CUDA machine only (without CUDA it says so and exits 0): BENCHMARKS.md section 9.
run benchmarks/gpu_check.py --out "$OUT/gpu_check.json"
# Optional: the same train step with 2 torch threads (on a shared 2-core machine this mostly shows
# how badly 2-thread regions stall; see BENCHMARKS.md "Method").
# run benchmarks/bench_train_step.py --threads 2 --what-if --reps 80 --out "$OUT/train_step_2threads.json"
