"""Flow runs killed on an output root end Crashed on the Prefect server once the next run on that root holds its lock,
however early they died (before recording themselves in the lock, during a takeover, earlier in a chain of kills);
runs of other roots, and a live run still on its way to the lock, are left alone.

The killed runs are real pipeline runs in child processes (``tests/_killable_run.py``) that stop at a chosen point
and are SIGKILLed there; the next run is a real pipeline flow in this process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._prefect_server import eventually
from tests._video_fixtures import make_testsrc, require_ffmpeg

REPO = Path(__file__).resolve().parents[1]


class Child:
    """One ``tests._killable_run`` process, imported and waiting for ``go`` (started early: imports take seconds)."""

    def __init__(self, tmp: Path, name: str, mode: str, stop: str, out: Path):
        from prefect.settings import PREFECT_API_URL

        self.sig = tmp / f"sig-{name}"
        self.sig.mkdir()
        env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=PREFECT_API_URL.value(),
                   PREFECT_HOME=str(tmp / f"prefect-{name}"))
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests._killable_run", mode, stop, str(out), str(self.sig)],
                                     cwd=REPO, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _wait_for(self, name: str, timeout_s: float = 120) -> Path:
        deadline = time.monotonic() + timeout_s
        while not (self.sig / name).exists():
            if self.proc.poll() is not None:
                pytest.fail(f"child exited with {self.proc.returncode} before {name!r}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"child not at {name!r} after {timeout_s} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return self.sig / name

    def run_to_stop(self) -> str:
        """Let it run to its stop point; returns its flow run id."""
        self._wait_for("ready")
        (self.sig / "go").write_text("")
        return self._wait_for("stopped").read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def children(tmp_path):
    made: list[Child] = []

    def make(*args) -> Child:
        made.append(Child(tmp_path, *args))
        return made[-1]

    yield make
    for c in made:
        c.kill()


@pytest.fixture
def one_video(tmp_path) -> Path:
    require_ffmpeg()
    d = tmp_path / "videos"
    d.mkdir()
    make_testsrc(d / "clip.mp4", duration_s=0.5)
    return d


def _states(*ids: str) -> list[str]:
    import uuid

    from prefect import get_client

    with get_client(sync_client=True) as client:
        return [client.read_flow_run(uuid.UUID(i)).state.type.value for i in ids]


def _state(flow_run_id: str):
    import uuid

    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(flow_run_id)).state


def _next_run(videos: Path, out: Path) -> None:
    from flows.pipeline import pipeline

    pipeline(input=str(videos), out=str(out), stages=["ingest"])


def _running_run_on(root: Path) -> str:
    """A flow run as a run killed on ``root`` leaves it on the server: Running, tagged with the root."""
    from prefect import flow, get_client
    from prefect.states import Running

    from flows.pipeline import root_tag

    @flow(name="motionforge-pipeline-elsewhere")
    def elsewhere():
        pass

    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(elsewhere, tags=[root_tag(str(root))], state=Running()).id)


def test_run_killed_before_it_took_the_lock_is_marked_crashed_other_roots_untouched(
        prefect_harness, children, one_video, tmp_path):
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    on_a = children("a", "flow", "before-lock", root_a)  # a direct flow call (or a deployment run): tags itself
    dead_a = on_a.run_to_stop()
    on_a.kill()
    other_root = _running_run_on(root_b)
    assert _states(dead_a, other_root) == ["RUNNING", "RUNNING"]
    assert not (root_a / "_lock").exists()  # it never recorded itself in the lock: nothing names it there

    _next_run(one_video, root_a)

    crashed = _state(dead_a)
    assert crashed.type.value == "CRASHED"
    assert "holds the run lock on" in crashed.message and str(root_a) in crashed.message
    assert _state(other_root).type.value == "RUNNING"  # root B's runs are for B's next run to judge


def test_live_run_on_its_way_to_the_lock_is_left_alone(prefect_harness, children, one_video, tmp_path):
    root = tmp_path / "a"
    waiting = children("live", "flow", "before-lock", root)
    live = waiting.run_to_stop()  # alive, tagged with the root, not (yet) at the lock

    _next_run(one_video, root)

    assert _state(live).type.value == "RUNNING"


def test_kill_chain_leaves_every_killed_run_crashed(prefect_harness, children, one_video, tmp_path):
    root = tmp_path / "a"
    first = children("first", "cli", "holding-lock", root)  # `motionforge run`: created with its root's tag
    second = children("second", "flow", "holding-lock", root)  # killed right after taking the lock over
    id1 = first.run_to_stop()
    first.kill()
    id2 = second.run_to_stop()  # took the dead first run's lock over, overwriting its flow run id there
    second.kill()
    assert _states(id1, id2) == ["RUNNING", "RUNNING"]

    _next_run(one_video, root)

    assert _states(id1, id2) == ["CRASHED", "CRASHED"]
    assert not (root / "_lock").exists()


def test_root_tag_is_on_flow_runs_not_on_shard_task_runs(prefect_harness, one_video, tmp_path):
    """The root's tag marks the run and its stage-graph subflow run (what the sweep finds); the (stage, shard)
    task runs leave it off, because Prefect takes and releases a tag-concurrency slot on the server for every
    task run that has any tag. A user's own tags still reach the task runs."""
    import uuid

    from prefect import get_client, tags
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags, TaskRunFilter, TaskRunFilterFlowRunId

    from flows.pipeline import pipeline, root_tag

    out = tmp_path / "out"
    tag = root_tag(str(out))
    user = f"user-{uuid.uuid4().hex[:8]}"
    with tags(tag, user):
        pipeline(input=str(one_video), out=str(out), stages=["ingest"])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
        assert len(runs) == 2 and sum(r.parent_task_run_id is None for r in runs) == 1  # the run and its subflow
        sub = next(r for r in runs if r.parent_task_run_id is not None)
        shard_runs = eventually(lambda: client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[sub.id]))), lambda rs: len(rs) > 0)
    assert shard_runs and all(r.name.startswith("ingest / shard") for r in shard_runs)
    assert all(user in r.tags and tag not in r.tags for r in shard_runs), [r.tags for r in shard_runs]
