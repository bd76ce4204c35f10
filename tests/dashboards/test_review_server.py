"""The review server's HTTP API (no browser): decisions go to the store `review import` writes, bad requests
store nothing, many reviewers at once lose nothing, conflicts show, videos seek, the token is required
off loopback, and the explorer's filters."""
from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from schemas._base import from_table
from schemas.reviews import SCHEMA as REVIEW_SCHEMA, Review
from stages.motionbench import review
from stages.runner import run_shard, shard_state
from storage.root import OutputRoot
from dashboards.server import check_bind, create_app
from tests._video_fixtures import require_ffmpeg
from tests.dashboards._roots import MB_QUESTIONS, imove_root, motionbench_root


@pytest.fixture()
def mb(tmp_path):
    require_ffmpeg()
    root, by_id = motionbench_root(tmp_path)
    pending = [qid for qid, q in by_id.items() if q is not MB_QUESTIONS[3]]
    return root, by_id, pending


def _stored(root) -> list[review.Decision]:
    return review.decision_history(root, 0)


def _batch_files(root) -> list[str]:
    return root.list_dir(root.path(*review.DECISIONS_DIR, "shard-00000"))


def test_accept_reject_edit_reach_the_review_stage(mb):
    root, by_id, pending = mb
    client = TestClient(create_app(root.url))
    run_shard(review.STAGE, root, review.ReviewConfig(mode="required"), 0)
    assert shard_state(review.STAGE, root, 0) == "complete"
    a, r, e = pending
    assert client.post("/api/review/decisions", json={"question_id": a, "decision": "accept", "reviewer": "ann"}).status_code == 201
    resp = client.post("/api/review/decisions", json={"question_id": r, "decision": "reject", "reviewer": "ann",
                                                      "reason": "two options are right"})
    assert resp.status_code == 201 and resp.json()["reason"] == "two options are right"
    opts = {"A": "Wave", "B": "Sit down", "C": "Jump", "D": "Clap"}
    resp = client.post("/api/review/decisions", json={"question_id": e, "decision": "edit", "reviewer": "bob",
                                                      "reason": "option B was vague", "question": by_id[e][0],
                                                      "options": opts, "answer": "b", "category": "MR"})
    assert resp.status_code == 201, resp.text
    # the import store: batch files the review stage reads as an external input -> the shard went stale
    assert shard_state(review.STAGE, root, 0) == "stale"
    run_shard(review.STAGE, root, review.ReviewConfig(mode="required"), 0)
    rows = {x.question_id: x for x in from_table(root.read_stage("review", REVIEW_SCHEMA), Review)}
    assert rows[a].status == "ok" and rows[a].reviewer == "ann" and rows[a].decision == "accept"
    assert rows[r].status == "skipped" and "two options are right" in rows[r].error
    assert rows[e].edited and rows[e].options == list(opts.values()) and rows[e].answer == "B" and rows[e].category == "MR"
    assert all(x.decided_at is not None for x in rows.values())
    prog = client.get("/api/review/progress").json()
    assert (prog["reviewed"], prog["total"], prog["pending"]) == (3, 3, 0)
    assert prog["by_reviewer"]["ann"]["reviewed"] == 2 and prog["by_reviewer"]["bob"]["edit"] == 1
    assert client.get("/api/review/next", params={"reviewer": "ann"}).json() == {"question_id": None, "held_by_others": 0}


