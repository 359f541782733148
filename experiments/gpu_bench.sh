#!/usr/bin/env bash
# Issue 8's GPU measurements. All steps take about 10 minutes on an H100, more than one device call's 600 s, so
# run them as two calls: STEPS="compile cudagraphs track", then STEPS="nfe4 eager profile sample samplec". The second
# round's question: does the channel-stats group norm (which keeps channels-last activations channels-last under
# the compiler; see `python -m sfd.bench layout`) beat the native one? Each pair is timed on one card in one call:
#   compile     bf16, channels-last, compiled: native vs channel-stats group norm, NFE 2   -> compile.jsonl
#   cudagraphs  the same with CUDA graphs, NFE 2                                           -> cudagraphs.jsonl
#   track       fp32 eager vs bf16 + channels-last + channel-stats + compiled, dropout off  -> track.jsonl
#   nfe4        the CUDA-graph pair at NFE 4                                               -> cudagraphs.jsonl
#   eager       bf16 eager, + channels-last, + channel-stats (NFE 2)                       -> eager.jsonl
#   profile     where the time goes in the compiled channel-stats setting                  -> profile.txt
#   sample      evaluation speed: 10k student samples at NFE 2, batch 256                  -> sample.jsonl
#   samplec     the same compiled (eval.compile): is the compile time won back over 50k?    -> sample.jsonl
# plus env.txt and stderr.log (at most 8 files: the device tool's limit). Each step has its own time limit, so a
# slow compile cannot take the others with it. A markdown summary is printed last. Usage (from the repo root):
#   OUT=/tmp/bench ARCH=cifar10 BATCH=128 STEPS="compile cudagraphs track" bash experiments/gpu_bench.sh
# PYTHON=.venv/bin/python ARCH=tiny BATCH=8 runs every step on a CPU in a few minutes.
set -u
OUT=${OUT:?set OUT to a folder for the results}
ARCH=${ARCH:-cifar10}
BATCH=${BATCH:-128}
TRACK_BATCH=${TRACK_BATCH:-64}
TRACK_ITERS=${TRACK_ITERS:-60}
STEPS=${STEPS:-compile cudagraphs track nfe4 eager profile sample samplec}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv 2>/dev/null
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --format='commit %h %s' 2>/dev/null; } | tee "$OUT/env.txt"

step() {  # step NAME FILE SECONDS COMMAND...: if STEPS names it, run one measurement under a time limit,
  local name=$1 file=$2 limit=$3; shift 3  # appending its output to FILE
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  echo "== $name" >> "$OUT/stderr.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$file" 2> >(tee -a "$OUT/stderr.log" | tail -n 3 >&2)
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo " (time limit $limit s: killed)")" \
    | tee -a "$OUT/stderr.log"
  [ $rc -eq 0 ] || FAILED="$FAILED $name"
}
FAILED=
SUITE=("$PY" -m sfd.bench suite --arch "$ARCH" --batch "$BATCH" --iters 5 --json)
FAST=(--channels-last --group-norm channel-stats)
# In order of importance: a step cut by the device's 600 s limit loses only what comes after it.
step compile compile.jsonl 150 "${SUITE[@]}" --nfe 2 --configs bf16-cl-compile bf16-cl-compile-gn
step cudagraphs cudagraphs.jsonl 130 "${SUITE[@]}" --nfe 2 --configs bf16-cl-cudagraphs bf16-cl-cudagraphs-gn
step track track.jsonl 160 "$PY" -m sfd.bench track --arch "$ARCH" --batch "$TRACK_BATCH" --nfe 2 \
  --iters "$TRACK_ITERS" "${FAST[@]}" --compile --json
step nfe4 cudagraphs.jsonl 120 "${SUITE[@]}" --nfe 4 --configs bf16-cl-cudagraphs bf16-cl-cudagraphs-gn
step eager eager.jsonl 40 "${SUITE[@]}" --nfe 2 --configs bf16 bf16-cl bf16-cl-gn
step profile profile.txt 80 "$PY" -m sfd.bench profile --arch "$ARCH" --batch "$BATCH" --nfe 2 --precision bf16 \
  "${FAST[@]}" --compile --iters 2 --top 25
# evaluation at the CIFAR-10 config's eval.batch_size (256); sampling only (no Inception weights on the device)
step sample sample.jsonl 40 "$PY" -m sfd.bench sample --arch "$ARCH" --batch 256 --nfe 2 --num 10240 \
  --precision bf16 "${FAST[@]}" --json
step samplec sample.jsonl 110 "$PY" -m sfd.bench sample --arch "$ARCH" --batch 256 --nfe 2 --num 10240 \
  --precision bf16 "${FAST[@]}" --compile --json
shopt -s nullglob
"$PY" -m sfd.bench show "$OUT"/*.jsonl
[ -f "$OUT/profile.txt" ] && cat "$OUT/profile.txt"
if [ -n "$FAILED" ]; then echo "failed steps:$FAILED (see stderr.log)"; exit 1; fi
exit 0
