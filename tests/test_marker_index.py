"""The marker index (storage/marker_index.py): one file per stage that `status` reads instead of every marker.

Its rows must be what the marker files say (read here with ``json`` alone), it must answer alone only when it can
prove itself current, see every change made through the root's writes, and `status` judged from it must give the
runner's own verdict (``shard_state``) for every shard of every stage, under random damage.
"""
from __future__ import annotations

import collections
import json
import os
import random

import pytest

from dashboards.status import root_status
from stages.registry import STAGE_MODULES, get_stage
from stages.runner import shard_state
from stages.shared.reasons import normalise_reason
from storage.manifest import read_manifest, record_stage_config
from storage.marker_index import SLIM_FIELDS, drop_index, index_file, stage_markers
from storage.root import OutputRoot
from tests._benchmarks import load_benchmark

RULES = "test-rules"


def _full_root(tmp_path, n: int) -> OutputRoot:
    return load_benchmark("bench_status").build_full_root(tmp_path / "r", n)


def _settle(root: OutputRoot, stage: str) -> None:
    """Date the markers folder's last change a minute back, as a folder left alone since looks."""
    folder = root.path(stage, "_markers")
    past = os.stat(folder).st_mtime_ns - 60 * 10**9
    os.utime(folder, ns=(past, past))


def _files(root: OutputRoot, stage: str) -> dict[int, dict]:
    folder = root.path(stage, "_markers")
    return {int(name[len("shard-"):-len(".json")]): json.loads(open(os.path.join(folder, name), "rb").read())
            for name in sorted(os.listdir(folder)) if name.startswith("shard-") and name.endswith(".json")}


def _check_rows(sm, files: dict[int, dict]) -> None:
    """Every row is its marker file's content; totals and causes are the fold over the files in shard order."""
    assert sm.table.column("shard").to_pylist() == sorted(files)
    rows = {r["shard"]: r for r in sm.table.to_pylist()}
    counts, example = collections.Counter(), {}
    for k in sorted(files):
        m = files[k]
        assert sm.marker(k) == {f: m[f] for f in SLIM_FIELDS if f in m}, k
        assert [rows[k][f] for f in ("ok", "error", "skipped")] == [m.get(f, 0) for f in ("ok", "error", "skipped")]
        for reason, n in m.get("top_errors") or []:
            counts[normalise_reason(reason)] += n
            example.setdefault(normalise_reason(reason), reason)
    assert sm.totals == {f: sum(m.get(f, 0) for m in files.values()) for f in ("ok", "error", "skipped")}
    assert [tuple(r) for r in sm.reasons] == [(c, n, example[c]) for c, n in counts.items()]


def test_marker_index_rows_are_the_markers(tmp_path):
    """Markers of every shape a marker may take: two error messages of one cause, none, an input that is not a
    string, an integer past 64 bits, a config hash that is not a string, a fingerprint that is no UTF-8 (JSON
    allows a lone surrogate); and the index read back from its file."""
    root = _full_root(tmp_path, 12)
    m = root.read_marker("tag", 2)
    root.write_marker("tag", 2, dict(m, top_errors=[["tag failed on clip 7: boom", 2], ["no tags for 'cat'", 1]]))
    root.write_marker("tag", 3, dict(root.read_marker("tag", 3), top_errors=[], ok=4, error=0))
    root.write_marker("tag", 4, dict(root.read_marker("tag", 4), inputs={"scenes": 5}))
    root.write_marker("tag", 5, dict(root.read_marker("tag", 5), inputs={"scenes": "x", "extra": 2 ** 70}))
    root.write_marker("tag", 6, dict(root.read_marker("tag", 6), config_hash=7))
    root.write_marker("tag", 7, dict(root.read_marker("tag", 7), fingerprint="\ud800 lone surrogate"))  # not UTF-8
    built = stage_markers(root, "tag", normalise_reason, RULES)
    assert built.read == 12 and built.written
    _check_rows(built, _files(root, "tag"))
    again = stage_markers(root, "tag", normalise_reason, RULES)  # from the file (per-file stamps, or alone)
    assert again.read == 0
    _check_rows(again, _files(root, "tag"))
    assert stage_markers(root, "absent", normalise_reason, RULES).table.num_rows == 0


