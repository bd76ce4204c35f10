"""benchmarks/device: the kit that gpu_checks.sh carries to the GPU machine must hold, together with that
machine's image, everything the two GPU benchmarks import, since nothing can be installed there (no registry).

What is checked here without the device machine:
* every kit distribution is pinned in constraints.txt (build_kit.sh downloads exactly those versions);
* the kit's dependencies close: each requirement of a kit distribution, with its environment marker evaluated
  for the device (CPython 3.12 on linux x86-64, no extras), names a distribution in the kit or in the image's
  package list. The requirements are read from the metadata pip installed into this venv, which holds the same
  pinned versions. Only names are compared: the image list (from the device tool's KINDS.md) has no versions;
  the one version floor that matters, transformers' huggingface_hub, is noted in kit.txt. A requirement met by
  another build of the same module (opencv-python by the image's opencv-python-headless) counts as met;
* both shell scripts parse (bash -n) and call flags the benchmarks have, and neither benchmark imports
  Prefect, which the kit does not carry.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as norm  # a distribution name the way pip compares them

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "benchmarks" / "device"
# The device machine's interpreter and platform, as the device tool's KINDS.md describes the image.
DEVICE_MARKERS = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython",
                  "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                  "os_name": "posix", "extra": ""}


def names(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            out.append(line.split()[0])
    return out


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            out[norm(name)] = version.strip()
    return out


# Distributions that install the same importable module, so either one meets a requirement for the other:
# scenedetect asks for opencv-python, the image has the headless build of the same cv2.
SAME_MODULE = {"opencv-python": {"opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}}
KIT = names(DEVICE / "kit.txt")
IMAGE = names(DEVICE / "image_packages.txt")


def test_lists_are_plain_and_disjoint():
    assert len(KIT) == len({norm(n) for n in KIT}) >= 10
    assert len(IMAGE) == len({norm(n) for n in IMAGE}) >= 100
    # torch comes from the image (a CUDA build matched to its driver); the kit must not carry a second one
    assert "torch" in {norm(n) for n in IMAGE} and "torch" not in {norm(n) for n in KIT}


def test_every_kit_distribution_is_pinned_and_installed_at_its_pin():
    pinned = pins()
    for name in KIT:
        assert norm(name) in pinned, f"{name} (benchmarks/device/kit.txt) is not pinned in constraints.txt"
        assert md.version(name) == pinned[norm(name)], (
            f"{name}: this venv has {md.version(name)}, constraints.txt pins {pinned[norm(name)]}; the "
            "closure check below reads the installed metadata, so it must be the pinned version")


def device_requirements(dist: str) -> list[Requirement]:
    out = []
    for text in md.distribution(dist).requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(DEVICE_MARKERS):
            out.append(req)
    return out


def test_marker_evaluation_is_for_the_device_not_this_machine():
    """Guard for the closure check: a requirement conditional on the device's Python or platform is kept, one
    only an extra asks for is dropped."""
    assert Requirement('x; python_version >= "3.12"').marker.evaluate(DEVICE_MARKERS)
    assert not Requirement('x; python_version < "3.12"').marker.evaluate(DEVICE_MARKERS)
    assert not Requirement('x; sys_platform == "win32"').marker.evaluate(DEVICE_MARKERS)
    assert not Requirement('x; extra == "dev"').marker.evaluate(DEVICE_MARKERS)


def test_kit_dependencies_close_over_the_kit_and_the_image():
    have = {norm(n) for n in KIT} | {norm(n) for n in IMAGE}
    missing = {}
    for dist in KIT:
        for req in device_requirements(dist):
            if norm(req.name) not in have and not SAME_MODULE.get(norm(req.name), set()) & have:
                missing.setdefault(dist, []).append(str(req))
    assert not missing, f"kit distributions need what neither the kit nor the image holds: {missing}"


@pytest.mark.parametrize("script", ["build_kit.sh", "gpu_checks.sh"])
def test_scripts_parse(script):
    path = DEVICE / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_gpu_checks_runs_what_exists():
    """gpu_checks.sh names the benchmarks and their flags; each must exist in the benchmark it calls."""
    text = (DEVICE / "gpu_checks.sh").read_text()
    for bench, flags in {"bench_e2e_gpu.py": ["--device", "--tiny", "--videos", "--shard-size", "--batch-size",
                                              "--dir", "--json"],
                         "bench_fusion_gpu.py": ["--device", "--tiny", "--rates", "--methods", "--work", "--json"]
                         }.items():
        assert f"benchmarks/{bench}" in text
        source = (ROOT / "benchmarks" / bench).read_text()
        for flag in flags:
            assert flag in text and f'"{flag}"' in source, f"{bench} has no {flag}"


# What each benchmark imports beyond its own module, in the process that does the work.
BENCH_IMPORTS = {
    # the config model and every stage module
    "bench_e2e_gpu.py": "import stages.registry as r, stages.runner, storage.manifest, flows.config; "
                        "[r.get_stage(n) for n in r.available_stages()]",
    # the labels it prints (experts.model_parts.config, not flows.ablation: a Prefect flow), and what its
    # per-cell worker imports: the preload list and the modules measure_cell adds
    "bench_fusion_gpu.py": "from experts.model_parts.config import METHOD_LABELS, PAPER_METHODS; "
                           "assert set(PAPER_METHODS) <= set(METHOD_LABELS); "
                           "import importlib; [importlib.import_module(n) for n in m.PRELOAD]; "
                           "import stages.training.config, stages.training.data",
}


@pytest.mark.parametrize("bench", sorted(BENCH_IMPORTS))
def test_the_benchmarks_do_not_import_prefect(bench):
    """The kit carries no Prefect (nor its server's dependencies), so neither benchmark may import it."""
    code = ("import sys; sys.argv=['x']; import importlib.util as u; "
            f"s=u.spec_from_file_location('b', {str(ROOT / 'benchmarks' / bench)!r}); "
            f"m=u.module_from_spec(s); s.loader.exec_module(m); {BENCH_IMPORTS[bench]}; "
            "print('prefect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
