"""A real `motionforge run` SIGKILLed in the middle of a stage, then resumed, ends with exactly the rows of an
uninterrupted run: nothing lost, nothing duplicated, and the dead run's lock is taken over."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds

from stages.synth.videos import SynthConfig, render_dataset
from storage.root import OutputRoot
from tests._cli import invoke

REPO = Path(__file__).resolve().parents[1]
STAGES = "ingest,scenes"


def _rows(out: Path, stage: str, key: str) -> list[dict]:
    t = ds.dataset(str(out / stage), format="parquet").to_table().drop_columns(["created_at"])
    return sorted(t.to_pylist(), key=lambda r: (r[key], r.get("start_frame", 0)))


def test_sigkill_mid_stage_then_resume(tmp_path, prefect_harness):
    videos = tmp_path / "videos"
    render_dataset(videos, 10, 21, SynthConfig(min_duration_s=3.0, max_duration_s=4.0))
    crashed = tmp_path / "crashed"
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect-crash"))
    env.pop("PREFECT_API_URL", None)  # the child runs its own temporary server, killed with it
    log = open(tmp_path / "child.log", "wb")  # the child's output, shown when it fails
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--input", str(videos), "--out", str(crashed), "--stages", STAGES,
         "--shard-size", "1", "--profile", "tiny"],
        cwd=REPO, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    root = OutputRoot(crashed)
    deadline = time.time() + 240
    try:
        while len(root.completed_shards("scenes")) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
    finally:
        exited_early = proc.poll()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Prefect server and its worker processes
        except ProcessLookupError:
            pass  # the whole group had already exited: the asserts below say why, with the child's output
        proc.wait()
        log.close()
    output = (tmp_path / "child.log").read_text(errors="replace")[-4000:]
    done = root.completed_shards("scenes")
    assert exited_early is None, f"the child run exited (code {exited_early}) before the kill:\n{output}"
    assert 2 <= len(done) < 10, f"the kill should land in the middle of scenes (completed shards {done}):\n{output}"
    assert root.exists(root.path("_lock"))  # the dead run left its lock behind

    invoke("run", "--input", str(videos), "--out", str(crashed), "--stages", STAGES, "--shard-size", "1",
           "--profile", "tiny")  # resume: takes over the dead lock, skips what is complete
    clean = tmp_path / "clean"
    invoke("run", "--input", str(videos), "--out", str(clean), "--stages", STAGES, "--shard-size", "1",
           "--profile", "tiny")
    for stage, key in (("ingest", "uri"), ("scenes", "clip_id")):
        got, want = _rows(crashed, stage, key), _rows(clean, stage, key)
        assert [r[key] for r in got] == [r[key] for r in want]
        assert got == want  # every column but created_at
    assert len({r["clip_id"] for r in _rows(crashed, "scenes", "clip_id")}) == len(_rows(crashed, "scenes", "clip_id"))
    # the resume held the lock, so it removed any temp file the killed writer left; and it released the lock
    assert not [n for _, _, fs in os.walk(crashed) for n in fs if n.startswith(".tmp-")]
    assert not root.exists(root.path("_lock"))
