"""Output-root storage: atomic writes, skip-completed, forced rewrite, lock refusal, staleness, crash/resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
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


def test_iter_stage_reads_completed_shards_in_order_a_few_at_a_time(tmp_path, monkeypatch):
    """The readers of whole stages (report, export hf) go shard by shard: in shard order, only shards with a
    marker, only the asked columns, and never more than ``ahead`` shards read and not yet taken."""
    import threading

    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 40, 2)
    for k in range(20):
        run_shard(slow.STAGE, root, slow.SlowConfig(), k)
    root.delete_marker("slow", 7)  # a shard whose marker is gone is not complete: not read
    state = {"in_flight": 0, "max": 0, "taken": 0, "read": 0, "threads": set()}
    lock = threading.Lock()
    real = OutputRoot.read_shard

    def counting(self, stage, shard, schema=None, columns=None, use_threads=True):
        with lock:
            state["threads"].add(use_threads)
            state["read"] += 1
            state["max"] = max(state["max"], state["read"] - state["taken"])
        return real(self, stage, shard, schema, columns, use_threads)

    monkeypatch.setattr(OutputRoot, "read_shard", counting)
    got = []
    for shard, table in root.iter_stage("slow", columns=["item", "status", "no-such-column"], ahead=3):
        state["taken"] += 1
        got.append((shard, table.column_names, table["item"].to_pylist()))
    assert [g[0] for g in got] == [k for k in range(20) if k != 7]
    assert all(names == ["item", "status"] for _, names, _ in got)
    assert [i for _, _, items in got for i in items] == [f"item-{i}" for i in range(40) if i // 2 != 7]
    assert state["max"] <= 3, state
    assert state["threads"] == {False}  # the files are read in parallel: each is decoded on its reading thread
    # with the stage's schema too (a tuple of names, one the schema lacks)
    assert root.read_shard("slow", 0, slow.STAGE.schema, ("status", "item", "nope")).column_names == ["item", "status"]
    it = root.iter_stage("slow", ahead=4)
    next(it)
    it.close()  # a reader that stops early: the pool is shut down, nothing hangs
    assert state["read"] - len(got) <= 1 + 4


@pytest.mark.parametrize("where", ["local", "memory"])
def test_marker_rewrite_changes_the_explorers_key_from_one_listing(tmp_path, where, monkeypatch):
    """The review server checks on every request whether a stage wrote a shard; it lists the markers' folder
    (stamps: inode, mtime, size) instead of reading each marker. A rewrite with the same length is seen on a
    local root (the atomic rename brings a new inode); a filesystem without mtimes falls back to reading the
    markers' fingerprints. Temp files of a write in flight are not part of the key."""
    import uuid

    from dashboards.review_data import _markers_key

    url = str(tmp_path / "r") if where == "local" else f"memory://stamps-{uuid.uuid4().hex}/r"
    root = OutputRoot(url)
    for k in range(3):
        root.write_marker("detect", k, {"fingerprint": f"{k:032x}", "shard": k})
    opened = []
    real = OutputRoot.read_json
    monkeypatch.setattr(OutputRoot, "read_json", lambda self, path, default=None: opened.append(path) or
                        real(self, path, default))
    first = _markers_key(root, ("detect", "tag"))
    assert len(opened) == (0 if where == "local" else 3) and len(first) == 3  # memory:// keeps no mtimes
    assert _markers_key(root, ("detect", "tag")) == first
    root.write_marker("detect", 1, {"fingerprint": f"{9:032x}", "shard": 1})  # same length, new content
    second = _markers_key(root, ("detect", "tag"))
    assert second != first and [a for a, b in zip(first, second) if a != b][0][1] == "shard-00001.json"
    if where == "local":
        (tmp_path / "r" / "detect" / "_markers" / ".tmp-0123456789abcdef-shard-00003.json").write_text("{")
        assert _markers_key(root, ("detect",)) == second and opened == []


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


