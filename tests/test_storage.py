"""Output-root storage: atomic writes, skip-completed, forced rewrite, lock refusal, staleness, crash/resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from stages.base import Stage
from stages.runner import run_shard, shard_state
from storage.lock import RootLockedError, RunLock
from storage.manifest import record_stage_config
from storage.root import OutputRoot
from tests import _slow_stage as slow

REPO = Path(__file__).resolve().parents[1]


def _rows(out: str, stage: str = "slow") -> list[tuple]:
    t = ds.dataset(os.path.join(out, stage), format="parquet").to_table()
    return sorted(zip(t["item"].to_pylist(), t["value"].to_pylist(), t["status"].to_pylist(), t["error"].to_pylist()))


def test_atomic_write_leaves_only_parquet_and_underscore_names(tmp_path):
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 10, 4)
    for k in range(3):
        o = run_shard(slow.STAGE, root, slow.SlowConfig(), k)
        assert o.action == "written"
    names = os.listdir(tmp_path / "r" / "slow")
    assert sorted(n for n in names if not n.startswith(("_", "."))) == [f"shard-0000{k}.parquet" for k in range(3)]
    assert not [n for n in names if n.startswith(".tmp")]
    # the dataset reader sees exactly the table: markers and temp names are ignored
    assert len(_rows(str(tmp_path / "r"))) == 10
    assert root.completed_shards("slow") == [0, 1, 2]


def test_skip_completed_and_forced_rewrite(tmp_path):
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 6, 3)
    cfg = slow.SlowConfig()
    first = run_shard(slow.STAGE, root, cfg, 0)
    m1 = root.read_marker("slow", 0)
    again = run_shard(slow.STAGE, root, cfg, 0)
    assert (first.action, again.action) == ("written", "skipped-complete")
    assert root.read_marker("slow", 0)["fingerprint"] == m1["fingerprint"]
    forced = run_shard(slow.STAGE, root, cfg, 0, force=True)
    assert forced.action == "written"
    assert root.read_marker("slow", 0)["fingerprint"] != m1["fingerprint"]
    # a changed config recomputes instead of skipping
    changed = run_shard(slow.STAGE, root, slow.SlowConfig(multiplier=5), 0)
    assert changed.action == "written"
    assert dict((i, v) for i, v, _, _ in _rows(str(tmp_path / "r")))["item-1"] == 5


def test_error_rows_are_rows_not_exceptions(tmp_path):
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 8, 8)
    o = run_shard(slow.STAGE, root, slow.SlowConfig(), 0)
    assert (o.ok, o.error) == (7, 1)
    assert o.top_errors[0][0] == "item item-3 is unlucky"


def test_lock_refuses_second_run_and_takes_over_dead_holder(tmp_path):
    root = OutputRoot(tmp_path / "r")
    with RunLock(root, "first"):
        with pytest.raises(RootLockedError, match=r"another motionforge first \(pid \d+"):
            RunLock(root, "second").acquire()
    assert not root.exists(root.path("_lock"))
    # a lock left by a dead process on this host is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root.write_json(root.path("_lock"), {"pid": dead.pid, "host": os.uname().nodename, "what": "run"})
    with RunLock(root, "third") as lk:
        assert lk.held


def _chain(name: str, inputs: tuple[str, ...]) -> Stage:
    import dataclasses

    def process(ctx):
        t = ctx.read(inputs[0])
        return [slow.SlowRow(item=i, value=v + 1) for i, v in zip(t["item"].to_pylist(), t["value"].to_pylist())]

    return dataclasses.replace(slow.STAGE, name=name, inputs=inputs, process=process)


def test_config_change_marks_downstream_stale(tmp_path):
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 4, 2)
    down = _chain("down", ("slow",))
    for k in (0, 1):
        run_shard(slow.STAGE, root, slow.SlowConfig(), k)
        run_shard(down, root, slow.SlowConfig(), k)
    record_stage_config(root, "slow", slow.SlowConfig().config_hash(), {}, [])
    record_stage_config(root, "down", slow.SlowConfig().config_hash(), {}, ["slow"])
    assert [shard_state(down, root, k) for k in (0, 1)] == ["complete", "complete"]
    # new config for the upstream stage, re-run on shard 0 only
    new = slow.SlowConfig(multiplier=4)
    record_stage_config(root, "slow", new.config_hash(), {}, [])
    run_shard(slow.STAGE, root, new, 0)
    assert shard_state(slow.STAGE, root, 0) == "complete"
    assert shard_state(slow.STAGE, root, 1) == "stale"  # old config
    assert shard_state(down, root, 0) == "stale"  # its input was rewritten
    assert run_shard(down, root, slow.SlowConfig(), 0).action == "written"  # stale is not skipped
    assert shard_state(down, root, 0) == "complete"


def test_crash_mid_stage_then_resume_equals_clean_run(tmp_path):
    clean = OutputRoot(tmp_path / "clean")
    slow.plan(clean, 24, 4)
    slow.run_all(clean.url, 0.0)

    crashed = OutputRoot(tmp_path / "crashed")
    n = slow.plan(crashed, 24, 4)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "tests._slow_stage", crashed.url, "0.05"], cwd=REPO, env=env)
    deadline = time.time() + 60
    while len(crashed.completed_shards("slow")) < 2 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = crashed.completed_shards("slow")
    assert 2 <= len(done) < n, f"the kill should land mid-stage (completed {done} of {n})"
    slow.run_all(crashed.url, 0.0)  # resume
    assert _rows(crashed.url) == _rows(clean.url)
    assert len(_rows(crashed.url)) == 24


def test_whole_shard_failure_is_reported_then_cleared(tmp_path):
    import dataclasses

    from dashboards.status import root_status

    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 4, 2)
    record_stage_config(root, "slow", slow.SlowConfig().config_hash(), {}, [])

    def boom(ctx):
        raise OSError(f"disk full while processing shard {ctx.shard}")

    broken = dataclasses.replace(slow.STAGE, process=boom)
    run_shard(slow.STAGE, root, slow.SlowConfig(), 0)
    with pytest.raises(OSError):
        run_shard(broken, root, slow.SlowConfig(), 1)
    st = {s["stage"]: s for s in root_status(root.url, stages={"slow": slow.STAGE})["stages"]}["slow"]
    assert (st["complete"], st["failed"], st["failed_shards"]) == (1, 1, [1])
    assert "disk full while processing shard 1" in st["failures"][0]
    run_shard(slow.STAGE, root, slow.SlowConfig(), 1)  # the re-run succeeds: the failure note goes away
    st = {s["stage"]: s for s in root_status(root.url, stages={"slow": slow.STAGE})["stages"]}["slow"]
    assert (st["complete"], st["failed"]) == (2, 0)
