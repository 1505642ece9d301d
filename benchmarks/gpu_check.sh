#!/usr/bin/env bash
# The whole GPU check in one go (correctness, speed, the commands on a real model), for a machine lent
# for minutes: every part is bounded in time and logs to OUT, and a part that fails does not stop the next.
#
#   benchmarks/gpu_check.sh CHECKPOINT DATA_DIR OUT_DIR
#
# CHECKPOINT: a trained checkpoint (train-exits done; its stored threshold is timed), DATA_DIR: a folder
# with train/validation/test.jsonl (the movie reviews), OUT_DIR: where the logs and JSON go.
set -u
CK=$1; DATA=$2; OUT=$3
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DEEBERT_NO_PROGRESS=1 HF_HUB_OFFLINE=1
t() { local s=$SECONDS; "$@"; echo "[rc=$? in $((SECONDS - s)) s: $*]"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, transformers, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. correctness: pytest -m cuda"
t timeout 150 "$PY" -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider -rs 2>&1 | tail -n 40 | tee "$OUT/pytest.txt"

echo "== 2. speed: benchmarks/bench_gpu.py"
t timeout 200 "$PY" benchmarks/bench_gpu.py --checkpoint "$CK" --data "$DATA" --layer-costs --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.txt"

echo "== 3. the commands with --device cuda on the real model"
{
  t timeout 90 "$PY" -m deebert_cli predict --checkpoint "$CK" --device cpu --format jsonl --input "$DATA/test.txt" --output "$OUT/p_cpu.jsonl"
  for v in "shrink fp32" "refill fp32" "shrink bf16" "shrink fp16"; do
    set -- $v
    t timeout 60 "$PY" -m deebert_cli predict --checkpoint "$CK" --device cuda --engine "$1" --precision "$2" --format jsonl \
      --input "$DATA/test.txt" --output "$OUT/p_cuda_$1_$2.jsonl"
    "$PY" - "$OUT/p_cpu.jsonl" "$OUT/p_cuda_$1_$2.jsonl" <<'PYEOF'
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
print(f"  vs cpu fp32: {len(b)} rows, labels differ {sum(x['label'] != y['label'] for x, y in zip(a, b))}, "
      f"exit layers differ {sum(x['exit_layer'] != y['exit_layer'] for x, y in zip(a, b))}, "
      f"max |confidence diff| {max(abs(x['confidence'] - y['confidence']) for x, y in zip(a, b)):.2e}")
PYEOF
  done
  t timeout 90 "$PY" -m deebert_cli analyze --checkpoint "$CK" --device cuda --json "$OUT/analyze_cuda.json" --examples 0
  t timeout 90 "$PY" -m deebert_cli finetune --model "$CK" --dataset "$DATA" --epochs 1 --device cuda --precision bf16 --output /tmp/ft-cuda
  t timeout 90 "$PY" -m deebert_cli train-exits --checkpoint /tmp/ft-cuda --device cuda --precision bf16
} 2>&1 | tee "$OUT/commands.txt"