def test_status_keeps_only_the_marker_fields_it_reads(tmp_path, monkeypatch):
    """``status`` on a remote root holds every marker until its pass ends, so it keeps a slim copy: the verdicts
    and counts are the same as from whole markers, and nothing else of a marker stays in memory. (A local root is
    judged from its marker index, whose ``slim`` column holds the same fields: test_marker_index_*.)"""
    import dashboards.status as status

    root = OutputRoot(f"memory://mf-test-{uuid.uuid4().hex[:8]}/r")
    slow.plan(root, 6, 2)
    record_stage_config(root, "slow", slow.SlowConfig().config_hash(), {}, [])
    for k in range(3):
        run_shard(slow.STAGE, root, slow.SlowConfig(), k)
    m = root.read_marker("slow", 2)
    root.write_marker("slow", 2, dict(m, config_hash="another", ok=5, error=2,
                                      top_errors=[["decode failed at frame 3", 2]]))  # stale, with errors
    real, kept = status._slim, []
    monkeypatch.setattr(status, "_slim", lambda marker: marker)  # the memo keeps whole markers
    whole = status.root_status(root.url, stages={"slow": slow.STAGE})
    monkeypatch.setattr(status, "_slim", lambda marker: kept.append(real(marker)) or kept[-1])
    assert status.root_status(root.url, stages={"slow": slow.STAGE}) == whole
    assert kept and all(set(x) <= set(status._STATUS_FIELDS) for x in kept if x is not None)
    assert not {"created_at", "seconds", "stage", "shard", "rows"} & {k for x in kept if x for k in x}
    st = whole["stages"][0]
    first = [root.read_marker("slow", k) for k in (0, 1)]
    assert (st["complete"], st["stale"], st["rows_ok"], st["rows_error"]) == (
        2, 1, sum(x["ok"] for x in first) + 5, sum(x["error"] for x in first) + 2)
    assert st["first_errors"][0] == "decode failed at frame 3 (x2)"  # top_errors survive the slimming


# -- the run lock under contention, and a lock file cut short -------------------------------------------------

@pytest.mark.parametrize("stale", [True, False], ids=["stale-lock", "no-lock"])
def test_lock_race_has_one_holder_at_a_time_and_no_crash(tmp_path, stale):
    """6 processes acquire at the same instant (barrier), 8 rounds: holding intervals never overlap, nobody
    crashes, somebody wins, and the lock is gone afterwards."""
    from tests._lock_race import race_round

    for r in range(8):
        res = race_round(tmp_path / f"round-{r}" / "root", contenders=6, stale=stale)
        assert not res["crashed"], res["crashed"][0].get("trace")
        assert not res["double"], f"round {r}: two processes held the lock at once"
        assert res["held"] >= 1 and res["held"] + res["refused"] == 6
        assert not res["lock_left"]


def test_empty_or_garbled_lock_file_is_taken_over_after_grace(tmp_path, caplog):
    import logging

    from storage.root import GarbledJSONError

    root = OutputRoot(tmp_path / "r")
    root.makedirs(root.base)
    lock_file = Path(root.path("_lock"))
    for content in (b"", b'{"pid": 12'):
        lock_file.write_bytes(content)
        with pytest.raises(GarbledJSONError, match="_lock is (empty|not valid JSON)"):
            root.read_json(root.path("_lock"))
        old = time.time() - 120
        os.utime(lock_file, (old, old))  # a file cut short two minutes ago: its writer is long gone
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="motionforge.storage.lock"):
            with RunLock(root, "next run", grace_s=10.0) as lk:
                assert lk.held and lk.taken_over == {"garbled": True}
                assert root.read_json(root.path("_lock"))["what"] == "next run"
        assert any("taking over the run lock" in r.getMessage() and "not valid JSON" in r.getMessage()
                   for r in caplog.records)
        assert not lock_file.exists()


def test_fresh_garbled_lock_waits_for_grace_then_is_taken_over(tmp_path):
    root = OutputRoot(tmp_path / "r")
    root.makedirs(root.base)
    Path(root.path("_lock")).write_bytes(b"")  # just now: maybe a writer is still writing it
    t0 = time.monotonic()
    with RunLock(root, "next run", grace_s=1.5) as lk:
        waited = time.monotonic() - t0
        assert lk.held
    assert waited >= 1.0  # it did not take a possibly live lock over at once (grace 1.5 s, file age ~0)


