#!/usr/bin/env bash
# Stable Diffusion 1.5 at 512 px on one GPU: diffalign beside TRL 0.23.1 on the identical workload, in one run
# (DDPO with LoRA r = 4, AlignProp with LoRA and random truncation, DDPO with full fine-tuning), then the
# per-lever micro-benchmark if time is left. One table at the end; $OUT/sd_gpu.{md,json,log}.
# What it measures and how: benchmarks/sd_gpu.py's docstring and docs/performance.md.
#
# ---- The GPU session (one H200; 15 minutes of device time in all, starts and idle time included) ----------
# 1. Here, before the device call, in the repository root: `bash benchmarks/sd_gpu.sh download-wheels`
#    (pip download of diffusers==0.42.1 trl==0.23.1 peft==0.21.2 as pure-Python wheels into .whl/, 7.5 MB,
#    git-ignored: the GPU image has torch, transformers, accelerate, lightning, peft of its own, not diffusers
#    or trl; benchmarks/peer/README.md). Nothing else needs carrying; no recipe is parsed (no jsonargparse).
# 2. The device call: command `bash benchmarks/sd_gpu.sh`, carry [".whl"], timeout_s 560. $OUT (set by the
#    device tool) receives sd_gpu.json, sd_gpu.md, sd_gpu.log; the 4 GB pipeline stays in $WORK, outside it.
#    Budget: the script stops starting work at BUDGET=510 s (a row pair starts only if both halves fit),
#    writes the JSON and table after every row, and is killed at BUDGET + 20 s whatever happens: < 9 min.
#    Expected: wheels 10 s, preflight 10 s, building + saving the SD 1.5 architecture (4 GB) 30-90 s, then
#    6 row processes of 2 epochs (TRL at 0.64 samples/s needs about 25 s an epoch for DDPO, 16 s for
#    AlignProp; each process also starts, imports and loads the model in 15-25 s): about 6-7 min; the lever
#    micro-benchmark only runs in what is left (its compile cases need 240 s and are skipped then).
# 3. A second call only if the first failed early and >= 5 min of device time is left (a fresh machine
#    starts in minutes), e.g. the rows that did not finish: ROWS=ddpo_full LEVERS=0 BUDGET=200 (timeout_s
#    240). Then give the machine back.
#
# ---- CPU dry run (what tests/benchmarks/test_sd_gpu.py runs) ---------------------------------------------
#    DEVICE=cpu PRESET=tiny PEER_SITE=.peer/trl bash benchmarks/sd_gpu.sh
#    (TRL: python -m pip install --no-deps --target .peer/trl trl==0.23.1; never into the project's venv)
#
# Environment (all optional): DIFFALIGN_PYTHON (default .venv/bin/python if present, else python3), DEVICE cuda|cpu, PRESET sd15|tiny, OUT,
# WORK (pipeline + per-row JSON; default $TMPDIR/sd_gpu_work, outside $OUT), BUDGET (s), WHL_DIR (.whl),
# SITE (where the wheels go), PEER_SITE (a folder with TRL, used when there are no wheels), THREADS,
# overrides of the preset: EPOCHS RES STEPS DDPO_BATCH DDPO_BATCHES AP_BATCH AP_ACCUM MP; ROWS (comma list of
# ddpo_lora,alignprop_lora,ddpo_full; empty = none), FRAMEWORKS (trl,diffalign), REPEATS, LEVERS (1/0),
# LEVER_FLAGS, DIFFALIGN_FLAGS (e.g. "--no-channels-last"), EXTRA (";"-separated ROW:FLAGS extra diffalign rows;
# sd15 default: the 24 GiB preset's row, see below), REQUIRE_PEER=1 (fail when TRL cannot be imported; by
# default only diffalign's rows run then, said loudly).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = download-wheels ]; then  # here, never on the GPU machine (it has no registry)
  exec "${DIFFALIGN_PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "${WHL_DIR:-.whl}" diffusers==0.42.1 trl==0.23.1 peft==0.21.2
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY="${DIFFALIGN_PYTHON:-}"
if [ -z "$PY" ]; then  # the project's .venv (Makefile) when there is one, else the machine's python3
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "sd_gpu: $PY cannot import torch: set DIFFALIGN_PYTHON to the interpreter of the project's environment"
  exit 1