def test_marker_index_answers_alone_when_its_folder_is_unchanged(tmp_path, monkeypatch):
    """A settled folder whose stamp the index recorded: no marker is read, nor even stat-ed."""
    root = _full_root(tmp_path, 8)
    _settle(root, "scenes")
    first = stage_markers(root, "scenes", normalise_reason, RULES)
    assert first.written and first.read == 8
    monkeypatch.setattr(OutputRoot, "file_stamps", lambda *a: pytest.fail("listed the markers folder"))
    monkeypatch.setattr(OutputRoot, "read_json", lambda *a, **k: pytest.fail("read a marker"))
    again = stage_markers(root, "scenes", normalise_reason, RULES)
    assert again.read == 0 and not again.written and again.table.equals(first.table)
    assert again.totals == first.totals and again.reasons == first.reasons


def test_marker_index_sees_every_change(tmp_path):
    """Through the root's own writes: a marker rewritten, deleted, added; each change read back, the rest kept.
    And a change in the same clock tick as the folder's last one (the folder's time left as it was): an index
    made while that folder's time was not yet past is checked file by file, and sees it."""
    root = _full_root(tmp_path, 8)
    _settle(root, "detect")
    stage_markers(root, "detect", normalise_reason, RULES)
    m = root.read_marker("detect", 1)
    root.write_marker("detect", 1, dict(m, fingerprint="rewritten", ok=9))
    root.delete_marker("detect", 4)
    root.write_marker("detect", 11, dict(m, fingerprint="new shard"))
    sm = stage_markers(root, "detect", normalise_reason, RULES)
    assert sm.read == 2 and sm.marker(1)["fingerprint"] == "rewritten" and sm.marker(4) is None
    assert sm.marker(11)["fingerprint"] == "new shard"
    _check_rows(sm, _files(root, "detect"))

    folder = root.path("detect", "_markers")
    future = os.stat(folder).st_mtime_ns + 3600 * 10**9  # later than the index's clock: not settled
    os.utime(folder, ns=(future, future))
    stage_markers(root, "detect", normalise_reason, RULES)
    root.write_marker("detect", 2, dict(root.read_marker("detect", 2), fingerprint="same tick"))
    os.utime(folder, ns=(future, future))  # the folder's stamp exactly as the index recorded it
    sm = stage_markers(root, "detect", normalise_reason, RULES)
    assert sm.read == 1 and sm.marker(2)["fingerprint"] == "same tick"


def test_marker_index_is_rebuilt_when_cut_or_made_under_other_rules(tmp_path, caplog):
    root = _full_root(tmp_path, 6)
    first = stage_markers(root, "track", normalise_reason, RULES)
    path = index_file(root, "track")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    cut = stage_markers(root, "track", normalise_reason, RULES)
    assert cut.read == 6 and cut.table.equals(first.table) and "unreadable" in caplog.text
    other = stage_markers(root, "track", lambda message: "one cause", "other-rules")
    assert other.read == 6 and [r[0] for r in other.reasons] == ["one cause"]


def test_marker_index_on_a_root_it_cannot_write(tmp_path):
    """Where the index folder cannot be made (here a file is in its way) nothing is written, nothing fails, and
    every call checks the markers' own stamps."""
    root = _full_root(tmp_path, 6)
    with open(root.path("_index"), "w") as f:
        f.write("in the way")
    sm = stage_markers(root, "ingest", normalise_reason, RULES)
    assert not sm.written and sm.read == 6
    _check_rows(sm, _files(root, "ingest"))
    assert root_status(root.url)["stages"][0]["complete"] == 6


def test_status_of_an_unchanged_local_root_reads_no_marker(tmp_path, monkeypatch):
    root = _full_root(tmp_path, 10)
    for name in STAGE_MODULES:
        _settle(root, name)
    first = root_status(root.url)
    monkeypatch.setattr(OutputRoot, "file_stamps", lambda *a: pytest.fail("listed a markers folder"))
    real = OutputRoot.read_json
    monkeypatch.setattr(OutputRoot, "read_json", lambda self, path, *a, **k: (
        pytest.fail(f"read {path}") if "/_markers/" in path else real(self, path, *a, **k)))
    assert root_status(root.url) == first


