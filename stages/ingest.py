"""ingest: find input videos, probe them with ffprobe, hash their bytes, filter, and assign shards.

Inputs: a folder (searched recursively), a manifest file (CSV / JSONL / Parquet with a ``path`` column;
relative paths are relative to the manifest), a single video, or an fsspec URL of a folder or file.
Remote files are copied once into a local cache so decoders can open them. A file that cannot be used
becomes a ``status="error"`` row whose ``error`` says why in plain words; filtered ones are ``skipped``.

A file whose bytes are identical to a file earlier in the plan (same shard earlier, or an earlier shard) is a
``skipped`` row naming that file: both would get the same content id, and every key built from it (clips,
instances, questions) would collide. Only files of equal size are hashed for this check, so it costs one size
look-up per earlier file (cached per process) and a hash only where sizes match.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import threading
from typing import Iterable

from pydantic import model_validator

from schemas._base import STATUS_ERROR, STATUS_SKIPPED
from schemas.videos import SCHEMA, Video
from stages.base import Resources, ShardContext, Stage, StageConfig
from storage.manifest import cached_plan

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")

# MotionBench 3.1: clips kept from "specific fields" are at most 60 s long with a short side >= 448 px.
PRESETS = {"motionbench_fields": {"max_duration_s": 60.0, "min_side_px": 448}}


class IngestConfig(StageConfig):
    shard_size: int = 16
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    max_duration_s: float | None = None
    min_duration_s: float | None = None
    min_side_px: int | None = None
    preset: str | None = None  # a name from PRESETS; its values fill the filters left unset

    @model_validator(mode="after")
    def _apply_preset(self):
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"unknown ingest preset {self.preset!r}; known: {sorted(PRESETS)}")
            for k, v in PRESETS[self.preset].items():
                if getattr(self, k) is None:
                    object.__setattr__(self, k, v)
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        return self


# -- finding inputs ------------------------------------------------------------------------------------------
def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def _read_manifest(path: str) -> list[str]:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    lower = path.lower()
    if lower.endswith(".parquet"):
        table = pq.read_table(path)
    elif lower.endswith(".csv"):
        table = pcsv.read_csv(path)
    elif lower.endswith((".jsonl", ".json", ".ndjson")):
        table = pjson.read_json(path)
    else:
        raise ValueError(f"manifest {path}: unknown format (use .csv, .jsonl or .parquet with a 'path' column)")
    if "path" not in table.column_names:
        raise ValueError(f"manifest {path} has no 'path' column (columns: {table.column_names})")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for p in table.column("path").to_pylist():
        if p is None or (isinstance(p, float)) or not str(p).strip():
            continue
        p = str(p).strip()
        out.append(p if _is_url(p) or os.path.isabs(p) else os.path.normpath(os.path.join(base, p)))
    return out


def list_inputs(source: str, extensions: Iterable[str] = VIDEO_EXTENSIONS) -> list[str]:
    """Every candidate video under ``source``, sorted, de-duplicated. Non-video names in a folder are
    ignored; names given explicitly (a manifest, a single file) are kept even if they look wrong, so that
    they show up as error rows instead of vanishing."""
    exts = tuple(e.lower() for e in extensions)
    if source.startswith("file://"):
        source = source[len("file://"):]
    if _is_url(source):
        import fsspec

        fs, path = fsspec.core.url_to_fs(source)
        proto = source.split("://", 1)[0]
        if fs.isdir(path):
            found = [p for p in fs.find(path) if p.lower().endswith(exts)]
            return sorted({f"{proto}://{p}" for p in found})
        return [source]
    if os.path.isdir(source):
        found = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
            found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(exts) and not f.startswith(".")]
        return sorted({os.path.abspath(p) for p in found})
    if source.lower().endswith((".csv", ".jsonl", ".json", ".ndjson", ".parquet")):
        return sorted(set(_read_manifest(source)))
    if os.path.exists(source):
        return [os.path.abspath(source)]
    raise FileNotFoundError(f"input {source!r} is neither a folder, a manifest, a video file nor a URL")


def make_plan(uris: list[str], shard_size: int, previous: dict | None = None) -> dict:
    """Assign inputs to shards of ``shard_size``. Files already planned keep their shard; new files fill new
    shards, so adding videos to a dataset never reshuffles (or invalidates) finished shards."""
    shards: list[list[str]] = []
    if previous and previous.get("shard_size") == shard_size:
        shards = [list(s) for s in previous["shards"]]
    known = {u for s in shards for u in s}
    new = [u for u in uris if u not in known]
    if shards and len(shards[-1]) < shard_size:
        take = shard_size - len(shards[-1])
        shards[-1] += new[:take]
        new = new[take:]
    for i in range(0, len(new), shard_size):
        shards.append(new[i:i + shard_size])
    return {"version": 1, "shard_size": shard_size, "shards": shards}


# -- per-file work -------------------------------------------------------------------------------------------
def content_hash(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()[:32]


def local_copy(uri: str, cache_dir: str) -> str:
    """Remote inputs are copied once into a local cache; local ones are used in place."""
    if not _is_url(uri):
        return uri
    import fsspec

    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dst = os.path.join(cache_dir, key, posixpath.basename(uri.split("?", 1)[0]) or "video")
    if not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = dst + f".part-{os.getpid()}"
        with fsspec.open(uri, "rb") as src, open(tmp, "wb") as out:
            while True:
                b = src.read(1 << 22)
                if not b:
                    break
                out.write(b)
        os.replace(tmp, dst)
    return dst


def filter_reason(v: Video, cfg: IngestConfig) -> str | None:
    if cfg.max_duration_s is not None and v.duration_s is not None and v.duration_s > cfg.max_duration_s:
        return f"duration {v.duration_s:.2f} s exceeds max_duration_s={cfg.max_duration_s:g}"
    if cfg.min_duration_s is not None and v.duration_s is not None and v.duration_s < cfg.min_duration_s:
        return f"duration {v.duration_s:.2f} s is below min_duration_s={cfg.min_duration_s:g}"
    if cfg.min_side_px is not None and v.width and v.height and min(v.width, v.height) < cfg.min_side_px:
        return f"short side {min(v.width, v.height)} px is below min_side_px={cfg.min_side_px}"
    return None


def ingest_one(uri: str, shard: int, cfg: IngestConfig, cache_dir: str) -> Video:
    from experts.video import VideoProbeError, probe

    path_id = "path-" + hashlib.sha256(uri.encode()).hexdigest()[:27]
    try:
        path = local_copy(uri, cache_dir)
    except Exception as exc:  # noqa: BLE001 -- any fetch failure is this file's error row
        return Video(video_id=path_id, uri=uri, path=uri, shard=shard, status=STATUS_ERROR,
                     error=f"could not fetch {uri}: {type(exc).__name__}: {exc}")
    try:
        info = probe(path)
    except VideoProbeError as exc:
        size = os.path.getsize(path) if os.path.exists(path) else None
        return Video(video_id=path_id, uri=uri, path=path, shard=shard, size_bytes=size, status=STATUS_ERROR,
                     error=str(exc))
    try:
        vid = content_hash(path)
    except OSError as exc:
        return Video(video_id=path_id, uri=uri, path=path, shard=shard, status=STATUS_ERROR,
                     error=f"file cannot be read: {exc.strerror or exc}")
    v = Video(
        video_id=vid, uri=uri, path=path, shard=shard, size_bytes=info.size_bytes, duration_s=info.duration_s,
        fps=info.fps, frame_count=info.frame_count, width=info.width, height=info.height, codec=info.codec,
        rotation_deg=info.rotation_deg, has_video_stream=info.has_video_stream,
        has_audio_stream=info.has_audio_stream,
    )
    reason = filter_reason(v, cfg)
    if reason:
        import dataclasses

        v = dataclasses.replace(v, status=STATUS_SKIPPED, error=reason)
    return v


def input_cache_dir() -> str:
    return os.environ.get("MOTIONFORGE_INPUT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "motionforge", "inputs")


_SIZES: dict[str, int | None] = {}
_HASHES: dict[tuple[str, int, float], str] = {}


def _size_of(uri: str) -> int | None:
    """Size in bytes of a planned input (local stat, or fsspec ``size`` cached per process), ``None`` if it
    cannot be had."""
    if not _is_url(uri):
        try:
            return os.path.getsize(uri)
        except OSError:
            return None
    if uri not in _SIZES:
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
            _SIZES[uri] = int(fs.size(path))
        except Exception:  # noqa: BLE001 -- a file that cannot be sized cannot be compared; its own row says why
            _SIZES[uri] = None
    return _SIZES[uri]


def _hash_of(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime)
    if key not in _HASHES:
        _HASHES[key] = content_hash(path)
    return _HASHES[key]


class _SizeIndex:
    """Planned files by size, in plan order, sized once each and only as far as asked: finding the earlier
    files of one size is then a dict lookup, not a pass over the whole plan before the file (which made
    ingesting a plan of N files cost N^2 / 2 size checks). Within a size, files are hashed once each, in plan
    order and only as far as asked, into the first position of each content hash: many different files of one
    size (a constant-bitrate dataset) cost a hash each, not a pass over the earlier ones per file."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.next = (0, 0)  # the first plan position not indexed yet
        self.by_size: dict[int | None, list[tuple[int, int, str]]] = {}
        self.hashed: dict[int | None, int] = {}  # size -> how many of by_size[size] are hashed
        self.first: dict[int | None, dict[str, tuple[int, int, str]]] = {}  # size -> hash -> first position
        self.lock = threading.Lock()
        self.hash_lock = threading.Lock()  # hashing reads files: the size index is not held up meanwhile

    def first_copy(self, size: int | None, shard: int, index: int, cache_dir: str) -> dict[str, tuple[int, int, str]]:
        """Hash every file of ``size`` before (shard, index) not hashed yet; the size's hash -> first position."""
        with self.hash_lock:
            with self.lock:
                group = list(self.by_size.get(size, ()))
            first = self.first.setdefault(size, {})
            done = self.hashed.get(size, 0)
            while done < len(group) and group[done][:2] < (shard, index):
                k, j, u = group[done]
                try:
                    first.setdefault(_hash_of(local_copy(u, cache_dir)), (k, j, u))
                except Exception:  # noqa: BLE001 -- an earlier file that cannot be read is that file's error row
                    pass
                done += 1
            self.hashed[size] = done
            return first

    def upto(self, shard: int, index: int) -> None:
        """Index every position before (shard, index)."""
        with self.lock:
            k, j = self.next
            shards = self.plan["shards"]
            while (k, j) < (shard, index) and k < len(shards):
                if j >= len(shards[k]):
                    k, j = k + 1, 0
                    continue
                u = shards[k][j]
                self.by_size.setdefault(_size_of(u), []).append((k, j, u))
                j += 1
            self.next = max(self.next, (k, j))


