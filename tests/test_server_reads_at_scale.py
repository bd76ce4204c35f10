"""What motionforge reads back from the Prefect server holds at scale: a flow run with more task runs than one
page of the API (the server answers a read with no limit with ``PREFECT_SERVER_API_DEFAULT_LIMIT`` rows, 200 by
default, newest id first).

At a million videos one stage-graph run has tens of thousands of (stage, shard) task runs. The ones that matter
to these reads (failed, still running) can be anywhere among them; here they are the oldest, behind 250 finished
ones, where a first page of 200 never reaches."""
from __future__ import annotations

import pytest

FINISHED = 250  # more than the server's default page of 200


def _stage_graph_run(client, flow_fn, first: list) -> tuple:
    """A flow run of ``flow_fn`` with task runs named as the pipeline names them: ``first`` (states) created
    first, then :data:`FINISHED` Completed ones. Their ids are time-ordered UUIDs made on the client, as Prefect's
    task runners make them (``uuid7`` at submission), so the ``first`` ones sort last on the server's default
    order (id, newest first). Returns (flow run, ids of all its task runs in the order made)."""
    from prefect import task
    from prefect._internal.uuid7 import uuid7
    from prefect.states import Completed, Running

    @task(name="stage-shard")
    def stage_shard():
        pass

    fr = client.create_flow_run(flow_fn, state=Running())
    ids = []
    for k, state in enumerate(first + [Completed() for _ in range(FINISHED)]):
        ids.append(client.create_task_run(stage_shard, flow_run_id=fr.id, dynamic_key=str(k), id=uuid7(),
                                          name=f"scenes / shard {k:05d}", state=state).id)
    return fr, ids


@pytest.mark.timeout(300)
def test_crash_sweep_reaches_open_task_runs_behind_a_full_page(prefect_harness):
    """A killed run's task runs left Running or Pending are set Crashed however many finished ones came after
    them; finished ones keep their state."""
    from prefect import flow, get_client
    from prefect.states import Pending, Running

    from flows.pipeline import _crash_with_children

    @flow(name="motionforge-stages")
    def graph():
        pass

    with get_client(sync_client=True) as client:
        fr, ids = _stage_graph_run(client, graph, [Running(), Pending(), Running()])
        marked, n_open = _crash_with_children(client, [client.read_flow_run(fr.id)], "killed")
        states = [client.read_task_run(i).state.type.value for i in ids[:3] + ids[-1:]]
    assert (marked, n_open) == (1, 3)
    assert states == ["CRASHED"] * 3 + ["COMPLETED"]


@pytest.mark.timeout(300)
def test_server_runs_lists_failed_shards_behind_a_full_page(prefect_harness, monkeypatch):
    """``motionforge runs`` / ``status --server`` show a shard that failed early in a long run."""
    from prefect import flow, get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import AwaitingRetry, Completed, Failed, Running

    from flows import server_status

    @flow(name="motionforge-stages")
    def graph():
        pass

    with get_client(sync_client=True) as client:
        fr, _ = _stage_graph_run(client, graph, [Failed(message="bad shard"), Completed(), AwaitingRetry(),
                                                 Running()])
    monkeypatch.setattr(server_status, "server_configured", lambda: PREFECT_API_URL.value() or "harness")
    data = server_status.server_runs(limit=50)
    run = next(r for r in data["runs"] if r["id"] == str(fr.id))
    assert [(x["stage"], x["shard"], x["state"]) for x in run["task_runs"]] == [
        ("scenes", 0, "Failed"), ("scenes", 2, "AwaitingRetry"), ("scenes", 3, "Running")]
    assert run["task_runs"][0]["message"] == "bad shard"


def test_runs_table_lists_the_first_shards_of_a_run_and_counts_the_rest():
    """Thousands of failed shards (a bad config fails every shard of a stage) print as the first few and a count,
    not as one table cell of thousands of entries."""
    import io

    from rich.console import Console

    from flows.cli_ops import SHOWN_PER_RUN, print_runs

    n = SHOWN_PER_RUN + 25
    data = {"api_url": "http://x/api", "runs": [{
        "flow": "motionforge-stages", "flow_run": "ingest / 0-9999", "id": "1", "state": "Failed",
        "state_type": "FAILED", "start_time": "2026-12-03T08:00:00", "out": "/o", "stage": None,
        "task_runs": [{"stage": "scenes", "shard": k, "state": "Failed", "message": f"boom {k}"} for k in range(n)]}]}
    buf = io.StringIO()
    print_runs(data, Console(file=buf, width=400))
    text = buf.getvalue()
    assert f"shard {SHOWN_PER_RUN - 1:05d}: Failed" in text and f"shard {SHOWN_PER_RUN:05d}" not in text
    assert f"boom {SHOWN_PER_RUN - 1}" in text and f"boom {SHOWN_PER_RUN}" not in text
    assert text.count("... and 25 more (--json lists all)") == 2  # the table's cell and the messages


@pytest.mark.timeout(300)
def test_server_runs_finds_a_roots_runs_by_tag_past_a_page_of_other_runs(prefect_harness, monkeypatch, tmp_path):
    """A root's runs are found by its tag under any spelling of the root, behind a page of newer runs on other
    roots; a ``--limit`` above the server's page (200, the most one read may ask for) reads further pages."""
    from prefect import flow, get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Completed

    from flows import server_status

    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "alias").symlink_to(root)

    @flow(name="motionforge-pipeline")
    def pipeline():
        pass

    with get_client(sync_client=True) as client:
        mine = [client.create_flow_run(pipeline, tags=[server_status.root_tag(str(root))], state=Completed()).id
                for _ in range(2)]
        for k in range(FINISHED):
            client.create_flow_run(pipeline, tags=[server_status.root_tag(str(tmp_path / f"other{k % 3}"))],
                                   state=Completed())
    monkeypatch.setattr(server_status, "server_configured", lambda: PREFECT_API_URL.value() or "harness")
    found = server_status.server_runs(str(tmp_path / "alias") + "/", limit=FINISHED + 10)
    assert sorted(r["id"] for r in found["runs"]) == sorted(map(str, mine))
    assert len(server_status.server_runs(limit=FINISHED + 1)["runs"]) == FINISHED + 1