def test_dead_holder_takeover_records_who_it_was(tmp_path):
    from tests._lock_race import dead_pid

    root = OutputRoot(tmp_path / "r")
    pid = dead_pid()
    root.write_json(root.path("_lock"), {"pid": pid, "host": os.uname().nodename, "what": "run",
                                         "flow_run_id": "0b5c9a6e-0000-4000-8000-000000000001"})
    with RunLock(root, "resume", info={"flow_run_id": "new"}) as lk:
        assert lk.taken_over["pid"] == pid and lk.taken_over["flow_run_id"].startswith("0b5c9a6e")
        assert root.read_json(root.path("_lock"))["flow_run_id"] == "new"


# -- staleness is transitive ----------------------------------------------------------------------------------

def test_staleness_reaches_every_downstream_stage(tmp_path):
    """slow -> down -> down2: a new config for `slow`, re-run, makes `down` stale (its input changed) and also
    `down2`, whose own input (`down`) was not rewritten yet."""
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 4, 2)
    down, down2 = _chain("down", ("slow",)), _chain("down2", ("down",))
    stages = {"slow": slow.STAGE, "down": down, "down2": down2}
    cfg = slow.SlowConfig()
    for name, st in stages.items():
        record_stage_config(root, name, cfg.config_hash(), {}, list(st.inputs))
        for k in (0, 1):
            run_shard(st, root, cfg, k)
    assert [shard_state(down2, root, k, lookup=stages.get) for k in (0, 1)] == ["complete", "complete"]
    new = slow.SlowConfig(multiplier=4)
    record_stage_config(root, "slow", new.config_hash(), {}, [])
    run_shard(slow.STAGE, root, new, 0)
    assert shard_state(down, root, 0, lookup=stages.get) == "stale"
    assert shard_state(down2, root, 0, lookup=stages.get) == "stale"  # two steps down
    assert shard_state(down2, root, 1, lookup=stages.get) == "stale"  # slow shard 1 is stale (old config)
    from dashboards.status import root_status

    st = {s["stage"]: s for s in root_status(root.url, stages=stages)["stages"]}
    assert (st["down2"]["stale"], st["down2"]["complete"]) == (2, 0)
    # re-running down then down2 on shard 0 makes that chain complete again
    run_shard(down, root, cfg, 0)
    assert shard_state(down2, root, 0, lookup=stages.get) == "stale"  # its input was rewritten now
    run_shard(down2, root, cfg, 0)
    assert shard_state(down2, root, 0, lookup=stages.get) == "complete"


def test_staleness_follows_an_external_input_upstream(tmp_path):
    """An upstream stage with an external input (like review's imported decisions): when that input changes,
    the upstream shard and every shard built from it are stale."""
    import dataclasses

    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 2, 2)
    decisions = {"v": "first import"}
    ext = dataclasses.replace(_chain("ext", ("slow",)), external_inputs=lambda root, shard: {"decisions": decisions["v"]})
    down = _chain("down", ("ext",))
    stages = {"slow": slow.STAGE, "ext": ext, "down": down}
    run_shard(slow.STAGE, root, slow.SlowConfig(), 0)
    run_shard(ext, root, slow.SlowConfig(), 0)
    run_shard(down, root, slow.SlowConfig(), 0)
    assert shard_state(down, root, 0, lookup=stages.get) == "complete"
    decisions["v"] = "second import"
    assert shard_state(ext, root, 0, lookup=stages.get) == "stale"
    assert shard_state(down, root, 0, lookup=stages.get) == "stale"


# -- atomic writes under injected faults (issue 10) -----------------------------------------------------------

def _visible_rows(out: str) -> list[tuple]:
    """What pyarrow.dataset shows: every visible file must be a whole Parquet file (a cut one fails to read)."""
    names = [n for n in os.listdir(os.path.join(out, "slow")) if not n.startswith(("_", "."))]
    assert all(n.startswith("shard-") and n.endswith(".parquet") for n in names), names
    return _rows(out)


def _clean_rows(tmp_path, n: int = 8, size: int = 4) -> list[tuple]:
    clean = OutputRoot(tmp_path / "clean")
    slow.plan(clean, n, size)
    slow.run_all(clean.url, 0.0)
    return _rows(clean.url)


