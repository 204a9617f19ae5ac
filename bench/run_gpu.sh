#!/usr/bin/env bash
# Run the GPU benchmarks one after another and keep their logs and JSON
# summaries in $1 (default bench-out/). Usage on a GPU machine:
#   bash bench/run_gpu.sh OUT_DIR [neural|hf|training|tests ...]
set -u
out=${1:-bench-out}; shift || true
parts=${*:-"tests neural hf training"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
date -u +%Y-%m-%dT%H:%M:%SZ > "$out/date.txt"
for part in $parts; do
  case $part in
    tests) timeout 120 python3 -m pytest -q -m gpu -p no:warnings tests 2>&1 | tail -20 > "$out/gpu-tests.log" ;;
    neural) timeout ${NEURAL_TIMEOUT:-240} python3 bench/bench_neural_annotators.py --ref-images 24 > "$out/neural.log" 2>&1 ;;
    hf) timeout ${HF_TIMEOUT:-220} python3 bench/bench_hf_annotators.py --ref-images 16 --out "$out/hf.json" > "$out/hf.log" 2>&1 ;;
    training) timeout ${TRAIN_TIMEOUT:-420} python3 bench/bench_training.py ${TRAIN_ARGS:-} > "$out/training.log" 2>&1 ;;
    e2e) timeout ${E2E_TIMEOUT:-300} python3 bench/bench_e2e.py --images ${E2E_IMAGES:-2000} ${E2E_ARGS:-} > "$out/e2e.log" 2>&1 ;;
  esac
  echo "$part exit $?" >> "$out/status.txt"
done
cat "$out/status.txt"