@pytest.mark.parametrize("body,status,needle", [
    ({"question_id": "no-such-id", "decision": "accept", "reviewer": "ann"}, 404, "unknown question"),
    ({"decision": "reject", "reviewer": "ann"}, 400, "reason"),
    ({"decision": "accept"}, 400, "reviewer"),
    ({"decision": "maybe", "reviewer": "ann"}, 400, "accept, reject or edit"),
    ({"decision": "edit", "reviewer": "ann", "reason": "x", "question": "How many bounces?",
      "options": ["Once", "Twice", "Three times"], "answer": "A"}, 400, "four non-empty options"),
    ({"decision": "edit", "reviewer": "ann", "reason": "x", "question": "How many bounces?",
      "options": {"A": "Once", "B": "Twice", "C": "Thrice", "D": "Never"}, "answer": "E"}, 400, "A, B, C, D"),
    ({"decision": "edit", "reviewer": "ann", "reason": "x", "question": "How many bounces?",
      "options": {"A": "Once", "B": "Once", "C": "Thrice", "D": "Never"}, "answer": "A"}, 400, "repeat"),
    ({"decision": "accept", "reviewer": "ann", "category": "XX"}, 400, "category"),
])
def test_bad_requests_store_nothing(mb, body, status, needle):
    root, by_id, pending = mb
    client = TestClient(create_app(root.url))
    body = {"question_id": pending[0], **body}
    resp = client.post("/api/review/decisions", json=body)
    assert resp.status_code == status and needle in resp.json()["error"], resp.text
    assert _batch_files(root) == [] and _stored(root) == []


def test_dropped_question_and_non_json_are_refused(mb):
    root, by_id, _ = mb
    client = TestClient(create_app(root.url))
    dropped = next(qid for qid, q in by_id.items() if q is MB_QUESTIONS[3])
    resp = client.post("/api/review/decisions", json={"question_id": dropped, "decision": "accept", "reviewer": "a"})
    assert resp.status_code == 409 and "not waiting for review" in resp.json()["error"]
    resp = client.post("/api/review/decisions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    resp = client.post("/api/review/decisions", content=b'{"question_id": "x"}', headers={"content-type": "text/plain"})
    assert resp.status_code == 415  # what a cross-site form could send
    assert client.get("/api/review/questions/nope").status_code == 404
    assert _batch_files(root) == []


def test_many_reviewers_at_once_lose_nothing(mb):
    root, by_id, pending = mb
    app = create_app(root.url)
    jobs = [(qid, f"rev{k}") for k in range(8) for qid in pending]  # 24 decisions, 8 reviewers

    def post(job):
        qid, who = job
        with TestClient(app) as c:
            return c.post("/api/review/decisions", json={"question_id": qid, "decision": "accept", "reviewer": who}).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, jobs))
    assert codes == [201] * len(jobs)
    stored = {(d.question_id, d.reviewer) for d in _stored(root)}
    assert stored == set(jobs)


def test_disagreement_is_a_conflict(mb):
    root, by_id, pending = mb
    client = TestClient(create_app(root.url))
    q0, q1 = pending[:2]
    for who, dec in (("ann", "accept"), ("bob", "reject")):
        client.post("/api/review/decisions", json={"question_id": q0, "decision": dec, "reviewer": who, "reason": "r"})
    for who in ("ann", "bob"):
        client.post("/api/review/decisions", json={"question_id": q1, "decision": "accept", "reviewer": who})
    prog = client.get("/api/review/progress").json()
    assert [c["question_id"] for c in prog["conflicts"]] == [q0]
    assert client.get(f"/api/review/questions/{q0}").json()["conflict"] is True
    assert client.get(f"/api/review/questions/{q1}").json()["conflict"] is False
    # bob changes his mind: they agree now
    client.post("/api/review/decisions", json={"question_id": q0, "decision": "accept", "reviewer": "bob"})
    assert client.get("/api/review/progress").json()["conflicts"] == []


def test_two_reviewers_get_different_questions(mb):
    root, _, pending = mb
    client = TestClient(create_app(root.url))
    first = client.get("/api/review/next", params={"reviewer": "ann"}).json()["question_id"]
    second = client.get("/api/review/next", params={"reviewer": "bob"}).json()["question_id"]
    assert first in pending and second in pending and first != second
    # ann asking again keeps her own question
    assert client.get("/api/review/next", params={"reviewer": "ann"}).json()["question_id"] == first
    # ann skips on: her claim moves with her (one open question per reviewer), bob's stays his
    third = client.get("/api/review/next", params={"reviewer": "ann", "after": first}).json()["question_id"]
    assert third not in (first, second)
    carl = client.get("/api/review/next", params={"reviewer": "carl"}).json()
    assert carl == {"question_id": first, "held_by_others": 0}
    assert client.get("/api/review/next", params={"reviewer": "dora"}).json() == {"question_id": None, "held_by_others": 3}
    assert client.get("/api/review/next").status_code == 400


