#!/usr/bin/env bash
# The check to run when a GPU machine is lent: the 0.2b preset trained for a few hundred steps in bf16 with
# --compile on the demo corpus (MFU printed from metrics.jsonl), then the tests that exercise CUDA.
# Usage: bash .ci/gpu-check.sh [STEPS]   (from the repository root; installs into .venv like `make test`)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}
make install-test >/dev/null
BIN=.venv/bin
OUT=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$BIN/matelike data demo --out "$OUT/data" >/dev/null
$BIN/matelike tokenizer train --input "$OUT/data/pretrain.jsonl" --out "$OUT/tok" --vocab-size 6400 \
    --max-chars 3000000 >/dev/null
$BIN/matelike data pack --tokenizer "$OUT/tok" --input "$OUT/data/pretrain.jsonl" --out "$OUT/train.bin" \
    --val-input "$OUT/data/pretrain_val.jsonl" --val-out "$OUT/val.bin" --workers 8 >/dev/null
$BIN/matelike pretrain --preset 0.2b --data "$OUT/train.bin" --val "$OUT/val.bin" --tokenizer "$OUT/tok" \
    --out "$OUT/pretrain" --max-steps "$STEPS" --batch-size 16 --seq-len 1024 --dtype bf16 --compile \
    --device cuda --log-every 50 --eval-every "$STEPS" --save-every 100000 --no-progress
$BIN/python - "$OUT/pretrain/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
last = [r for r in rows if "mfu" in r][-1]
print(f"0.2b bf16 --compile: step {last['step']}, {last['tokens_per_s']:.0f} tokens/s, MFU {last['mfu']:.3f}, "
      f"loss {last['loss']:.3f}, val_loss {rows[-1].get('val_loss')}")
PY
$BIN/matelike bench train --preset 0.2b --device cuda --batch-size 8 --seq-len 1024 --memory-preset 0.2b
# The tests that run on the GPU when one is visible (they skip on CPU).
$BIN/python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device.py tests/train/test_losses.py
