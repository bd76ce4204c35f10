#!/usr/bin/env bash
# The GPU figures of issue 16 in one device call (the device tool lends one H200 for 15 minutes a task, at most
# 10 minutes a command). Build the kit here first (bash benchmarks/device/build_kit.sh), then call the device
# tool's run with carry [".device-kit"], timeout_s 450 and the command
#
#   bash benchmarks/device/gpu_checks.sh
#
# It unpacks the kit into /tmp (Python packages the image lacks, a static ffprobe), records the machine, then
# runs, each under its own time limit so one overrun cannot take the other's figures with it:
#
#   1. benchmarks/bench_e2e_gpu.py: the paper profile's stages, full-size random models, $E2E_VIDEOS 720p
#      videos (default 2) -> $OUT/e2e.json (rewritten after every stage, so a timeout keeps the stages done)
#   2. benchmarks/bench_fusion_gpu.py: training step per temporal-fusion method at rate $FUSION_RATES
#      (default 4) on a full-size random Qwen2-VL-2B -> $OUT/fusion.json
#
# Logs go to $OUT/e2e.log and $OUT/fusion.log; versions and nvidia-smi to $OUT/machine.txt. $OUT is the device
# tool's folder there; elsewhere it defaults to /tmp/gpu-checks. SMOKE=1 runs both on the CPU with their
# --tiny models instead (what tests and a machine without a GPU can check).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-checks}
KIT=${KIT:-.device-kit}
SITE=${SITE:-/tmp/motionforge-site}
PY=${PY:-python3}
E2E_VIDEOS=${E2E_VIDEOS:-2}
E2E_S=${E2E_S:-300}
FUSION_RATES=${FUSION_RATES:-4}
FUSION_S=${FUSION_S:-120}
mkdir -p "$OUT"

if [ -f "$KIT/site.tar.xz" ]; then
  mkdir -p "$SITE/bin"
  tar -xJf "$KIT/site.tar.xz" -C "$SITE" || { echo "cannot unpack $KIT/site.tar.xz" >&2; exit 2; }
  if [ -f "$KIT/ffprobe.xz" ]; then
    xz -dc "$KIT/ffprobe.xz" > "$SITE/bin/ffprobe" && chmod +x "$SITE/bin/ffprobe"
  fi
  export PATH="$SITE/bin:$PATH" PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no $KIT/site.tar.xz: using the packages this Python already has" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git log -1 --format="commit %H" 2>/dev/null || true
  "$PY" - <<'EOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "pydantic", "av", "scenedetect", "sam2",
             "open_clip_torch", "xgrammar", "timm", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
  ffprobe -version 2>/dev/null | head -1 || echo "ffprobe MISSING"
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "${SMOKE:-0}" = 1 ]; then
  e2e=(--device cpu --tiny --videos 1 --shard-size 1 --batch-size 4)
  fusion=(--device cpu --tiny --rates 2 --methods none,te_fusion)
else
  e2e=(--videos "$E2E_VIDEOS")
  fusion=(--rates "$FUSION_RATES")
fi

rc=0
bench() {  # bench NAME LIMIT_S LOG ARGS...: one benchmark under its own time limit, its output also in $OUT/LOG
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$PY" "benchmarks/$name.py" "$@" 2>&1 | tee "$OUT/$log"
  local status=${PIPESTATUS[0]}
  [ "$status" = 0 ] || { echo "$name ended with $status (124: time limit)"; rc=1; }
}
bench bench_e2e_gpu "$E2E_S" e2e.log "${e2e[@]}" --dir /tmp/motionforge-e2e --json "$OUT/e2e.json"
bench bench_fusion_gpu "$FUSION_S" fusion.log "${fusion[@]}" --work /tmp/motionforge-fusion --json "$OUT/fusion.json"
exit $rc
