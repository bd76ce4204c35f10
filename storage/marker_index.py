"""One file per stage that holds what its shard markers say, so `status` reads 15 files instead of 140,000.

A marker (``ROOT/<stage>/_markers/shard-NNNNN.json``) stays the truth; this index is a cache of it, kept beside
the stages and rebuilt from the markers whenever it cannot prove itself current. Local roots only: a remote
root has no folder times to prove it with (`status` reads its markers in threads instead).

Data contract: ``ROOT/_index/markers/<stage>.arrow``, an Arrow IPC file, one row per marker, rows by shard:

=====================  ======  =================================================================================
column                 type    value
=====================  ======  =================================================================================
shard                  int64   the shard number, from the marker's file name
stamp_ino              int64   the marker file's inode when it was read
stamp_mtime_ns         int64   its modification time, ns
stamp_size             int64   its size, bytes
config_hash            string  the marker's ``config_hash`` (null when absent or not a string)
fingerprint            string  its ``fingerprint`` (null likewise)
input_keys             string  JSON list of the names in its ``inputs``, sorted (null when ``inputs`` is no object)
``in:<name>``          string  the fingerprint it records for input ``<name>``, one column per name any row
                               records (null where this row records none, or a value that is not a string)
ok, error, skipped     int64   its row counts (0 when absent; 0 too when one is not a 64-bit integer: see counts)
errors                 string  JSON ``[[cause, rows, message], ...]`` from its ``top_errors`` (null when none)
slim                   string  JSON of its ``config_hash``, ``fingerprint`` and ``inputs`` as written, only for
                               a marker whose three are not two strings and an object of strings (null otherwise:
                               the columns above hold them exactly)
counts                 string  JSON ``[ok, error, skipped]`` as written, only when one is not a 64-bit integer
=====================  ======  =================================================================================

Schema metadata: ``version``; ``rules``, the caller's name for how it turns a message into a cause (an index made
under other rules is rebuilt); ``dir_mtime_ns`` and ``dir_ino``, the markers folder's stamp taken before it was
listed; ``settled``, ``"1"`` when that folder last changed before the listing began; ``totals``, JSON
``{"ok", "error", "skipped"}`` over all rows; ``reasons``, JSON ``[[cause, rows, first message], ...]`` over all
rows in shard order, causes in the order first met.

Why an unchanged folder stamp proves the index current: markers are only ever written by renaming a finished
temp file over their name (``OutputRoot.write_bytes_atomic``), and pruned by deleting them, and each of those
changes the folder's modification time to the filesystem's clock at that moment. The clock advances in coarse
ticks, so a change in the same tick as the folder's last one could leave the stamp as it was: the index is trusted
on its folder stamp alone only when ``settled``, that is when the stamp was older than a file the index made just
before listing (the same filesystem's clock, so a later change carries a later time). Otherwise each marker's own
stamp (inode, time, size: a rename always brings a new inode) is compared, and only markers whose stamp changed
are read again. A marker edited in place (not renamed over) leaves its folder's stamp as it was, so a settled
index would not see it: after editing markers by hand, remove ``ROOT/_index`` (the next `status` rebuilds it).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import uuid
from typing import Any, Callable

import orjson
import pyarrow as pa

from storage.root import TMP_PREFIX, OutputRoot, loads_json

log = logging.getLogger("motionforge.storage")

INDEX_VERSION = "2"
INDEX_DIR = ("_index", "markers")
SLIM_FIELDS = ("config_hash", "fingerprint", "inputs")  # what the runner's freshness rules read of a marker
_MARKER_NAME = re.compile(r"^shard-(\d+)\.json$")
_FIXED = (("shard", pa.int64()), ("stamp_ino", pa.int64()), ("stamp_mtime_ns", pa.int64()),
          ("stamp_size", pa.int64()), ("config_hash", pa.string()), ("fingerprint", pa.string()),
          ("input_keys", pa.string()), ("ok", pa.int64()), ("error", pa.int64()), ("skipped", pa.int64()),
          ("errors", pa.string()), ("slim", pa.string()), ("counts", pa.string()))
INPUT_PREFIX = "in:"


@dataclasses.dataclass
class StageMarkers:
    """What one stage's markers say, from its index. ``read``: markers read from their files this time (0 when
    the index answered alone); ``written``: whether the index file was (re)written."""
    stage: str
    table: pa.Table
    totals: dict[str, int]
    reasons: list[tuple[str, int, str]]
    read: int = 0
    written: bool = False
    _slims: dict[int, dict] | None = None

    def marker(self, shard: int) -> dict | None:
        """The marker's ``config_hash``, ``fingerprint`` and ``inputs`` as written; None when the shard has none."""
        if self._slims is None:
            t = self.table
            names = [n for n in t.column_names if n.startswith(INPUT_PREFIX)]
            inputs = dict(zip(names, (t.column(n).to_pylist() for n in names)))
            self._slims = {}
            for row, (k, config_hash, fingerprint, keys, blob) in enumerate(zip(
                    *(t.column(c).to_pylist() for c in ("shard", "config_hash", "fingerprint", "input_keys", "slim")))):
                if blob is not None:
                    self._slims[k] = loads_json(blob.encode(), lambda: f"the marker index of {self.stage!r}")
                else:
                    self._slims[k] = {"config_hash": config_hash, "fingerprint": fingerprint,
                                      "inputs": {key: inputs[INPUT_PREFIX + key][row] for key in json.loads(keys)}}
        return self._slims.get(shard)

    def input_names(self) -> list[str]:
        return [n[len(INPUT_PREFIX):] for n in self.table.column_names if n.startswith(INPUT_PREFIX)]


