#!/usr/bin/env bash
# Issue 8's GPU measurements in one call: timings of every speed setting for an architecture at NFE 2 and 4,
# an fp32-vs-fast distillation that shows the two runs track each other, and a profile of the fastest compiled
# setting (where the time goes). Results go to $OUT (JSON lines, profile.txt, all stderr in stderr.log: at most
# 8 files, the device tool's limit) and a markdown summary is printed last. Each step has its own time limit,
# so a slow compile cannot take the eager figures or the tracking run with it. Usage (from the repo root):
#   OUT=/tmp/bench ARCH=cifar10 BATCH=128 bash experiments/gpu_bench.sh
# PYTHON=.venv/bin/python ARCH=tiny BATCH=8 runs the whole script on a CPU in about a minute.
set -u
OUT=${OUT:?set OUT to a folder for the results}
ARCH=${ARCH:-cifar10}
BATCH=${BATCH:-128}
TRACK_BATCH=${TRACK_BATCH:-64}
TRACK_ITERS=${TRACK_ITERS:-60}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv 2>/dev/null
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run one measurement under a time limit, keep its JSON lines
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name" >> "$OUT/stderr.log"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name" 2> >(tee -a "$OUT/stderr.log" | tail -n 3 >&2)
  echo "== $name: exit $? after $((SECONDS - t0)) s"
}
step eager.jsonl 150 "$PY" -m sfd.bench suite --arch "$ARCH" --batch "$BATCH" --nfe 2 4 --configs fp32 bf16 bf16-cl --iters 6 --json
step track.jsonl 120 "$PY" -m sfd.bench track --arch "$ARCH" --batch "$TRACK_BATCH" --nfe 2 --iters "$TRACK_ITERS" --channels-last --json
step compile.jsonl 170 "$PY" -m sfd.bench suite --arch "$ARCH" --batch "$BATCH" --nfe 2 4 --configs bf16-cl-compile --iters 6 --json
step cudagraphs.jsonl 150 "$PY" -m sfd.bench suite --arch "$ARCH" --batch "$BATCH" --nfe 2 4 --configs bf16-cl-cudagraphs --iters 6 --json
step profile.txt 150 "$PY" -m sfd.bench profile --arch "$ARCH" --batch "$BATCH" --nfe 2 --precision bf16 \
  --channels-last --compile --iters 2 --top 25
"$PY" -m sfd.bench show "$OUT"/eager.jsonl "$OUT"/compile.jsonl "$OUT"/cudagraphs.jsonl "$OUT"/track.jsonl | tee "$OUT/summary.md"
cat "$OUT/profile.txt"