def test_video_is_served_with_range_and_first_frame(mb):
    root, _, pending = mb
    client = TestClient(create_app(root.url))
    q = client.get(f"/api/review/questions/{pending[0]}").json()
    full = client.get(q["video_url"])
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    part = client.get(q["video_url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == full.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(full.content)}"
    img = client.get(q["first_frame_url"])
    assert img.status_code == 200 and img.content[:3] == b"\xff\xd8\xff"  # JPEG magic
    assert (q["start_s"], q["end_s"]) == (1.0, 2.0) and len(q["judges"]) == 2


def test_token_required_off_loopback(mb):
    root, _, _ = mb
    assert check_bind("127.0.0.1", None) is None and check_bind("localhost", None) is None
    token = check_bind("0.0.0.0", None)
    assert token and len(token) >= 16
    client = TestClient(create_app(root.url, token=token))
    assert client.get("/api/review/progress").status_code == 401
    assert client.get("/api/review/progress", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get(f"/review?token={token}").status_code == 200
    assert client.get("/api/review/progress").status_code == 200  # the cookie set by the first visit
    assert TestClient(create_app(root.url, token=token)).get("/review?token=wrong").status_code == 401


def test_explorer_api_filters(tmp_path):
    root, info = imove_root(tmp_path)
    client = TestClient(create_app(root.url))
    data = client.get("/api/imove/instances").json()
    assert data["facets"]["status"] == {"in dataset": 1, "dropped at trackfilter": 1}
    reason = next(iter(data["facets"]["reason"]))
    assert "<n>" in reason and "mean CLIP score" in reason
    only = client.get("/api/imove/instances", params={"reason": reason}).json()["instances"]
    assert [r["instance_id"] for r in only] == [info["dropped"][0].instance_id]
    kept = client.get("/api/imove/instances", params={"status": "in dataset"}).json()["instances"]
    assert [r["instance_id"] for r in kept] == [info["kept"][0].instance_id]
    detail = client.get(f"/api/imove/instances/{info['kept'][0].instance_id}").json()
    assert sorted(s["task"] for s in detail["samples"]) == ["dynamic_captioning", "spatial_grounding", "temporal_grounding"]
    assert detail["check"]["accepted"] is True and detail["caption"]["static_caption"]
    assert client.get("/api/imove/instances/nope").status_code == 404
    # a page at a time: the total and the facets count every instance
    first = client.get("/api/imove/instances", params={"limit": 1}).json()
    second = client.get("/api/imove/instances", params={"limit": 1, "offset": 1}).json()
    assert (first["total"], second["total"], len(first["instances"]), len(second["instances"])) == (2, 2, 1, 1)
    assert first["facets"] == second["facets"] == data["facets"]
    assert [r["instance_id"] for r in first["instances"] + second["instances"]] == \
           [r["instance_id"] for r in data["instances"]]
    assert client.get("/api/imove/instances", params={"limit": 0}).status_code == 422
    assert client.get(detail["video_url"], headers={"Range": "bytes=0-9"}).status_code == 206


def _serve(root, *extra: str):
    from tests.dashboards._browser import _free_port

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.pop("MOTIONFORGE_REVIEW_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "review", "serve", "--out", root.url, "--port", str(port),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return proc, port


def test_cli_serves_and_needs_a_token_off_loopback(mb):
    root, _, pending = mb
    proc, port = _serve(root, "--host", "0.0.0.0")
    try:
        line = proc.stdout.readline()  # the URL to open, printed once the app is built
        assert "?token=" in line, line
        token = line.split("?token=")[1].split()[0]
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # uvicorn binds just after printing; wait for it (up to 60 s on a loaded machine)
            try:
                r = httpx.get(f"{url}/api/review/progress", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.status_code == 401
        r = httpx.get(f"{url}/api/review/progress", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200 and r.json()["total"] == len(pending)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_decisions_from_review_import_show_in_the_server(mb, tmp_path):
    root, by_id, pending = mb
    client = TestClient(create_app(root.url))
    sheet = tmp_path / "queue.jsonl"
    items = [it for it in review.pending_items(root) if it["question_id"] == pending[0]]
    items[0].update(decision="reject", reason="not about the video")
    review.write_queue(sheet, items)
    by_shard, _, problems = review.import_decisions(root, sheet, default_reviewer="sheet-rev")
    assert problems == []
    review.store_decisions(root, by_shard)
    q = client.get(f"/api/review/questions/{pending[0]}").json()
    assert [(d["reviewer"], d["decision"]) for d in q["history"]] == [("sheet-rev", "reject")]
    assert client.get("/api/review/progress").json()["reviewed"] == 1
    # and the server's next question skips it
    seen = {client.get("/api/review/next", params={"reviewer": f"r{k}"}).json()["question_id"] for k in range(3)}
    assert pending[0] not in seen


def test_a_batch_being_written_is_not_read_yet(tmp_path):
    """While one reviewer's batch is between its temp file and the rename, another request reads the history:
    it sees the finished batches only, and the decisions' fingerprint does not change."""
    root = OutputRoot(tmp_path / "root")
    (done,) = review.store_decisions(root, {0: [review.Decision("q1", "accept", "ann")]})
    before = review.decisions_fingerprint(root, 0)
    Path(root._tmp_beside(done.replace(".jsonl", "-next.jsonl"))).write_bytes(b'{"question_id": "q2", "dec')
    assert [(d.question_id, d.reviewer) for d in review.decision_history(root, 0)] == [("q1", "ann")]
    assert review.decisions_fingerprint(root, 0) == before


def test_explorer_lists_from_a_few_columns_and_opens_one_instance_from_its_shard(tmp_path, monkeypatch):
    """The list reads only the columns it shows (never a track's points or a sample's conversations); opening
    an instance reads its own shard of each stage, not every shard."""
    import collections

    from dashboards import review_data as rd
    from tests.dashboards._roots import COPIES, spread

    src, info = imove_root(tmp_path / "one")
    root = OutputRoot(tmp_path / "spread")
    spread(src, root)
    reads: list[tuple] = []
    real = OutputRoot.read_shard

    def counting(self, stage, shard, schema=None, columns=None, **kw):
        reads.append((stage, shard, None if columns is None else tuple(columns)))
        return real(self, stage, shard, schema, columns, **kw)

    monkeypatch.setattr(OutputRoot, "read_shard", counting)
    tables = rd.Tables(root)
    rows = rd.imove_instances(tables)
    assert len(rows) == 2 * COPIES and all(cols is not None for _, _, cols in reads)
    assert all("points" not in cols and "conversations" not in cols for _, _, cols in reads)
    assert max(collections.Counter(reads).values()) == 1
    reads.clear()
    iid = f"{info['kept'][0].instance_id}~3"
    detail = rd.imove_instance(tables, iid)
    assert {(stage, shard) for stage, shard, _ in reads} == {(s, 3) for s in rd.IMOVE_STAGES}
    assert detail["summary"]["shard"] == 3 and detail["track"]["instance_id"] == iid
    assert len(detail["track"]["points"]) == len(info["kept"][1].points)
    assert sorted(x["task"] for x in detail["samples"]) == ["dynamic_captioning", "spatial_grounding",
                                                            "temporal_grounding"]
    reads.clear()
    assert rd.imove_instances(tables) == rows and reads == []  # kept until a shard is written
