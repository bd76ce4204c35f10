"""The output root: where every stage's table, markers, plans and caches live.

Layout (``ROOT`` is a local path or an fsspec URL such as ``s3://bucket/run`` or ``memory://run``)::

    ROOT/_manifest.json                       each stage's last config (hash) and run times
    ROOT/_lock                                held by the one run writing to this root
    ROOT/_cache/...                           LLM/VLM response cache, remote-input copies
    ROOT/_index/markers/<stage>.arrow         a cache of the stage's markers for `status` (storage/marker_index.py)
    ROOT/<stage>/shard-00007.parquet          the stage's rows for shard 7
    ROOT/<stage>/_markers/shard-00007.json    completion marker, written after the Parquet file
    ROOT/<stage>/_media/...                   files a stage makes (clip cuts, first frames)

``pyarrow.dataset.dataset(f"{ROOT}/{stage}", format="parquet")`` reads a stage's whole table: pyarrow skips
names starting with ``_`` or ``.``, which is why markers, media and temp files use those prefixes.

Remote roots go through fsspec (any protocol it knows, including ``memory://``), wrapped as a pyarrow
filesystem (``PyFileSystem(FSSpecHandler(...))``) for the Parquet reads and writes; when fsspec has no
implementation installed for a protocol that pyarrow supports natively (e.g. ``s3://`` without s3fs),
pyarrow's own filesystem is used.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import posixpath
import re
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.memory import release_freed_memory

if TYPE_CHECKING:
    import pyarrow.dataset as ds


log = logging.getLogger("motionforge.storage")

TMP_PREFIX = ".tmp-"
_SHARD_RE = re.compile(r"^shard-(\d+)\.(parquet|json)$")
_TMP_RE = re.compile(r"^\.tmp-[0-9a-f]{12,32}-")  # what _tmp_beside (and the run lock) name their temp files
# orjson (three times json's speed on a marker) reads an integer outside 64 bits as a float; json keeps it exact.
# A run of 19 digits anywhere (a number or inside a string) sends the file to json: same result, only slower.
# Found by mapping every digit to "0" (1.4 us on a 320-byte marker; the regex [0-9]{19} took 8 us, as long as
# orjson's whole parse).
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"0" * 9)
_LONG_DIGIT_RUN = b"0" * 19


def _has_long_digit_run(data: bytes) -> bool:
    return _LONG_DIGIT_RUN in data.translate(_DIGITS_TO_ZERO)

def loads_json(data: bytes, where: Callable[[], str] = lambda: "the data") -> Any:
    """``json.loads``'s result, through orjson where both agree; :class:`GarbledJSONError` naming ``where()``
    when the bytes are empty or not JSON."""
    if not _has_long_digit_run(data):
        try:
            return orjson.loads(data)
        except ValueError:  # NaN, Infinity, 1e400 (json.dumps writes them, orjson refuses): json decides
            pass
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise GarbledJSONError(f"{where()} is {'empty' if not data.strip() else 'not valid JSON'} "
                               f"({len(data)} bytes): {exc}") from exc


READ_AHEAD = 8  # shards OutputRoot.iter_stage reads at once


def _read_local(path: str) -> bytes:
    """A local file's bytes through the OS calls alone: about a third of ``open(path, "rb").read()``'s cost on a
    small file (no buffered-reader object; 20,000 markers: 0.13-0.18 s against 0.35-0.46 s). Reads until EOF;
    64 KiB a call stays under the allocator's mmap threshold, so a read costs no fresh pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def table_blocks(items: Iterable[tuple[Any, pa.Table]], max_rows: int = 65_536, max_tables: int = 512,
                 promote: bool = True) -> Iterator[tuple[list, pa.Table]]:
    """``(keys, table)`` for runs of consecutive ``(key, table)`` items (shards read by :meth:`OutputRoot.iter_stage`),
    each run's tables concatenated, in order, until it holds ``max_rows`` rows or ``max_tables`` tables: for
    readers whose work per table is a sum (counts, row groups to write), so that each Arrow call is paid once per
    run rather than once per small shard.

    ``promote``: unify schemas by column name (a column a table lacks is null there, an all-null column takes
    the others' type); a table whose schema cannot be unified with the run's starts a new run. Without it only
    tables of exactly the same schema share a run. Nothing is copied: the block's columns are the tables' chunks.
    """
    unmergeable = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)
    keys: list = []
    buf: list[pa.Table] = []
    rows, schema = 0, None

    def run() -> Iterator[tuple[list, pa.Table]]:
        if len(buf) == 1:
            yield keys, buf[0]
            return
        try:
            block = pa.concat_tables(buf, promote_options="default" if promote else "none")
        except unmergeable:  # not expected once the schemas agreed: one table at a time, as they came
            yield from (([k], t) for k, t in zip(keys, buf))
            return
        yield keys, block

    for key, table in items:
        if buf and not table.schema.equals(schema):
            joined = None
            if promote:
                try:
                    joined = pa.unify_schemas([schema, table.schema], promote_options="default")
                except unmergeable:
                    pass
            if joined is None:
                yield from run()
                keys, buf, rows = [], [], 0
            else:
                schema = joined
        if not buf:
            schema = table.schema
        keys.append(key)
        buf.append(table)
        rows += table.num_rows
        if rows >= max_rows or len(buf) >= max_tables:
            yield from run()
            keys, buf, rows = [], [], 0
    if buf:
        yield from run()


