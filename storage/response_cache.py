"""On-disk cache of LLM / VLM responses, so a re-run never pays for the same request twice.

Layout: ``<root>/_cache/llm/<key[:2]>/<key>.json`` where ``key`` is :meth:`ResponseCache.request_key`, the
sha256 of a canonical JSON rendering of (endpoint model, messages, generation parameters). Inline images
(``data:`` URLs) are replaced by their own sha256 before hashing and before anything is stored, so cache
files stay small and never hold pixels.

Writes are atomic: local roots write a temp file in the same folder and ``os.replace`` it; object stores
(any other fsspec filesystem) write a whole object in one ``pipe_file`` call, which those stores publish
atomically. Two writers racing on one key both write the same logical value, so last-writer-wins is safe
for threads and processes alike. A cache file that cannot be parsed is treated as a miss.

The cache never sees credentials: callers pass model name, messages and generation parameters only.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from typing import Any

_DATA_URL_PREFIX = "data:"
CACHE_SUBDIR = ("_cache", "llm")


def _digest_data_url(url: str) -> str:
    return "sha256:" + hashlib.sha256(url.encode("utf-8")).hexdigest()


def strip_inline_data(obj: Any) -> Any:
    """Return a copy of ``obj`` (JSON-like) with every ``data:`` URL string replaced by its sha256."""
    if isinstance(obj, str):
        return _digest_data_url(obj) if obj.startswith(_DATA_URL_PREFIX) else obj
    if isinstance(obj, dict):
        return {str(k): strip_inline_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strip_inline_data(v) for v in obj]
    return obj


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class ResponseCache:
    """Content-addressed JSON store under ``<root>/_cache/llm``; ``root`` is a local path or an fsspec URL."""

    def __init__(self, root: str) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.root = str(root)
        self._fs, base = fsspec.core.url_to_fs(self.root)
        self._local = isinstance(self._fs, LocalFileSystem)
        self._base = base.rstrip("/") + "/" + "/".join(CACHE_SUBDIR)
        self._made_dirs: set[str] = set()
        self._lock = threading.Lock()

    # -- keys -----------------------------------------------------------------------------------------
    @staticmethod
    def request_key(model: str, messages: list[dict], params: dict) -> str:
        """Stable sha256 hex of (model, messages, params); dict order and inline image bytes do not matter."""
        payload = {"model": model, "messages": strip_inline_data(messages), "params": strip_inline_data(params)}
        return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()

    def path_for(self, key: str) -> str:
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a lower-case hex digest, got {key!r}")
        return f"{self._base}/{key[:2]}/{key}.json"

    # -- read / write -----------------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        path = self.path_for(key)
        try:
            if self._local:
                with open(path, "rb") as fh:
                    raw = fh.read()
            else:
                raw = self._fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError):
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None  # torn or foreign file: behave like a miss, the next put overwrites it
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"cache values must be dicts, got {type(value).__name__}")
        data = canonical_json(strip_inline_data(value)).encode("utf-8")
        path = self.path_for(key)
        parent = path.rsplit("/", 1)[0]
        if not self._local:
            self._fs.pipe_file(path, data)
            return
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            with self._lock:
                self._made_dirs.add(parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:12]}.", suffix=".tmp", dir=parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __repr__(self) -> str:
        return f"ResponseCache({self.root!r})"
