"""The output root: where every stage's table, markers, plans and caches live.

Layout (``ROOT`` is a local path or an fsspec/pyarrow URL such as ``s3://bucket/run``)::

    ROOT/_manifest.json                       each stage's last config (hash) and run times
    ROOT/_lock                                held by the one run writing to this root
    ROOT/_cache/...                           LLM/VLM response cache, remote-input copies
    ROOT/<stage>/shard-00007.parquet          the stage's rows for shard 7
    ROOT/<stage>/_markers/shard-00007.json    completion marker, written after the Parquet file
    ROOT/<stage>/_media/...                   files a stage makes (clip cuts, first frames)

``pyarrow.dataset.dataset(f"{ROOT}/{stage}", format="parquet")`` reads a stage's whole table: pyarrow skips
names starting with ``_`` or ``.``, which is why markers, media and temp files use those prefixes.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


class OutputRoot:
    """Atomic reads and writes under one output root (local or remote)."""

    def __init__(self, url: str | os.PathLike[str]):
        url = os.fspath(url)
        if "://" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        self.url = url.rstrip("/") or "/"
        self.fs, self.base = pafs.FileSystem.from_uri(self.url) if "://" in self.url else (pafs.LocalFileSystem(), self.url)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

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
        return self.path(stage, "_markers", f"{shard_name(shard)}.json")

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
        return posixpath.join(d, f".tmp-{uuid.uuid4().hex[:12]}-{name}")

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
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, path: str, default: Any = None) -> Any:
        try:
            return json.loads(self.read_bytes(path))
        except FileNotFoundError:
            return default
        except OSError:
            if not self.exists(path):
                return default
            raise

    def list_dir(self, path: str) -> list[str]:
        sel = pafs.FileSelector(path, allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

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

    def read_shard(self, stage: str, shard: int, schema: pa.Schema | None = None) -> pa.Table:
        path = self.shard_file(stage, shard)
        if not self.exists(path):
            raise FileNotFoundError(f"{self.uri(stage)}: shard {shard} has no table yet (run stage {stage!r} first)")
        return pq.read_table(path, filesystem=self.fs, schema=schema)

    def read_stage(self, stage: str, schema: pa.Schema | None = None) -> pa.Table:
        """All shards of a stage (only those with a completion marker, so half-written runs never leak)."""
        shards = self.completed_shards(stage)
        tables = [self.read_shard(stage, s, schema) for s in shards]
        if not tables:
            if schema is None:
                raise FileNotFoundError(f"stage {stage!r} has no completed shards under {self.url}")
            return schema.empty_table()
        return pa.concat_tables(tables)

    def dataset(self, stage: str) -> ds.Dataset:
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

    def stages_present(self) -> list[str]:
        return [n for n in self.list_dir(self.base) if not n.startswith(("_", "."))]