fi
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-sd15}"
OUT="${OUT:-$PWD/sd_gpu_out}"
WORK="${WORK:-${TMPDIR:-/tmp}/sd_gpu_work}"
BUDGET="${BUDGET:-510}"
WHL_DIR="${WHL_DIR:-.whl}"
SITE="${SITE:-${TMPDIR:-/tmp}/sd_gpu_site}"
mkdir -p "$OUT" "$WORK"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# 1. carried wheels (GPU) or a TRL folder (CPU) ahead of the interpreter's own packages
if compgen -G "$WHL_DIR/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL_DIR"/*.whl
  PEER_SITE="$SITE"
  echo "== installed $(ls "$WHL_DIR"/*.whl | wc -l) wheels into $SITE"
fi
PEER_SITE="${PEER_SITE:-}"
if [ -n "$PEER_SITE" ]; then
  PEER_SITE="$(cd "$PEER_SITE" && pwd)"
  export PYTHONPATH="$PEER_SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. THIS checkout's diffalign importable without installing it (what pyproject.toml's package-dir maps)
if ! "$PY" -c "import os, sys, diffalign.core as c; sys.exit(os.path.realpath(c.__path__[0]) != os.path.realpath('core'))" 2>/dev/null; then
  mkdir -p "$TMP/pkg/diffalign"
  for d in core modalities rewards; do ln -s "$PWD/$d" "$TMP/pkg/diffalign/$d"; done
  export PYTHONPATH="$TMP/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi

# 3. preflight: versions, TRL and diffalign import, the device
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - "$DEVICE" "$TMP/no_peer" <<'EOF'
import importlib.metadata as md
import sys

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda available", torch.cuda.is_available())


def version(p: str) -> str:
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "missing"


print(" ".join(f"{p}={version(p)}" for p in ("trl", "diffusers", "transformers", "accelerate", "peft", "lightning")))
import diffalign.core  # noqa: F401
from diffalign.modalities.image.stable_diffusion import StableDiffusionBackbone  # noqa: F401

if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("sd_gpu: DEVICE=cuda but torch.cuda.is_available() is False")
try:
    from trl import AlignPropTrainer, DDPOTrainer  # noqa: F401
except ImportError as e:  # the peer side cannot run: said on stdout, in the JSON and in the table
    with open(sys.argv[2], "w") as f:
        f.write(f"TRL 0.23.1 cannot be imported ({e}); carry the wheels (.whl/) or set PEER_SITE")
EOF
if [ -s "$TMP/no_peer" ]; then
  echo "== WARNING: THE PEER (TRL) IS NOT RUN: $(cat "$TMP/no_peer"). Only diffalign's rows run; no ratios."
  if [ "${REQUIRE_PEER:-0}" = 1 ]; then echo "sd_gpu: REQUIRE_PEER=1 and TRL is missing"; exit 1; fi
fi

# 4. the run (each row in its own process, under one budget)
LEFT=$((${BUDGET%.*} - SECONDS))   # the budget counts from this script's start (wheels, preflight)
args=(run --preset "$PRESET" --device "$DEVICE" --out "$OUT" --work "$WORK" --budget "$LEFT")
[ -n "$PEER_SITE" ] && args+=(--peer-site "$PEER_SITE")
[ -s "$TMP/no_peer" ] && args+=(--peer-unavailable "$(cat "$TMP/no_peer")")
[ -n "${THREADS:-}" ] && args+=(--threads "$THREADS")
[ "$DEVICE" = cpu ] && [ -z "${THREADS:-}" ] && args+=(--threads 1)
for kv in EPOCHS:epochs RES:resolution STEPS:steps DDPO_BATCH:ddpo-batch DDPO_BATCHES:ddpo-batches \
          AP_BATCH:ap-batch AP_ACCUM:ap-accum MP:mp REPEATS:repeats FRAMEWORKS:frameworks; do
  var="${kv%%:*}"
  [ -n "${!var:-}" ] && args+=("--${kv#*:}" "${!var}")
done
[ -n "${ROWS+x}" ] && args+=(--rows "$ROWS")
[ "${LEVERS:-1}" = 0 ] && args+=(--no-levers)
[ -n "${LEVER_FLAGS:-}" ] && args+=("--lever-flags=$LEVER_FLAGS")
[ -n "${DIFFALIGN_FLAGS:-}" ] && args+=("--diffalign-flags=$DIFFALIGN_FLAGS")
# sd15: the 24 GiB preset's configuration (recipes/_base/image/sd15_lora_24gb.yaml) as one more diffalign row,
# after the six, for its peak memory (set EXTRA= to leave it out); the ddpo_full row is the 80 GiB preset's
if [ "$PRESET" = sd15 ] && [ -z "${EXTRA+x}" ]; then
  EXTRA="ddpo_lora:--checkpointing unet --decode-chunk-size 2 --train-batch-size 2"
fi
if [ -n "${EXTRA:-}" ]; then
  IFS=';' read -ra extras <<<"$EXTRA"
  for e in "${extras[@]}"; do args+=(--extra "$e"); done
fi
timeout -k 5 "$((LEFT + 20))" "$PY" benchmarks/sd_gpu.py "${args[@]}"
