"""ingest: inputs from folders, manifests and URLs; probing; content ids; filters; each bad kind is a row."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.videos import Video
from stages import ingest
from stages.runner import run_shard
from storage.manifest import record_plan
from storage.root import OutputRoot


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, bikes_mp4) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    shutil.copy(bikes_mp4, d / "bikes.mp4")
    (d / "sub").mkdir()
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=2", "-pix_fmt", "yuv420p", str(d / "sub" / "small.mkv"))
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.mp4").write_text("these are not the frames you are looking for\n")
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", str(d / "audio_only.m4a"))
    os.rename(d / "audio_only.m4a", d / "audio_only.mp4")
    data = (d / "bikes.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (d / "readme.txt").write_text("not a video name, ignored in folder mode")
    (d / ".hidden.mp4").write_bytes(data)
    return d


def _run(tmp_path, uris, cfg=None) -> list[Video]:
    root = OutputRoot(tmp_path / "out")
    record_plan(root, ingest.make_plan(uris, 100))
    run_shard(ingest.STAGE, root, cfg or ingest.IngestConfig(), 0)
    from schemas._base import from_table

    return from_table(root.read_shard("ingest", 0), Video)


def test_folder_listing_is_recursive_and_ignores_non_videos(inputs):
    found = [os.path.relpath(p, inputs) for p in ingest.list_inputs(str(inputs))]
    assert found == sorted(["audio_only.mp4", "bikes.mp4", "empty.mp4", "notes.mp4", "sub/small.mkv", "truncated.mp4"])


def test_manifests_csv_jsonl_parquet(inputs, tmp_path):
    rel = ["bikes.mp4", "sub/small.mkv"]
    (inputs / "m.csv").write_text("path,label\n" + "\n".join(f"{p},x" for p in rel) + "\n")
    (inputs / "m.jsonl").write_text("\n".join(json.dumps({"path": p}) for p in rel) + "\n")
    pq.write_table(pa.table({"path": rel}), inputs / "m.parquet")
    want = sorted(str(inputs / p) for p in rel)
    for name in ("m.csv", "m.jsonl", "m.parquet"):
        assert ingest.list_inputs(str(inputs / name)) == want
    (tmp_path / "bad.csv").write_text("file\nx.mp4\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        ingest.list_inputs(str(tmp_path / "bad.csv"))


def test_fsspec_url_input(inputs, tmp_path):
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe("/vids/a/clip.mp4", (inputs / "sub" / "small.mkv").read_bytes())
    assert ingest.list_inputs("memory://vids") == ["memory:///vids/a/clip.mp4"]
    rows = _run(tmp_path, ["memory:///vids/a/clip.mp4"])
    assert rows[0].status == "ok", rows[0].error
    assert rows[0].uri == "memory:///vids/a/clip.mp4" and os.path.exists(rows[0].path)


def test_good_and_bad_files_become_rows_with_clear_reasons(inputs, tmp_path):
    uris = ingest.list_inputs(str(inputs)) + [str(inputs / "missing.mp4")]
    rows = {os.path.basename(r.uri): r for r in _run(tmp_path, uris)}
    assert len(rows) == 7
    good = rows["bikes.mp4"]
    assert good.status == "ok" and (good.width, good.height) == (640, 272)
    assert abs(good.duration_s - 10.0) < 0.1 and good.frame_count == 250 and good.codec == "h264"
    assert good.video_id == ingest.content_hash(str(inputs / "bikes.mp4")) and len(good.video_id) == 32
    assert rows["small.mkv"].status == "ok"
    reasons = {name: (r.status, r.error or "") for name, r in rows.items()}
    assert reasons["empty.mp4"][0] == "error" and "empty" in reasons["empty.mp4"][1]
    assert reasons["notes.mp4"][0] == "error" and "not a media file" in reasons["notes.mp4"][1]
    assert reasons["audio_only.mp4"][0] == "error" and "audio" in reasons["audio_only.mp4"][1]
    assert reasons["truncated.mp4"][0] == "error" and "truncat" in reasons["truncated.mp4"][1].lower()
    assert reasons["missing.mp4"][0] == "error" and ("not found" in reasons["missing.mp4"][1] or "does not exist" in reasons["missing.mp4"][1])
    # all distinct, person-readable reasons
    errs = [e for s, e in reasons.values() if s == "error"]
    assert len(set(errs)) == len(errs)


def test_content_id_is_stable_and_content_based(inputs, tmp_path):
    shutil.copy(inputs / "bikes.mp4", tmp_path / "renamed.mp4")
    a = _run(tmp_path / "a", [str(inputs / "bikes.mp4")])
    b = _run(tmp_path / "b", [str(tmp_path / "renamed.mp4")])
    assert a[0].video_id == b[0].video_id == ingest.content_hash(str(inputs / "bikes.mp4"))


def test_byte_identical_files_become_skipped_rows_naming_the_first(inputs, tmp_path):
    """Copies of one file, in the same shard and in a later shard: only the first in plan order is ingested;
    each copy is a skipped row that names it, whatever order the shards run in, and video ids stay unique."""
    d = tmp_path / "in"
    d.mkdir()
    src = inputs / "sub" / "small.mkv"
    for name in ("a.mkv", "b.mkv", "c.mkv"):
        shutil.copy(src, d / name)
    shutil.copy(inputs / "bikes.mp4", d / "d.mp4")
    (d / "e.mp4").write_bytes(src.read_bytes()[:-1] + bytes([src.read_bytes()[-1] ^ 1]))  # same size, 1 bit off
    uris = [str(d / n) for n in ("a.mkv", "b.mkv", "d.mp4", "c.mkv", "e.mp4")]
    root = OutputRoot(tmp_path / "out")
    record_plan(root, {"version": 1, "shard_size": 2, "shards": [uris[:2], uris[2:4], uris[4:]]})
    for k in (2, 1, 0):  # later shards first: the verdict must not depend on what ran before
        run_shard(ingest.STAGE, root, ingest.IngestConfig(), k)
    from schemas._base import from_table

    rows = {os.path.basename(r.uri): r for r in from_table(root.read_stage("ingest"), Video)}
    first = ingest.content_hash(str(d / "a.mkv"))
    assert rows["a.mkv"].status == "ok" and rows["a.mkv"].video_id == first
    for copy, shard in (("b.mkv", 0), ("c.mkv", 1)):
        r = rows[copy]
        assert r.status == "skipped" and r.shard == shard
        assert r.error.startswith("duplicate:") and str(d / "a.mkv") in r.error and "(shard 0)" in r.error
    assert rows["d.mp4"].status == "ok" and rows["e.mp4"].status == "ok"  # equal size alone is no duplicate
    ids = [r.video_id for r in rows.values()]
    assert len(set(ids)) == len(ids)
    assert len([r for r in rows.values() if r.status == "ok"]) == 3


def test_filters_and_named_preset(inputs, tmp_path):
    uris = [str(inputs / "bikes.mp4"), str(inputs / "sub" / "small.mkv")]
    rows = _run(tmp_path / "p", uris, ingest.IngestConfig(preset="motionbench_fields"))
    by = {os.path.basename(r.uri): r for r in rows}
    # bikes is 640x272: short side 272 < 448 -> skipped with the reason; nothing is lost
    assert by["bikes.mp4"].status == "skipped" and "short side 272" in by["bikes.mp4"].error
    rows = _run(tmp_path / "d", uris, ingest.IngestConfig(max_duration_s=5))
    by = {os.path.basename(r.uri): r for r in rows}
    assert by["bikes.mp4"].status == "skipped" and "exceeds max_duration_s=5" in by["bikes.mp4"].error
    assert by["small.mkv"].status == "ok"
    assert ingest.IngestConfig().max_duration_s is None  # the preset is not the default
    with pytest.raises(ValueError, match="unknown ingest preset"):
        ingest.IngestConfig(preset="nope")


def test_plan_keeps_assignments_when_inputs_grow():
    p1 = ingest.make_plan(["a", "b", "c"], 2)
    assert p1["shards"] == [["a", "b"], ["c"]]
    p2 = ingest.make_plan(["a", "b", "c", "d", "e", "f"], 2, p1)
    assert p2["shards"][:1] == [["a", "b"]] and p2["shards"][1] == ["c", "d"] and p2["shards"][2] == ["e", "f"]


def _planned_files(tmp_path, contents: list[bytes], per_shard: int) -> tuple[list[str], dict]:
    """One file per content under ``tmp_path/in``, and an ingest plan of them, ``per_shard`` a shard."""
    d = tmp_path / "in"
    d.mkdir()
    uris = []
    for i, data in enumerate(contents):
        p = d / f"v{i:03d}.bin"
        p.write_bytes(data)
        uris.append(str(p))
    return uris, {"version": 1, "shards": [uris[k:k + per_shard] for k in range(0, len(uris), per_shard)]}


def test_duplicate_check_sizes_each_planned_file_once(tmp_path, monkeypatch):
    """Looking for an earlier copy of every file of a plan sizes each planned file once in all, not once per
    later file (which was N^2 / 2 size checks for a plan of N files), and still finds the first copy."""
    n = 60
    # 45: the bytes of 3 (and of 10, 17, ...)
    uris, plan = _planned_files(tmp_path, [b"x" * (100 + i % 7) if i != 45 else b"x" * (100 + 3) for i in range(n)], 4)
    calls = []
    real = ingest._size_of
    monkeypatch.setattr(ingest, "_size_of", lambda u: calls.append(u) or real(u))
    found = {}
    for k, shard in enumerate(plan["shards"]):
        for j, u in enumerate(shard):
            found[u] = ingest.earlier_duplicate(plan, k, j, os.path.getsize(u), ingest._hash_of(u), str(tmp_path / "c"))
    assert len(calls) == len(set(calls)) <= n
    assert found[uris[3]] is None and found[uris[10]] == (uris[3], 0) and found[uris[45]] == (uris[3], 0)
    # byte-equal files of one size: each later one names the first in plan order
    assert all(found[u] == (uris[i % 7], (i % 7) // 4) for i, u in enumerate(uris) if i >= 7 and i != 45)


def test_duplicate_check_hashes_each_file_of_one_size_once_in_any_order(tmp_path, monkeypatch):
    """Many different files of one size (a constant-bitrate dataset): the check looks each up once in all (stat,
    local copy, hash; the hash itself was always cached), not every earlier one again for each later file
    (N^2 / 2 look-ups), and still names the first copy in plan order, whichever order the shards are checked in
    (parallel tasks finish in any order)."""
    n = 40
    # one size; the bytes of i repeat every 13 files
    uris, plan = _planned_files(tmp_path, [b"%04d" % (i % 13) + b"y" * 96 for i in range(n)], 3)
    vids = {u: ingest.content_hash(u) for u in uris}
    hashed = []
    real = ingest._hash_of
    monkeypatch.setattr(ingest, "_hash_of", lambda p: hashed.append(p) or real(p))
    found = {}
    for k in reversed(range(len(plan["shards"]))):
        for j, u in enumerate(plan["shards"][k]):
            found[u] = ingest.earlier_duplicate(plan, k, j, os.path.getsize(u), vids[u], str(tmp_path / "c"))
    assert len(hashed) == len(set(hashed)) <= n
    assert all(found[u] == (None if i < 13 else (uris[i % 13], (i % 13) // 3)) for i, u in enumerate(uris))