# Where a folder's stamp is the one clock's and a stat sees the disk as it is: local filesystems. On a network one
# a file's time may come from a client's clock (Lustre) and a folder's attributes are cached for up to a minute
# (NFS), so an unchanged stamp proves nothing there: `status` reads the markers themselves (opening a file does
# revalidate it). MOTIONFORGE_MARKER_INDEX=1 uses the index on any filesystem of a local path, =0 on none.
INDEX_ENV = "MOTIONFORGE_MARKER_INDEX"
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "zfs", "f2fs",
                               "jfs", "reiserfs", "bcachefs", "apfs", "hfs"})


def index_usable(root: OutputRoot) -> bool:
    """Whether ``status`` may judge ``root`` from its marker index (see :data:`LOCAL_FILESYSTEMS`)."""
    mode = os.environ.get(INDEX_ENV, "auto").strip().lower()
    if not root.is_local or mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on"):
        return True
    return filesystem_type(root.base) in LOCAL_FILESYSTEMS


def filesystem_type(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (or its nearest existing parent), from the mount table of
    this process (``mountinfo``: Linux ``/proc/self/mountinfo`` when not given; None where there is none)."""
    if mountinfo is None:
        path = os.path.realpath(path)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return None
    lines = mountinfo.splitlines()
    best, kind = "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) < 5 or not after:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 is a space
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # the last of equal mount points is the one on top
            best, kind = point, after[0]
    return kind


def index_file(root: OutputRoot, stage: str) -> str:
    return root.path(*INDEX_DIR, f"{stage}.arrow")


def stage_markers(root: OutputRoot, stage: str, normalise: Callable[[str], str], rules: str = "",
                  write: bool = True) -> StageMarkers:
    """``stage``'s markers through its index: the index alone when its folder stamp proves it current, else the
    index's rows whose marker stamps are unchanged plus the markers that changed, read again (and the index
    rewritten, when ``write`` and the root can be written). ``normalise`` turns an error message into its cause;
    ``rules`` names that function's version (an index made under other rules is rebuilt)."""
    if not root.is_local:
        raise ValueError(f"the marker index is for local roots; {root.url} is not one")
    folder = root.path(stage, "_markers")
    path = index_file(root, stage)
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        # (pa.table and empty_table import pandas in pyarrow 26: 0.2-0.4 s of a `status` that has nothing to read)
        empty = pa.Table.from_batches([], schema=pa.schema([pa.field(n, t) for n, t in _FIXED]))
        return StageMarkers(stage, empty, {"ok": 0, "error": 0, "skipped": 0}, [])
    old, meta = _read_index(path, rules)
    if old is not None and meta["settled"] and (st.st_mtime_ns, st.st_ino) == meta["dir"]:
        return StageMarkers(stage, old, meta["totals"], meta["reasons"])

    clock = _filesystem_now(root, write)  # before the folder's stamp and listing: see the module's docstring
    st = os.stat(folder)
    listed: dict[int, tuple[str, tuple]] = {}
    for name, stamp in root.file_stamps(folder).items():
        m = _MARKER_NAME.match(name)
        if m and name == f"shard-{int(m.group(1)):05d}.json":  # the name the runner reads (not a stray shard-1.json)
            listed[int(m.group(1))] = (name, tuple(stamp))
    keep: list[int] = []  # rows of the old index whose marker is unchanged
    if old is not None:
        cols = [old.column(c).to_pylist() for c in ("shard", "stamp_ino", "stamp_mtime_ns", "stamp_size")]
        for row, (shard, *stamp) in enumerate(zip(*cols)):
            hit = listed.pop(shard, None)
            if hit is not None and hit[1] == tuple(stamp):
                keep.append(row)
            elif hit is not None:
                listed[shard] = hit  # changed: read again below
    fresh, errors = [], []
    for shard in sorted(listed):
        name, stamp = listed[shard]
        marker = root.read_json(f"{folder}/{name}")
        if marker is not None:  # else deleted since the listing
            fresh.append(_row(shard, stamp, marker, normalise, errors))
    if old is not None and not fresh and len(keep) == old.num_rows:
        table, totals, reasons = old, meta["totals"], meta["reasons"]
    else:
        parts = [old.take(_indices(keep))] if old is not None and keep else []
        if fresh:
            parts.append(_table(fresh))
        table = (pa.concat_tables(parts, promote_options="default").sort_by("shard") if parts
                 else _table([]))
        totals, reasons = _fold(table, errors if not keep else None)  # the fresh rows alone: their lists in order
    settled = clock is not None and st.st_mtime_ns < clock
    out = StageMarkers(stage, table, totals, reasons, read=len(listed))
    unchanged = (table is old and meta["settled"] == settled and meta["dir"] == (st.st_mtime_ns, st.st_ino))
    if write and clock is not None and not unchanged:
        out.written = _write_index(root, path, table, {
            "version": INDEX_VERSION, "rules": rules, "dir_mtime_ns": str(st.st_mtime_ns),
            "dir_ino": str(st.st_ino), "settled": "1" if settled else "0",
            "totals": json.dumps(totals), "reasons": json.dumps(reasons)})
    return out


