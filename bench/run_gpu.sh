#!/usr/bin/env bash
# The GPU benchmark suite at real shapes (Llama-3.2-1B architecture, ~3.5k-token clips, 1152-d features):
#   bash bench/run_gpu.sh OUT_DIR [bf16|fp16]
# Writes one JSON per benchmark into OUT_DIR and prints a table per run. Needs a GPU and peft
# (requirements-bench.txt). The data is generated first (bench/make_bench_data.py, ~40 MB, seconds).
set -euo pipefail
OUT=${1:?usage: bash bench/run_gpu.sh OUT_DIR [bf16|fp16]}
PRECISION=${2:-bf16}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -f data/bench/train.json ] || python3 bench/make_bench_data.py --out data/bench > /dev/null
for setting in "lora 1" "lora 4" "full 2"; do
  set -- $setting
  echo "== $1, micro-batch $2, $PRECISION"
  python3 bench/bench_train.py configs/bench.yaml --setting "$1" --micro-batch "$2" --precision "$PRECISION" \
    --out "$OUT/train_${1}_mb${2}_${PRECISION}.json" | tail -n 3
done
echo "== streaming, $PRECISION"
python3 bench/bench_eval.py configs/bench.yaml --precision "$PRECISION" --frames 2000 --generation-frames 40 \
  --out "$OUT/eval_${PRECISION}.json" | tail -n 5
echo "== SmolVLM2-256M and -500M shapes: extraction and training (needs Pillow, requirements-frames.txt)"
for shape in 256m 500m; do
  python3 bench/bench_smolvlm.py --shape "$shape" --precision "$PRECISION" --out "$OUT/smolvlm_${shape}_${PRECISION}.json" | tail -n 3
done