class GarbledJSONError(ValueError):
    """A JSON file under the root is empty or not valid JSON (e.g. cut short by a crash of a non-atomic writer)."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


class _MemoryHandler(pafs.FSSpecHandler):
    """pyarrow's fsspec bridge for ``memory://``, with a private reader per open.

    fsspec's memory filesystem hands every ``open(path, "rb")`` the *same* file object, only rewound: two threads
    reading one file (two shard tasks reading ``_plan.json``, or one shard's Parquet file) share its position, and
    one of them reads nothing or the wrong bytes, depending on how the threads interleave. Here each open gets its
    own reader over the stored bytes (already in memory, so nothing is fetched twice)."""

    def _reader(self, path):
        if not self.fs.isfile(path):
            raise FileNotFoundError(path)
        return pa.BufferReader(self.fs.cat_file(path))

    def open_input_stream(self, path):
        return self._reader(path)

    def open_input_file(self, path):
        return self._reader(path)


def _filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, base path) for a URL: fsspec's implementation, else pyarrow's native one."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # protocol unknown to fsspec, or its package is not installed
        try:
            return pafs.FileSystem.from_uri(url)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ValueError(f"output root {url!r}: no filesystem for this URL ({type(exc).__name__}: {exc})") from exc
    from fsspec.implementations.memory import MemoryFileSystem

    handler = _MemoryHandler(fs) if isinstance(fs, MemoryFileSystem) else pafs.FSSpecHandler(fs)
    return pafs.PyFileSystem(handler), path.rstrip("/") or "/"


def normalise_root_url(url: str | os.PathLike[str]) -> str:
    """The root's URL as :class:`OutputRoot` keeps it: local paths absolute (``file://`` dropped), no trailing slash."""
    url = os.fspath(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    return url.rstrip("/") or "/"


class OutputRoot:
    """Atomic reads and writes under one output root (local or remote)."""

    def __init__(self, url: str | os.PathLike[str]):
        self.url = normalise_root_url(url)
        self.fs, self.base = _filesystem(self.url) if "://" in self.url else (pafs.LocalFileSystem(), self.url)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._prefix = self.base if self.base.endswith("/") or not self.base else self.base + "/"  # path()'s join

    def __repr__(self) -> str:
        return f"OutputRoot({self.url!r})"

    # -- paths -------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def uri(self, *parts: str) -> str:
        """A path or URL that other tools (pyarrow, ffmpeg for local roots) can open."""
        if self.is_local:
            return self.path(*parts)
        return self.url + "/" + "/".join(parts)

    def stage_dir(self, stage: str) -> str:
        return self.path(stage)

    def shard_file(self, stage: str, shard: int) -> str:
        return self.path(stage, f"{shard_name(shard)}.parquet")

    def marker_file(self, stage: str, shard: int) -> str:
        # self.path(stage, "_markers", ...) spelled out: it is asked once per marker read (20,000 for `status` on
        # 10,000 shards), and posixpath.join was a fifth of that pass's time
        return f"{self._prefix}{stage}/_markers/shard-{shard:05d}.json"

    def media_dir(self, stage: str, *parts: str) -> str:
        p = self.path(stage, "_media", *parts)
        self.makedirs(p)
        return p

    # -- primitives --------------------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def delete(self, path: str) -> None:
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            self.fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def _tmp_beside(self, path: str) -> str:
        d, name = posixpath.split(path)
        return posixpath.join(d, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        self.makedirs(posixpath.dirname(path))
        tmp = self._tmp_beside(path)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self._commit(tmp, path)

    def _commit(self, tmp: str, final: str) -> None:
        """Make a finished temp file durable (locally), then rename it over ``final``."""
        if self.is_local:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.fs.move(tmp, final)

    def read_bytes(self, path: str) -> bytes:
        if self.is_local:  # the OS directly: a third of the cost per small file (markers, for `status`)
            return _read_local(path)
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, path: str, default: Any = None) -> Any:
        """The parsed file; ``default`` when it does not exist; :class:`GarbledJSONError` when it is empty or cut."""
        try:
            data = self.read_bytes(path)
        except FileNotFoundError:
            return default
        except OSError:
            if not self.exists(path):
                return default
            raise
        return loads_json(data, lambda: self.uri_of(path))

    def uri_of(self, path: str) -> str:
        """:meth:`uri` for a path already under :attr:`base`."""
        rel = posixpath.relpath(path, self.base) if path.startswith(self.base) else path
        return self.uri(*[p for p in rel.split("/") if p and p != "."])

    def mtime(self, path: str) -> float | None:
        """Modification time (epoch seconds), ``None`` when the filesystem does not report one."""
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        return info.mtime.timestamp() if info.mtime is not None else None

    def list_dir(self, path: str) -> list[str]:
        """Names in ``path``, sorted, without the temp files of this module's atomic writes: one is either still
        being written (another process's write in flight, renamed away a moment later) or left by a killed
        writer (:meth:`remove_temp_files`); neither is an entry a reader may open."""
        if self.is_local:  # the OS's listing directly: pyarrow builds a FileInfo per entry (a tenth of a second
            try:           # per 10,000 markers, for `status`)
                names = os.listdir(path)
            except FileNotFoundError:
                return []
        else:
            sel = pafs.FileSelector(path, allow_not_found=True)
            names = [posixpath.basename(i.path) for i in self.fs.get_file_info(sel)]
        return sorted(n for n in names if not n.startswith(TMP_PREFIX) or not _TMP_RE.match(n))

    def file_stamps(self, path: str) -> dict[str, tuple]:
        """name -> a stamp of each file in ``path`` (temp files left out) that changes whenever the file is
        replaced, from one listing, without opening any: (inode, mtime in ns, size) on a local root, where an
        atomic write's rename always brings a new inode; (mtime in ns, size) elsewhere, with ``None`` for an
        mtime the filesystem does not keep (``memory://``)."""
        if self.is_local:
            out = {}
            try:
                entries = os.scandir(path)
            except (FileNotFoundError, NotADirectoryError):
                return out
            with entries:
                for e in entries:
                    if not _TMP_RE.match(e.name):
                        try:
                            st = e.stat()
                        except FileNotFoundError:  # renamed away since the listing
                            continue
                        out[e.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
            return out
        sel = pafs.FileSelector(path, allow_not_found=True)
        return {posixpath.basename(i.path): (i.mtime_ns, i.size) for i in self.fs.get_file_info(sel)
                if not _TMP_RE.match(posixpath.basename(i.path))}

    # -- tables ------------------------------------------------------------------------------------------
    def write_table_atomic(self, stage: str, shard: int, table: pa.Table) -> str:
        """Write a shard's table to a temp name, fsync, then rename over the final name."""
        final = self.shard_file(stage, shard)
        self.makedirs(posixpath.dirname(final))
        tmp = self._tmp_beside(final)
        if table.num_rows:
            pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
        else:
            # No row group at all: pyarrow would write one with 0 rows, and Hugging Face `datasets` takes the
            # first row group's size as its batch size (ArrowInvalid: BatchSize must be greater than 0).
            pq.ParquetWriter(tmp, table.schema, filesystem=self.fs, compression="zstd").close()
        self._commit(tmp, final)
        return final

    def read_shard(self, stage: str, shard: int, schema: pa.Schema | None = None,
                   columns: Sequence[str] | None = None, use_threads: bool = True) -> pa.Table:
        """One shard's table. ``columns``: read only those of them the file has (in the file's order), for
        readers that go over every shard of a large stage and need a few columns (the report). ``use_threads``:
        decode the file's columns on Arrow's thread pool; a caller that reads several files at once (iter_stage)
        turns it off, which costs a small file a quarter less CPU for the same table."""
        path = self.shard_file(stage, shard)
        if not self.exists(path):
            raise FileNotFoundError(f"{self.uri(stage)}: shard {shard} has no table yet (run stage {stage!r} first)")
        if schema is None:  # one known file: read it directly, without read_table's dataset layer (a third of
            with pq.ParquetFile(path, filesystem=self.fs) as f:  # the CPU for a small shard, same table)
                if columns is None:
                    return f.read(use_threads=use_threads)
                wanted = set(columns)
                return f.read(columns=[n for n in f.schema_arrow.names if n in wanted], use_threads=use_threads)
        return pq.read_table(path, filesystem=self.fs, schema=schema, use_threads=use_threads,
                             columns=None if columns is None else [n for n in schema.names if n in set(columns)])

    def read_stage(self, stage: str, schema: pa.Schema | None = None) -> pa.Table:
        """All shards of a stage (only those with a completion marker, so half-written runs never leak)."""
        shards = self.completed_shards(stage)
        tables = [self.read_shard(stage, s, schema) for s in shards]
        if not tables:
            if schema is None:
                raise FileNotFoundError(f"stage {stage!r} has no completed shards under {self.url}")
            return schema.empty_table()
        return pa.concat_tables(tables)

    def iter_stage(self, stage: str, columns: Sequence[str] | None = None, schema: pa.Schema | None = None,
                   ahead: int = READ_AHEAD) -> Iterator[tuple[int, pa.Table]]:
        """``(shard, table)`` for every completed shard of a stage, in shard order, for readers that go over a
        stage too large to hold (the report, `export hf`, error rows): at most ``ahead`` shards are held, read
        in that many threads (Parquet decoding releases the GIL, and a remote root answers each read in tens of
        milliseconds, which one thread would wait out one after another)."""
        shards = self.completed_shards(stage)
        if ahead <= 1 or len(shards) <= 1:
            for s in shards:
                yield s, self.read_shard(stage, s, schema, columns)
                release_freed_memory()
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(min(ahead, len(shards)), thread_name_prefix="read-stage")
        try:
            todo = iter(shards)
            # each file decoded on its reading thread: the files are the parallelism here
            pending = collections.deque((s, pool.submit(self.read_shard, stage, s, schema, columns, use_threads=False))
                                        for s in itertools.islice(todo, ahead))
            while pending:
                s, future = pending.popleft()
                yield s, future.result()
                release_freed_memory()  # the reader is done with that shard: at most one trim a second
                nxt = next(todo, None)  # once the reader has taken this one: never more than `ahead` held
                if nxt is not None:
                    pending.append((nxt, pool.submit(self.read_shard, stage, nxt, schema, columns, use_threads=False)))
        finally:  # also when the reader stops early: reads not started are dropped
            pool.shutdown(wait=True, cancel_futures=True)

    def dataset(self, stage: str) -> ds.Dataset:
        import pyarrow.dataset as ds  # lazy: it imports pandas (~0.25 s), which `status` never needs

        return ds.dataset(self.stage_dir(stage), format="parquet", filesystem=self.fs)

    # -- markers -----------------------------------------------------------------------------------------
    def read_marker(self, stage: str, shard: int) -> dict | None:
        return self.read_json(self.marker_file(stage, shard))

    def write_marker(self, stage: str, shard: int, marker: dict) -> None:
        self.write_json(self.marker_file(stage, shard), marker)

    def delete_marker(self, stage: str, shard: int) -> None:
        self.delete(self.marker_file(stage, shard))

    def completed_shards(self, stage: str) -> list[int]:
        out = []
        for name in self.list_dir(self.path(stage, "_markers")):
            if name.startswith("shard-") and name.endswith(".json"):
                out.append(int(name[len("shard-"):-len(".json")]))
        return sorted(out)

    # -- housekeeping (only for the holder of the run lock) ------------------------------------------------
    def _walk_files(self) -> list[str]:
        sel = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        return [i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]

    def remove_temp_files(self, lock) -> list[str]:
        """Delete the ``.tmp-<hex>-*`` files this module's atomic writes leave when their writer is killed. Only
        the holder of the root's run lock may do this: any other writer's temp file could be one it is still
        writing (other tools' temp files, e.g. a report being written, have other names and are left alone)."""
        if not getattr(lock, "held", False):
            raise RuntimeError(f"remove_temp_files on {self.url} needs the root's run lock held")
        removed = []
        for p in self._walk_files():
            if _TMP_RE.match(posixpath.basename(p)):
                self.fs.delete_file(p)
                removed.append(p)
        if removed:
            log.info("removed %d temp file(s) left by an interrupted run under %s", len(removed), self.url)
        return removed

    def prune_shards(self, lock, stage: str, keep: set[int]) -> list[int]:
        """Delete the tables, markers and failure notes of ``stage``'s shards not in ``keep`` (shards that a
        previous shard plan had and the current one does not). Needs the run lock held."""
        if not getattr(lock, "held", False):
            raise RuntimeError(f"prune_shards on {self.url} needs the root's run lock held")
        gone: set[int] = set()
        for sub in ("_markers", "_failed", ""):  # markers first: a reader never sees a marker without its table
            d = self.path(stage, sub) if sub else self.path(stage)
            for name in self.list_dir(d):
                m = _SHARD_RE.match(name)
                if m and int(m.group(1)) not in keep:
                    gone.add(int(m.group(1)))
                    self.delete(posixpath.join(d, name))
        return sorted(gone)

    def stages_present(self) -> list[str]:
        return [n for n in self.list_dir(self.base) if not n.startswith(("_", "."))]