@pytest.mark.parametrize("fault", ["rename-raises", "disk-full"])
def test_failed_table_write_leaves_no_partial_file_and_resume_fixes_it(tmp_path, fault):
    from tests._faulty_fs import install

    want = _clean_rows(tmp_path)
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 8, 4)
    run_shard(slow.STAGE, root, slow.SlowConfig(), 0)
    is_table = lambda p: p.endswith(".parquet")  # noqa: E731
    if fault == "rename-raises":
        h = install(root, fail_move=lambda src, dest: is_table(dest))
    else:  # a full disk: the table write stops with ENOSPC after 64 bytes, wherever it is being written
        h = install(root, write_limit=is_table, limit=64)
    with pytest.raises(OSError):
        run_shard(slow.STAGE, root, slow.SlowConfig(), 1)
    assert h.failures == 1
    assert shard_state(slow.STAGE, root, 1) == "pending"
    assert _visible_rows(root.url) == want[:4]  # shard 0 whole, nothing of shard 1
    with RunLock(OutputRoot(root.url)) as lk:
        fresh = OutputRoot(root.url)
        fresh.remove_temp_files(lk)
        slow.run_all(fresh.url, 0.0)  # resume
    assert _visible_rows(root.url) == want
    assert not [n for _, _, fs in os.walk(root.base) for n in fs if n.startswith(".tmp-")]


def test_failed_marker_write_leaves_shard_pending_and_resume_fixes_it(tmp_path):
    """The table is in place, its marker write fails: the shard is pending (not complete), read_stage does not
    return it, and a resume rewrites it once (no duplicate rows)."""
    from tests._faulty_fs import install

    want = _clean_rows(tmp_path)
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 8, 4)
    h = install(root, fail_move=lambda src, dest: "/_markers/" in dest)
    with pytest.raises(OSError):
        run_shard(slow.STAGE, root, slow.SlowConfig(), 0)
    assert h.failures == 1
    fresh = OutputRoot(root.url)
    assert shard_state(slow.STAGE, fresh, 0) == "pending" and fresh.completed_shards("slow") == []
    slow.run_all(fresh.url, 0.0)
    assert _visible_rows(root.url) == want


def test_old_marker_is_deleted_before_a_shard_is_rewritten(tmp_path):
    """A rewrite (new config) whose new marker cannot be written must leave the shard pending. Were the old
    marker kept until the new one lands, the shard would read as complete while its table is the new one."""
    from tests._faulty_fs import install

    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 4, 4)
    cfg = slow.SlowConfig()
    record_stage_config(root, "slow", cfg.config_hash(), {}, [])
    run_shard(slow.STAGE, root, cfg, 0)
    assert shard_state(slow.STAGE, root, 0) == "complete"
    install(root, fail_move=lambda src, dest: "/_markers/" in dest)
    with pytest.raises(OSError):
        run_shard(slow.STAGE, root, cfg, 0, force=True)
    fresh = OutputRoot(root.url)
    assert fresh.read_marker("slow", 0) is None
    assert shard_state(slow.STAGE, fresh, 0) == "pending"
    # and a process failure in the middle of a rewrite leaves it pending too
    run_shard(slow.STAGE, fresh, cfg, 0)
    import dataclasses

    def boom(ctx):
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError):
        run_shard(dataclasses.replace(slow.STAGE, process=boom), fresh, cfg, 0, force=True)
    assert shard_state(slow.STAGE, fresh, 0) == "pending"


KILL_IN_WRITE = """
import sys
from storage.root import OutputRoot
from stages.runner import run_shard
from tests import _slow_stage as slow
from tests._faulty_fs import install

root = OutputRoot(sys.argv[1])
run_shard(slow.STAGE, root, slow.SlowConfig(), 0)
if sys.argv[2] == "mid-write":  # 100 bytes into shard 1's table, wherever it is being written
    install(root, kill_write=lambda path: path.endswith("shard-00001.parquet"), limit=100)
else:  # the table is whole under its temp name; killed as it is renamed
    install(root, kill_move=lambda src, dest: dest.endswith("shard-00001.parquet"))
run_shard(slow.STAGE, root, slow.SlowConfig(), 1)
"""