def _row(shard: int, stamp: tuple, marker: Any, normalise: Callable[[str], str], errors: list) -> tuple:
    """A marker as one row: the fixed columns in order, then its inputs (name -> fingerprint). ``errors`` gets
    its ``[cause, rows, message]`` list (folded without parsing the JSON again)."""
    m = marker if isinstance(marker, dict) else {}
    config_hash, fingerprint, inputs = m.get("config_hash"), m.get("fingerprint"), m.get("inputs")
    plain = (_text(config_hash) and _text(fingerprint) and isinstance(inputs, dict)
             and all(_text(k) and _text(v) for k, v in inputs.items()))
    if not isinstance(inputs, dict) or not all(map(_text, inputs)):
        inputs = None
    counts = [m.get(key, 0) for key in ("ok", "error", "skipped")]
    odd_counts = not all(type(v) is int and -2**63 <= v < 2**63 for v in counts)
    errs = [[normalise(reason), n, reason] for reason, n in (m.get("top_errors") or [])]
    errors.append(errs)
    return (shard, *stamp,
            config_hash if _text(config_hash) else None,
            fingerprint if _text(fingerprint) else None,
            input_keys(inputs) if inputs is not None else None,
            *([0, 0, 0] if odd_counts else counts),
            _dumps(errs) if errs else None,
            None if plain else _dumps({k: m[k] for k in SLIM_FIELDS if k in m}),
            _dumps(counts) if odd_counts else None,
            {k: v for k, v in inputs.items() if _text(v)} if inputs else {})


def _text(v: Any) -> bool:
    """A string an Arrow column can hold (valid UTF-8: JSON may carry a lone surrogate, which is not)."""
    if not isinstance(v, str):
        return False
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def input_keys(names) -> str:
    """The ``input_keys`` text of a marker recording inputs ``names`` (compare this, never a JSON of your own)."""
    return orjson.dumps(sorted(names)).decode()


def _dumps(obj: Any) -> str:
    """JSON that ``loads_json`` reads back as ``obj``: orjson's, unless it holds ``null`` (orjson also writes NaN and
    infinities so) or orjson refuses (an integer past 64 bits, a lone surrogate): then json's."""
    try:
        text = orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj)
    return json.dumps(obj) if b"null" in text else text.decode()