_SIZE_INDEX: dict[int, _SizeIndex] = {}  # id(plan) -> index (the plan object is held by its index)
_SIZE_INDEX_LOCK = threading.Lock()


def _size_index(plan: dict) -> _SizeIndex:
    with _SIZE_INDEX_LOCK:
        idx = _SIZE_INDEX.get(id(plan))
        if idx is None or idx.plan is not plan:
            if len(_SIZE_INDEX) > 8:
                _SIZE_INDEX.clear()
            idx = _SIZE_INDEX[id(plan)] = _SizeIndex(plan)
        return idx


def earlier_duplicate(plan: dict, shard: int, index: int, size: int, vid: str, cache_dir: str) -> tuple[str, int] | None:
    """(uri, shard) of the first file before position (shard, index) of the plan with the same bytes."""
    idx = _size_index(plan)
    idx.upto(shard, index)
    hit = idx.first_copy(size, shard, index, cache_dir).get(vid)
    return (hit[2], hit[0]) if hit is not None and hit[:2] < (shard, index) else None


def process(ctx: ShardContext) -> list[Video]:
    import dataclasses

    plan = cached_plan(ctx.root)  # parsed once per process, not once per shard
    uris = plan["shards"][ctx.shard]
    cache = input_cache_dir()
    rows = []
    for i, uri in enumerate(uris):
        v = ingest_one(uri, ctx.shard, ctx.config, cache)
        if not v.video_id.startswith("path-") and v.size_bytes is not None:
            size = os.path.getsize(v.path) if os.path.exists(v.path) else v.size_bytes
            dup = earlier_duplicate(plan, ctx.shard, i, size, v.video_id, cache)
            if dup is not None:
                v = dataclasses.replace(
                    v, video_id="path-" + hashlib.sha256(uri.encode()).hexdigest()[:27], status=STATUS_SKIPPED,
                    error=f"duplicate: same bytes (content id {v.video_id}) as {dup[0]} (shard {dup[1]}), "
                          f"which is ingested instead")
        rows.append(v)
        ctx.progress(i + 1, len(uris))
    return rows


def _ffprobe_version(cfg) -> tuple[str, str | None]:
    return ("ffprobe", _tool_version())


_VERSION: list[str] = []


def _tool_version() -> str | None:
    if not _VERSION:
        import subprocess

        try:
            out = subprocess.run(["ffprobe", "-version"], capture_output=True, text=True, timeout=10).stdout
            _VERSION.append(out.split("\n", 1)[0].split(" ")[2] if out else "unknown")
        except (OSError, IndexError, subprocess.SubprocessError):
            _VERSION.append("unknown")
    return _VERSION[0]


STAGE = Stage(
    name="ingest", schema=SCHEMA, inputs=(), config_cls=IngestConfig, process=process, expert=_ffprobe_version,
    resources=Resources(cpus=1), description="probe, hash, filter and shard the input videos",
)