@pytest.mark.parametrize("when", ["mid-write", "at-rename"])
def test_process_killed_inside_a_table_write_then_resumed(tmp_path, when):
    """SIGKILL half-way through writing a table, or after the temp file is whole and before its rename: nothing
    partial is visible, the shard is pending, the temp file is left; a resume that holds the lock removes it and
    completes the shard."""
    want = _clean_rows(tmp_path)
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 8, 4)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, root.url, when], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    temps = [n for n in os.listdir(root.path("slow")) if n.startswith(".tmp-")]
    assert len(temps) == 1 and temps[0].endswith("shard-00001.parquet")
    assert shard_state(slow.STAGE, root, 1) == "pending"
    assert _visible_rows(root.url) == want[:4]
    with pytest.raises(RuntimeError, match="run lock"):
        root.remove_temp_files(RunLock(root))  # not held: another writer's temp file may be live
    with RunLock(root, "resume") as lk:
        assert len(root.remove_temp_files(lk)) == 1
        slow.run_all(root.url, 0.0)
    assert _visible_rows(root.url) == want
    assert not [n for n in os.listdir(root.path("slow")) if n.startswith(".tmp-")]


def test_prune_shards_outside_the_plan(tmp_path):
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 12, 4)
    slow.run_all(root.url, 0.0)
    slow.plan(root, 12, 6)  # a smaller plan (2 shards): shard 2 is left from the old one
    with RunLock(root) as lk:
        assert root.prune_shards(lk, "slow", {0, 1}) == [2]
    assert root.completed_shards("slow") == [0, 1]
    assert sorted(n for n in os.listdir(root.path("slow")) if n.endswith(".parquet")) == [
        "shard-00000.parquet", "shard-00001.parquet"]


# -- fsspec-only roots ------------------------------------------------------------------------------------------

def test_memory_root_through_fsspec(tmp_path):
    """``memory://`` has no pyarrow filesystem: the root goes through fsspec, and everything works on it."""
    import uuid

    url = f"memory://mf-test-{uuid.uuid4().hex[:8]}/root"
    root = OutputRoot(url)
    assert not root.is_local
    slow.plan(root, 6, 4)
    slow.run_all(url, 0.0)
    assert root.completed_shards("slow") == [0, 1]
    t = root.read_stage("slow")
    assert sorted(t["item"].to_pylist()) == sorted(f"item-{i}" for i in range(6))
    assert root.dataset("slow").to_table().num_rows == 6
    with RunLock(root, "remote") as lk:
        assert lk.held and root.read_json(root.path("_lock"))["what"] == "remote"
        with pytest.raises(RootLockedError):
            RunLock(OutputRoot(url), "second").acquire()
        left = root.path("slow", ".tmp-00112233aabb-shard-00000.parquet")  # as a killed table write leaves it
        other = root.path("_report", ".index.html.partial-x1")  # another tool's temp file: not ours to remove
        root.write_bytes_atomic(left, b"PAR1")
        root.write_bytes_atomic(other, b"<html")
        assert root.remove_temp_files(lk) == [left]
        assert root.exists(other)
    assert not root.exists(root.path("_lock"))



def test_memory_root_readers_of_one_file_do_not_share_a_position():
    """fsspec's memory filesystem gives every reader of a file one shared, rewound file object, so two shard tasks
    reading ``_plan.json`` at once (ingest shards do, at their start) could read nothing, depending on how their
    threads interleave (``test_memory_root_end_to_end`` failed once under load). The worst interleaving is played
    out here in one thread: open, open, read, read. Each reader must get the whole file."""
    import json
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = OutputRoot(f"memory://mf-test-{uuid.uuid4().hex[:8]}/root")
    plan = {"version": 1, "shard_size": 2, "shards": [["a", "b"], ["c"]]}
    root.write_json(root.path("ingest", "_plan.json"), plan)
    first = root.fs.open_input_stream(root.path("ingest", "_plan.json"))
    second = root.fs.open_input_stream(root.path("ingest", "_plan.json"))
    assert json.loads(first.read()) == plan
    assert json.loads(second.read()) == plan
    table = pa.table({"item": ["x", "y"], "value": [1, 2]})
    assert pq.read_table(root.write_table_atomic("slow", 0, table), filesystem=root.fs).equals(table)
    with pytest.raises(FileNotFoundError):
        root.fs.open_input_stream(root.path("ingest", "missing.json"))