def _damage(root: OutputRoot, rng: random.Random, n: int) -> list[str]:
    """Random changes of the kinds a root meets, each through the root's own writes; what was done, for the
    failure message."""
    done = []
    per_shard = [s for s in STAGE_MODULES if get_stage(s).scope != "global"]
    for _ in range(rng.randint(3, 12)):
        stage, k = rng.choice(per_shard), rng.randrange(n)
        m = root.read_marker(stage, k)
        kind = rng.choice(["delete", "fingerprint", "config", "input", "extra-input", "drop-input", "odd-input",
                           "stage-config", "decisions", "imports", "same"])
        if kind == "stage-config":
            record_stage_config(root, stage, "%016x" % rng.getrandbits(64), {}, list(get_stage(stage).inputs))
        elif kind == "decisions":
            root.write_bytes_atomic(root.path("review", "_decisions", f"shard-{k:05d}", f"b{rng.random()}.jsonl"), b"")
        elif kind == "imports":
            root.write_bytes_atomic(root.path("describe", "_imported", f"i{rng.random()}.jsonl"), b"")
        elif m is None:
            continue
        elif kind == "delete":
            root.delete_marker(stage, k)
        elif kind == "fingerprint":
            root.write_marker(stage, k, dict(m, fingerprint=f"fp{rng.random()}"))
        elif kind == "config":
            root.write_marker(stage, k, dict(m, config_hash="c" * 16))
        elif kind in ("input", "extra-input", "drop-input", "odd-input") and m["inputs"]:
            inputs = dict(m["inputs"])
            key = rng.choice(sorted(inputs))
            if kind == "input":
                inputs[key] = f"was{rng.random()}"
            elif kind == "extra-input":
                inputs["calibration"] = "v2"
            elif kind == "drop-input":
                del inputs[key]
            else:
                inputs[key] = 5
            root.write_marker(stage, k, dict(m, inputs=inputs))
        elif kind == "same":
            root.write_marker(stage, k, m)  # rewritten as it was: a new file, the same content
        done.append(f"{kind} {stage} {k}")
    return done


@pytest.mark.parametrize("seed", range(6))
def test_status_verdicts_are_the_runners_under_random_damage(tmp_path, seed):
    """Every stage's complete / stale / pending shards as `status` gives them (a cold index, then the index it
    wrote, then after a second round of damage) are the runner's shard_state verdicts, shard by shard."""
    rng = random.Random(seed)
    n = 9
    root = _full_root(tmp_path, n)
    done = []
    for round_ in range(2):
        done += _damage(root, rng, n)
        if round_ == 0:
            drop_index(root)
        for name in ("describe", "review"):  # what status asks at once is what the runner asks shard by shard
            st = get_stage(name)
            assert st.external_inputs_of(root, list(range(n))) == [st.external_inputs(root, k) for k in range(n)]
        for _ in range(2):
            got = {s["stage"]: s for s in root_status(root.url)["stages"]}
            manifest = read_manifest(root)
            for name in STAGE_MODULES:
                st = get_stage(name)
                chash = manifest["stages"][name]["config_hash"]
                want = {k: shard_state(st, root, k, config_hash=chash) for k in ([0] if st.scope == "global" else range(n))}
                assert got[name]["stale_shards"] == [k for k, v in want.items() if v == "stale"], (name, done)
                assert got[name]["pending"] == sum(v == "pending" for v in want.values()), (name, done)
                assert got[name]["complete"] == sum(v == "complete" for v in want.values()), (name, done)


def _verdicts_match(root: OutputRoot, n: int, stages: dict | None = None) -> dict:
    got = {s["stage"]: s for s in root_status(root.url, stages=stages)["stages"]}
    manifest = read_manifest(root)
    for name, st in (stages or {s: get_stage(s) for s in STAGE_MODULES}).items():
        chash = manifest["stages"].get(name, {}).get("config_hash")
        want = {k: shard_state(st, root, k, config_hash=chash, lookup=(stages or {}).get) if stages else
                shard_state(st, root, k, config_hash=chash) for k in ([0] if st.scope == "global" else range(n))}
        assert got[name]["stale_shards"] == [k for k, v in want.items() if v == "stale"], name
        assert got[name]["complete"] == sum(v == "complete" for v in want.values()), name
    return got


def test_status_judges_markers_the_columns_cannot_hold_by_the_runners_rule(tmp_path):
    """A fingerprint that is no UTF-8 text or no string at all, recorded as such downstream: the index keeps those
    markers as written and `status` asks the runner's rule for them and the shards built from them."""
    n = 6
    root = _full_root(tmp_path, n)
    for k, fp in ((2, "\ud800x"), (3, 12345)):
        root.write_marker("ingest", k, dict(root.read_marker("ingest", k), fingerprint=fp))
        scenes = root.read_marker("scenes", k)
        root.write_marker("scenes", k, dict(scenes, inputs={"ingest": fp}))
    got = _verdicts_match(root, n)
    assert got["scenes"]["stale"] == 0 and got["tag"]["stale"] == 0  # complete, as the runner says


def test_status_reads_the_marker_name_the_runner_reads(tmp_path):
    """A stray ``shard-1.json`` beside ``shard-00001.json`` is not shard 1's marker: neither for the verdicts nor
    for the row counts."""
    n = 4
    root = _full_root(tmp_path, n)
    m = root.read_marker("tag", 1)
    root.write_bytes_atomic(root.path("tag", "_markers", "shard-1.json"),
                            json.dumps(dict(m, config_hash="other", ok=1000)).encode())
    got = _verdicts_match(root, n)
    assert got["tag"]["rows_ok"] == sum(root.read_marker("tag", k)["ok"] for k in range(n))


