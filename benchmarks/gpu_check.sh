#!/usr/bin/env bash
# The one prepared GPU check of issue 29 (early exit that pays on a GPU), for a machine lent for minutes:
# about 6-8 minutes in all, every part bounded in time and logged to OUT, a part that fails does not stop
# the next. Nothing is fetched from the network (the GPU machines have none): a package the machine lacks
# is installed only from wheels carried beside the repository (WHEELS, default shared/wheels).
#
#   benchmarks/gpu_check.sh CHECKPOINT DATA_DIR OUT_DIR
#
# CHECKPOINT: the `make demo` checkpoint (MiniLM-L6, train-exits done; its stored threshold is timed),
# fp32 or carried at half size (fp16 weights: restored to fp32 in a copy here). DATA_DIR: a folder with
# test.jsonl (the movie reviews). OUT_DIR: where the logs and JSON go ($OUT on the device).
#
#   1. correctness: pytest -m cuda tests/test_cuda.py (the static engine with CUDA graphs included)
#   2. speed: benchmarks/bench_gpu.py, fp32 and bf16, batch 1/32/256/1024, MiniLM end to end and the
#      BERT-base shape with scripted exits, the profile of one layer step -> OUT/bench_gpu.json
#   3. the command: deebert predict --device cuda --engine static|auto against --device cpu
# A dry run of the plumbing on a CPU: DEVICE=cpu BENCH_EXTRA=--quick benchmarks/gpu_check.sh CK DATA OUT
set -u
CK=$1; DATA=$2; OUT=$3
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DEEBERT_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t() { local s=$SECONDS; "$@"; echo "[rc=$? in $((SECONDS - s)) s: $*]"; }

echo "== 0. the machine, and what the project needs that it lacks (from carried wheels only)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
  missing=$("$PY" -c "import importlib.util as u; print(' '.join(n for n in ('array_api_compat', 'typer', 'rich', 'safetensors', 'transformers', 'pytest') if u.find_spec(n) is None))")
  if [ -n "$missing" ]; then
    echo "missing: $missing; installing from ${WHEELS:-shared/wheels} (--no-index)"
    "$PY" -m pip install --quiet --no-index --find-links "${WHEELS:-shared/wheels}" $(echo "$missing" | tr _ -)
  fi
  "$PY" -c "import torch, transformers, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} 2>&1 | tee "$OUT/env.txt"

# a checkpoint carried with fp16 weights (to fit the carry limit) runs from an fp32 copy
CK32=$("$PY" - "$CK" <<'PYEOF'
import shutil, sys, tempfile
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
ck = Path(sys.argv[1])
w = load_file(str(ck / "model.safetensors"))
if not any(t.dtype == torch.float16 for t in w.values()):
    print(ck)
else:
    dst = Path(tempfile.mkdtemp(prefix="ck32-")) / ck.name
    shutil.copytree(ck, dst)
    save_file({k: t.float() if t.dtype == torch.float16 else t for k, t in w.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    print(dst)
PYEOF
)
echo "checkpoint: $CK32" | tee -a "$OUT/env.txt"

echo "== 1. correctness: pytest -m cuda"
t timeout 150 "$PY" -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider -q -rs 2>&1 | tail -n 40 | tee "$OUT/pytest.txt"

echo "== 2. speed: benchmarks/bench_gpu.py (the JSON is rewritten after each part)"
t timeout 330 "$PY" benchmarks/bench_gpu.py --checkpoint "$CK32" --data "$DATA" --precisions fp32,bf16 \
  --batch-sizes 1,32,256,1024 --b1-n 400 --b1-n-bert 200 --repeats 2 --layer-costs --device "$DEVICE" ${BENCH_EXTRA:-} --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.txt"

echo "== 3. deebert predict --device cuda --engine static|auto against --device cpu (fp32)"
TXT=$(mktemp --suffix .txt)
"$PY" -c "import json, sys; [print(json.loads(l)['text'].replace(chr(10), ' ')) for l in open(sys.argv[1]) if l.strip()]" "$DATA/test.jsonl" > "$TXT"
{
  t timeout 60 "$PY" -m deebert_cli predict --checkpoint "$CK32" --device cpu --format jsonl --input "$TXT" --output "$OUT/p_cpu.jsonl"
  for e in static auto; do
    t timeout 60 "$PY" -m deebert_cli predict --checkpoint "$CK32" --device "$DEVICE" --engine "$e" --batch-size 256 --format jsonl \
      --input "$TXT" --output "$OUT/p_cuda_$e.jsonl"
    "$PY" - "$OUT/p_cpu.jsonl" "$OUT/p_cuda_$e.jsonl" <<'PYEOF'
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
print(f"  vs cpu fp32: {len(b)} rows, labels differ {sum(x['label'] != y['label'] for x, y in zip(a, b))}, "
      f"exit layers differ {sum(x['exit_layer'] != y['exit_layer'] for x, y in zip(a, b))}, "
      f"max |confidence diff| {max(abs(x['confidence'] - y['confidence']) for x, y in zip(a, b)):.2e}")
PYEOF
  done
} 2>&1 | tee "$OUT/commands.txt"
