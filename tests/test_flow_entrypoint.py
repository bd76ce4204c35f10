"""Our flows as a Prefect worker runs a deployment: loaded from their file (``flows/pipeline.py:pipeline``, the
entrypoints ``flows/deploy.py`` registers). Prefect's loader puts the file's folder first on ``sys.path`` and
leaves it there, and a process that multiprocessing spawns from the run copies that path. A module in that
folder named like a standard-library module then replaces the standard one in the child (``flows/secrets.py``
did: the child's first ``import secrets``, inside pydantic, found ours and failed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests._video_fixtures import make_testsrc, require_ffmpeg

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "stages", "experts", "storage", "dashboards", "schemas")


def test_no_module_of_ours_is_named_like_a_standard_library_module():
    names = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*"):
            if path.suffix == ".py" and path.stem != "__init__":
                names.setdefault(path.stem, path.relative_to(REPO))
            elif path.is_dir() and (path / "__init__.py").exists():
                names.setdefault(path.name, path.relative_to(REPO))
    clashes = {str(p) for n, p in names.items() if n in sys.stdlib_module_names}
    assert not clashes, f"these shadow the standard library when their folder is on sys.path: {sorted(clashes)}"


LOADED_LIKE_A_WORKER = """
import concurrent.futures as cf, json, multiprocessing, sys
from prefect.flows import load_flow_from_entrypoint

if __name__ == "__main__":
    load_flow_from_entrypoint("flows/pipeline.py:pipeline")  # what a process worker does for a deployment run
    from stages.scenes import ScenesConfig, detect_cuts

    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        cuts = list(pool.map(detect_cuts, sys.argv[1:], [ScenesConfig()] * 2))
    print(json.dumps([c.cut_frames for c in cuts]))
"""


def test_spawned_workers_import_our_code_in_a_flow_loaded_from_its_file(tmp_path):
    require_ffmpeg()
    videos = [str(make_testsrc(tmp_path / f"v{i}.mp4", duration_s=1.0)) for i in range(2)]
    script = tmp_path / "worker_like.py"  # a file, so spawned children can re-import the main module
    script.write_text(LOADED_LIKE_A_WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script), *videos], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[], []]  # testsrc has no cut