def test_status_of_a_stage_without_inputs_but_with_external_ones(tmp_path):
    """The runner records only the plan for a stage without inputs (its external inputs are not asked): so does
    `status`, for a stage passed in ``stages=``."""
    import dataclasses

    n = 5
    root = _full_root(tmp_path, n)
    ingest = dataclasses.replace(get_stage("ingest"), external_inputs=lambda r, k: {"calibration": "v2"})
    got = _verdicts_match(root, n, stages={"ingest": ingest})
    assert got["ingest"]["complete"] == n


def test_marker_index_keeps_row_counts_that_are_not_64_bit_integers(tmp_path):
    """Counts are summed as written (an integer past 64 bits, a float, true), and an error count of NaN survives
    the index being read back and updated."""
    import math

    n = 4
    root = _full_root(tmp_path, n)
    m = root.read_marker("tag", 0)
    root.write_marker("tag", 0, dict(m, ok=2**70, error=1.5, skipped=True))
    root.write_marker("tag", 1, dict(root.read_marker("tag", 1), top_errors=[["tag failed: x", float("nan")]]))
    files = _files(root, "tag")
    for _ in range(2):
        sm = stage_markers(root, "tag", normalise_reason, RULES)
        assert sm.totals == {f: sum(x.get(f, 0) for x in files.values()) for f in ("ok", "error", "skipped")}
        assert math.isnan(dict((c, k) for c, k, _ in sm.reasons)["tag failed: x"])
        root.write_marker("tag", 3, dict(root.read_marker("tag", 3)))  # a change: the index is updated, not rebuilt
    assert _verdicts_match(root, n)["tag"]["rows_ok"] == 2**70 + sum(files[k]["ok"] for k in (1, 2, 3))


def test_marker_index_with_odd_metadata_is_rebuilt(tmp_path, caplog):
    import pyarrow as pa

    root = _full_root(tmp_path, 4)
    first = stage_markers(root, "track", normalise_reason, RULES)
    path = index_file(root, "track")
    with pa.memory_map(path) as source:
        table = pa.ipc.open_file(source).read_all()
    meta = {**table.schema.metadata, b"reasons": b'[["cause only"]]'}
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as writer:
        writer.write_table(table)
    again = stage_markers(root, "track", normalise_reason, RULES)
    assert again.read == 4 and again.reasons == first.reasons and "unreadable" in caplog.text


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /mnt/shared rw,relatime shared:9 - nfs4 server:/export rw,vers=4.2
31 30 0:41 / /mnt/shared/local\\040scratch rw - xfs /dev/sdb1 rw
32 22 0:42 / /lustre rw - lustre 10.0.0.1@tcp:/fs rw
"""


def test_the_index_is_used_on_local_filesystems_only(tmp_path, monkeypatch):
    """Paths are found under the deepest mount point (spaces written as \\040); on a network filesystem `status`
    reads the markers themselves unless MOTIONFORGE_MARKER_INDEX=1."""
    import storage.marker_index as mi

    assert mi.filesystem_type("/mnt/shared/runs/a", MOUNTINFO) == "nfs4"
    assert mi.filesystem_type("/mnt/shared/local scratch/run", MOUNTINFO) == "xfs"
    assert mi.filesystem_type("/mnt/sharedness", MOUNTINFO) == "ext4"
    assert mi.filesystem_type("/lustre/project", MOUNTINFO) == "lustre"
    assert mi.filesystem_type(str(tmp_path)) in mi.LOCAL_FILESYSTEMS  # where the tests run

    n = 4
    root = _full_root(tmp_path, n)
    monkeypatch.setattr(mi, "filesystem_type", lambda path, mountinfo=None: "nfs4")
    want = root_status(root.url)
    assert not os.path.exists(root.path("_index"))  # read from the markers, no index written
    monkeypatch.setenv(mi.INDEX_ENV, "1")
    assert root_status(root.url) == want and os.path.exists(index_file(root, "ingest"))
    monkeypatch.setenv(mi.INDEX_ENV, "0")
    monkeypatch.setattr(mi, "filesystem_type", lambda path, mountinfo=None: "ext4")
    drop_index(root)
    got = root_status(root.url)
    assert got == want, [(a, b) for a, b in zip(got["stages"], want["stages"]) if a != b][:1]
    assert not os.path.exists(index_file(root, "ingest"))