REPORT_ON_FULL_DISK = """
import resource, signal, sys
from dashboards.report import write_report
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the size limit, writes fail with EFBIG like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))
write_report(sys.argv[1], sys.argv[2])
"""


def test_report_on_a_full_disk_keeps_the_old_report_whole(tmp_path):
    """The report is larger than the 512 bytes the disk takes. The old report stays as it was and no
    cut file takes its place (the report used to be left cut at 8 KiB)."""
    from dashboards.report import write_report

    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 4, 2)
    slow.run_all(root.url, 0.0)
    to = tmp_path / "site" / "index.html"
    write_report(root.url, to)
    old = to.read_bytes()
    assert len(old) > 512 and old.rstrip().endswith(b"</html>")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", REPORT_ON_FULL_DISK, root.url, str(to)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert to.read_bytes() == old
    assert os.listdir(to.parent) == ["index.html"]  # the cut temp file was removed too


def test_list_dir_leaves_out_temp_files_of_writes_in_flight(tmp_path):
    """Another process's atomic write shows its temp file for a moment before the rename; a reader that lists
    the folder then opens what it found must not get that name (it would open a half-written file, or find it
    renamed away: FileNotFoundError, seen with two reviewers deciding at once under load)."""
    root = OutputRoot(tmp_path / "r")
    done = root.path("notes", "a.jsonl")
    root.write_bytes_atomic(done, b"{}\n")
    in_flight = root._tmp_beside(root.path("notes", "b.jsonl"))  # the name write_bytes_atomic gives its temp file
    Path(in_flight).write_bytes(b'{"half')
    Path(root.path("notes", ".tmp-notes.jsonl")).write_bytes(b"")  # a user's own dotfile: not one of ours
    assert sorted(os.listdir(root.path("notes"))) == sorted([".tmp-notes.jsonl", "a.jsonl", Path(in_flight).name])
    assert root.list_dir(root.path("notes")) == [".tmp-notes.jsonl", "a.jsonl"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_read_json_parses_what_write_json_wrote_and_names_what_it_cannot(tmp_path, where):
    """read_json parses with orjson and falls back to the standard parser, so every file json.dumps wrote reads
    back as json.loads reads it (NaN, infinities and integers past 64 bits, which orjson refuses, included),
    a file longer than one 64 KiB read comes back whole, and an empty, cut or non-UTF-8 file is a
    GarbledJSONError naming the file."""
    import json
    import uuid

    from storage.root import GarbledJSONError

    root = OutputRoot(tmp_path / "r" if where == "local" else f"memory://read-json-{uuid.uuid4().hex}")
    objs = {
        "plain": {"stage": "scenes", "shard": 7, "ok": 3, "top_errors": [["bad video", 2]], "s": "caf\u00e9 \u2192 \U0001f600"},
        "nan": {"seconds": float("nan"), "inf": float("inf"), "ninf": -float("inf")},
        "bigint": {"n": 2**70, "neg": -(2**65), "edge": [2**64 - 1, -(2**63), -(2**63) - 1], "id": "v-" + "7" * 25},
        "floats": [0.1, 1e-320, 5e-324, 2.2250738585072011e-308, 1.7976931348623157e308, -0.0, 9007199254740993],
        "long": {"items": [f"/videos/clip-{k:06d}.mp4" for k in range(8000)]},  # about 200 KiB
    }
    for name, obj in objs.items():
        path = root.path("j", f"{name}.json")
        root.write_json(path, obj)
        raw = root.read_bytes(path)
        assert len(raw) > 65536 or name != "long"
        # compared as the standard library would serialise both (NaN != NaN as a float)
        assert json.dumps(root.read_json(path), sort_keys=True) == json.dumps(json.loads(raw), sort_keys=True)
    assert root.read_json(root.path("j", "nan.json"))["inf"] == float("inf")
    assert root.read_json(root.path("j", "bigint.json"))["n"] == 2**70
    assert root.read_json(root.path("j", "missing.json"), default="none") == "none"
    # hand-written files json.dumps would not write, read as json.loads reads them
    for name, data in (("overflow", b'{"x": 1e400}'), ("surrogate", b'{"s": "\\ud800"}'), ("bom", b'\xef\xbb\xbf{"a": 1}')):
        path = root.path("j", f"{name}.json")
        root.write_bytes_atomic(path, data)
        assert repr(root.read_json(path)) == repr(json.loads(data)), name
    for name, data, says in (("empty", b"", "empty"), ("cut", b'{"ok": 1, "err', "not valid JSON"),
                             ("latin1", b'{"s": "caf\xe9"}', "not valid JSON")):
        path = root.path("j", f"{name}.json")
        root.write_bytes_atomic(path, data)
        with pytest.raises(GarbledJSONError, match=f"{name}.json is {says}"):
            root.read_json(path)


def test_marker_file_is_the_joined_path_for_every_kind_of_base(tmp_path):
    """marker_file spells the join out (it is asked once per marker read); it must be exactly path()'s."""
    for url in ("/", str(tmp_path / "r"), str(tmp_path / "r") + "/", "memory://bucket/run", "memory://run/"):
        root = OutputRoot(url)
        for stage, shard in (("scenes", 0), ("ingest", 7), ("finalize", 123456)):
            assert root.marker_file(stage, shard) == root.path(stage, "_markers", f"shard-{shard:05d}.json")


def test_table_blocks_joins_consecutive_tables_in_order():
    """table_blocks: runs of consecutive tables, in order, cut at max_rows rows or max_tables tables; with
    promote a missing or all-null column joins (null there) and a changed type starts a new run; without it only
    identical schemas join. Every row comes out once, in order, with its key in the run's keys."""
    import pyarrow as pa

    from storage.root import table_blocks

    a = lambda *v: pa.table({"x": pa.array(v, pa.int64())})  # noqa: E731
    items = [(0, a(1, 2)), (1, a(3)), (2, pa.table({"x": pa.array([4], pa.int64()), "y": ["b"]})),
             (3, pa.table({"x": pa.array([None], pa.null())})), (4, pa.table({"x": pa.array(["s"])})),
             (5, a(6, 7, 8)), (6, a(9))]

    def rows(blocks):
        return [v for _, t in blocks for v in t["x"].to_pylist()]

    want = [1, 2, 3, 4, None, "s", 6, 7, 8, 9]
    promoted = list(table_blocks(iter(items), max_rows=100, max_tables=100, promote=True))
    assert [k for k, _ in promoted] == [[0, 1, 2, 3], [4], [5, 6]] and rows(promoted) == want
    assert promoted[0][1].column_names == ["x", "y"] and promoted[0][1]["y"].to_pylist() == [None, None, None, "b", None]
    strict = list(table_blocks(iter(items), max_rows=100, max_tables=100, promote=False))
    assert [k for k, _ in strict] == [[0, 1], [2], [3], [4], [5, 6]] and rows(strict) == want
    by_rows = list(table_blocks(iter(items[5:]), max_rows=3, promote=False))
    assert [k for k, _ in by_rows] == [[5], [6]]
    by_count = list(table_blocks(iter([(k, a(k)) for k in range(5)]), max_tables=2))
    assert [k for k, _ in by_count] == [[0, 1], [2, 3], [4]]
    assert by_count[2][1] is not None and list(table_blocks(iter([]))) == []


def test_status_verdicts_are_the_runners_shard_by_shard(tmp_path):
    """`status` judges a whole root in one pass, sharing what it learnt about upstream shards across stages; every
    verdict must be the one the runner's shard_state gives that shard alone. A root with every registered stage
    (benchmarks/bench_status.py --dag full, 30 shards), then: a tag shard rewritten (new fingerprint), a scenes
    marker gone, an ingest shard built from another plan entry, a review shard with a new decisions file (an
    external input), a track marker recording an extra, non-stage input (stale itself, yet fresh for what was
    built from it), and qgen's config changed."""
    import json

    from dashboards.status import root_status
    from stages.registry import STAGE_MODULES, get_stage
    from storage.manifest import read_manifest, record_stage_config
    from tests._benchmarks import load_benchmark

    n = 30
    root = load_benchmark("bench_status").build_full_root(tmp_path / "r", n)

    def edit(stage: str, shard: int, **change) -> None:
        m = root.read_marker(stage, shard)
        m.update(change)
        root.write_marker(stage, shard, m)

    edit("tag", 3, fingerprint="rewritten")
    root.delete_marker("scenes", 5)
    edit("ingest", 8, inputs={"plan": "plan-0000000000000000"})
    root.write_bytes_atomic(root.path("review", "_decisions", "shard-00011", "2026-12-03T00-00-00.jsonl"), b"")
    track = root.read_marker("track", 7)
    edit("track", 7, inputs={**track["inputs"], "calibration": "v2"})
    record_stage_config(root, "qgen", "f" * 16, {}, list(get_stage("qgen").inputs))

    manifest = read_manifest(root)
    got = {s["stage"]: s for s in root_status(root.url)["stages"]}
    seen = set()
    for name in STAGE_MODULES:
        st = get_stage(name)
        chash = manifest["stages"][name]["config_hash"]
        want = {k: shard_state(st, root, k, config_hash=chash) for k in ([0] if st.scope == "global" else range(n))}
        seen.update(want.values())
        assert got[name]["stale_shards"] == [k for k, v in want.items() if v == "stale"], name
        assert got[name]["pending"] == sum(v == "pending" for v in want.values()), name
        assert got[name]["complete"] == sum(v == "complete" for v in want.values()), name
    assert seen == {"complete", "stale", "pending"}
    # the cases above did what they say, by the runner's own verdicts
    assert 3 not in got["tag"]["stale_shards"] and 3 in got["detect"]["stale_shards"] and 3 in got["tasks"]["stale_shards"]
    assert 5 in got["tag"]["stale_shards"] and 8 in got["ingest"]["stale_shards"] and 8 in got["synthqa"]["stale_shards"]
    assert 11 in got["review"]["stale_shards"] and 7 in got["track"]["stale_shards"]
    assert 7 not in got["trackfilter"]["stale_shards"] and got["qgen"]["stale"] == n
    assert json.dumps(got["finalize"]["stale_shards"]) == "[0]"


def test_config_hash_is_computed_once_per_config_object(monkeypatch):
    """A stage config's hash is asked once per (stage, shard) of the same object; it is computed once per object
    (a JSON dump of the whole config), and a changed copy has its own."""
    from stages.base import StageConfig

    cfg = slow.SlowConfig()
    first = cfg.config_hash()
    dumps = []
    real = StageConfig.model_dump

    def counting(self, *a, **kw):
        dumps.append(type(self).__name__)
        return real(self, *a, **kw)

    monkeypatch.setattr(StageConfig, "model_dump", counting)
    assert [cfg.config_hash() for _ in range(3)] == [first] * 3 and dumps == []
    other = cfg.model_copy(update={"multiplier": cfg.multiplier + 1})
    assert other.config_hash() != first and dumps == ["SlowConfig"]
    assert slow.SlowConfig().config_hash() == first  # an equal config, another object: the same hash


def test_status_of_a_remote_root_reads_its_markers_at_once(tmp_path):
    """On a remote root every marker read waits on the network, so `status` reads a stage's markers in threads
    before its pass (on a local disk it reads them in order: threads only contend for the GIL). A root behind a
    filesystem whose marker reads take 20 ms each: the verdicts are the local copy's, and reads overlapped."""
    import threading

    from fsspec.implementations.memory import MemoryFileSystem

    from dashboards.status import root_status
    from tests._benchmarks import load_benchmark

    local = tmp_path / "r"
    bench = load_benchmark("bench_status")
    bench.build_root(local, 40)
    state = {"now": 0, "max": 0, "reads": 0}
    lock = threading.Lock()

    def on_read(step: int) -> None:
        with lock:
            state["now"] += step
            state["reads"] += step > 0
            state["max"] = max(state["max"], state["now"])

    url = bench.remote_copy(local, 0.02, on_read)
    try:
        got = root_status(url)
        want = root_status(str(local))
        assert got["stages"] == want["stages"] and got["shards"] == 40
        assert state["reads"] == 2 * 40 and state["max"] > 1, state  # each marker of ingest and scenes, once
    finally:
        MemoryFileSystem().rm(url.removeprefix("slowmarkers://"), recursive=True)
