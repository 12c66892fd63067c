#!/usr/bin/env bash
# GPU smoke test: the toy DDPO recipe through the CLI on one CUDA device in bf16-mixed, then
# benchmarks/throughput.py on CUDA in fp32 and bf16. Exits non-zero on the first failure.
#
#   bash benchmarks/gpu_smoke.sh                          # from the repository root (or anywhere)
#   DIFFALIGN_PYTHON=/opt/venv/bin/python bash benchmarks/gpu_smoke.sh
#
# Environment: DIFFALIGN_PYTHON (default python3), EPOCHS (training epochs, default 10),
# BATCH_SIZE (throughput batch, default 256), SMOKE_DEVICE=cpu (run the same steps on the CPU,
# to check the script itself on a machine without a GPU).
# diffalign need not be installed: when `import diffalign` fails, a temporary folder maps
# core/, modalities/ and rewards/ onto diffalign.* (what pyproject.toml's package-dir does) on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${DIFFALIGN_PYTHON:-python3}"
EPOCHS="${EPOCHS:-10}"
BATCH_SIZE="${BATCH_SIZE:-256}"
DEVICE="${SMOKE_DEVICE:-cuda}"
case "$DEVICE" in
  cuda) ACCELERATOR=gpu ;;
  cpu) ACCELERATOR=cpu ;;
  *) echo "gpu_smoke: SMOKE_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if ! "$PY" -c "import diffalign.core" 2>/dev/null; then
  mkdir -p "$TMP/pkg/diffalign"
  for d in core modalities rewards; do ln -s "$PWD/$d" "$TMP/pkg/diffalign/$d"; done
  export PYTHONPATH="$TMP/pkg${PYTHONPATH:+:$PYTHONPATH}"
  echo "== diffalign is not installed for $PY: importing it from $PWD through $TMP/pkg"
fi

echo "== environment"
"$PY" - "$DEVICE" <<'EOF'
import sys

import diffalign.core
import lightning
import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"lightning {lightning.__version__}, diffalign from {diffalign.core.__path__[0]}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_smoke: torch.cuda.is_available() is False")
    print(f"device: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF

echo "== diffalign fit: toy DDPO on $DEVICE, bf16-mixed, $EPOCHS epochs"
"$PY" -m diffalign.core.cli fit --config recipes/toy/ddpo_mode.yaml \
  --trainer.accelerator "$ACCELERATOR" --trainer.devices 1 --trainer.precision bf16-mixed \
  --trainer.max_epochs "$EPOCHS" --trainer.enable_progress_bar false --run_root "$TMP/runs"

"$PY" - "$TMP/runs" <<'EOF'
import json
import math
import sys
from pathlib import Path

paths = sorted(Path(sys.argv[1]).glob("ddpo_mode/version_*/summary.json"))
if not paths:
    sys.exit("gpu_smoke: the run wrote no summary.json")
s = json.loads(paths[-1].read_text())
before, after = s.get("reward_before"), s.get("reward_after")
print(f"summary: reward_before {before}, reward_after {after}, steps {s['global_step']}, {s['wall_seconds']} s")
if not (isinstance(after, float) and math.isfinite(after) and after > before):
    sys.exit("gpu_smoke: reward did not improve over training")
EOF

for precision in 32 bf16; do
  echo "== throughput: $DEVICE, precision $precision, batch $BATCH_SIZE"
  "$PY" benchmarks/throughput.py --config recipes/toy/ddpo_mode.yaml --device "$DEVICE" \
    --precision "$precision" --batch-size "$BATCH_SIZE"
done
echo "== gpu_smoke: OK"