def _table(rows: list[tuple]) -> pa.Table:
    fields = [pa.field(n, t) for n, t in _FIXED]
    columns = list(zip(*rows)) if rows else [()] * (len(_FIXED) + 1)
    arrays = [_ints(values) if f.type == pa.int64() else _strings(values) for f, values in zip(fields, columns)]
    recorded = columns[-1]
    for name in sorted({k for inputs in recorded for k in inputs}):
        fields.append(pa.field(INPUT_PREFIX + name, pa.string()))
        arrays.append(_strings([inputs.get(name) for inputs in recorded]))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# Arrow arrays built from their buffers: pa.array imports pandas in pyarrow 26 (0.2-0.4 s, and `status` must not:
# tests/test_orchestration_costs.py).
def _ints(values) -> pa.Array:
    import array

    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(array.array("q", values))])


_indices = _ints


def _strings(values) -> pa.Array:
    """A string array of ``values`` (str or None)."""
    import numpy as np

    data = [v.encode() if v is not None else b"" for v in values]
    if sum(map(len, data)) >= 2**31:
        raise ValueError("a marker index column over 2 GiB: split the stage's shards or drop the index")
    offsets = np.zeros(len(data) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    valid = np.fromiter((v is not None for v in values), bool, len(data))
    nulls = len(data) - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little").tobytes()) if nulls else None
    return pa.StringArray.from_buffers(len(data), pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(data)),
                                       bitmap, nulls)


def _fold(table: pa.Table, errors: list | None) -> tuple[dict[str, int], list[tuple[str, int, str]]]:
    """Row totals over ``table`` and its causes in shard order (``errors``: each row's list, when at hand)."""
    totals = {key: sum(table.column(key).to_pylist()) for key in ("ok", "error", "skipped")}
    for odd in table.column("counts").to_pylist():  # counts that are not 64-bit integers, summed as they are
        if odd is not None:
            for key, v in zip(("ok", "error", "skipped"), loads_json(odd.encode())):
                totals[key] += v
    if errors is None:
        errors = [json.loads(e) if e is not None else () for e in table.column("errors").to_pylist()]
    counts: collections.Counter = collections.Counter()
    example: dict[str, str] = {}
    for errs in errors:
        for cause, n, message in errs:
            counts[cause] += n
            example.setdefault(cause, message)
    return totals, [(cause, n, example[cause]) for cause, n in counts.items()]


def _read_index(path: str, rules: str) -> tuple[pa.Table | None, dict]:
    try:
        with pa.memory_map(path) as source:
            table = pa.ipc.open_file(source).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("version") != INDEX_VERSION or meta.get("rules") != rules:
            return None, {}
        for name, kind in _FIXED:
            if table.schema.field(name).type != kind:
                raise ValueError(f"column {name!r} is {table.schema.field(name).type}, not {kind}")
        totals = json.loads(meta["totals"])
        reasons = [(cause, n, message) for cause, n, message in json.loads(meta["reasons"])]
        if sorted(totals) != ["error", "ok", "skipped"]:
            raise ValueError(f"totals {totals!r}")
        return table.replace_schema_metadata(None), {
            "settled": meta["settled"] == "1", "dir": (int(meta["dir_mtime_ns"]), int(meta["dir_ino"])),
            "totals": totals, "reasons": reasons}
    except FileNotFoundError:
        return None, {}
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:  # cut or foreign: rebuilt
        log.warning("marker index %s is unreadable (%s); rebuilding it from the markers", path, exc)
        return None, {}


def _write_index(root: OutputRoot, path: str, table: pa.Table, meta: dict[str, str]) -> bool:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as writer:
        writer.write_table(table)
    try:
        root.write_bytes_atomic(path, sink.getvalue().to_pybytes())
    except (OSError, pa.ArrowException) as exc:  # a root this user may only read: the index stays a cache
        log.debug("marker index %s not written: %s", path, exc)
        return False
    return True


def _filesystem_now(root: OutputRoot, write: bool) -> int | None:
    """The index folder's filesystem clock, in ns: the time of a file made there and removed at once (None when
    the folder cannot be written: an index can then never be trusted on its folder stamp alone)."""
    if not write:
        return None
    folder = root.path(*INDEX_DIR)
    probe = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-clock"
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except FileNotFoundError:  # removed by the run lock's holder (remove_temp_files) meanwhile
            pass


def drop_index(root: OutputRoot, stage: str | None = None) -> None:
    """Remove one stage's index (or every stage's): the next reader rebuilds it from the markers."""
    if stage is None:
        root.delete(root.path(*INDEX_DIR))
    else:
        root.delete(index_file(root, stage))


