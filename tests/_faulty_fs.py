"""A pyarrow filesystem over the local disk that fails on purpose: a rename that raises, a write that stops
with "no space left" after some bytes, or a process killed inside a write (SIGKILL to itself).

Installed as ``root.fs`` of an :class:`storage.root.OutputRoot`; production code does not know about it.
"""
from __future__ import annotations

import errno
import os
import signal

import pyarrow as pa
import pyarrow.fs as pafs


class _CutStream:
    """A writable file that raises ENOSPC once ``limit`` bytes were written (what a full disk does)."""

    def __init__(self, path: str, limit: int, kill: bool = False):
        self.f = open(path, "wb")
        self.limit = limit
        self.kill = kill
        self.n = 0
        self.closed = False

    def write(self, b) -> int:
        b = bytes(b)
        room = self.limit - self.n
        if len(b) > room:
            self.f.write(b[:max(room, 0)])
            self.f.flush()
            self.n = self.limit
            if self.kill:  # the process dies with the file half written, wherever it was being written
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self.f.write(b)
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()
        self.closed = True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.n


class FaultyHandler(pafs.FileSystemHandler):
    """``fail_move``: predicate on (src, dest) -> raise OSError on that rename; ``kill_move``: SIGKILL this
    process on that rename (the temp file is complete, the rename never happens); ``write_limit``: predicate on
    the path -> writes to it stop with ENOSPC after ``limit`` bytes; ``kill_write``: predicate on the path ->
    SIGKILL this process once ``limit`` bytes of it are written."""

    def __init__(self, fail_move=None, kill_move=None, write_limit=None, kill_write=None, limit: int = 64):
        self.local = pafs.LocalFileSystem()
        self.fail_move, self.kill_move, self.write_limit, self.limit = fail_move, kill_move, write_limit, limit
        self.kill_write = kill_write
        self.failures = 0

    # -- faults -------------------------------------------------------------------------------------------------
    def move(self, src, dest):
        if self.kill_move and self.kill_move(src, dest):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_move and self.fail_move(src, dest):
            self.failures += 1
            raise OSError(errno.EIO, f"rename {src} -> {dest} failed (injected)")
        self.local.move(src, dest)

    def open_output_stream(self, path, metadata):
        if self.kill_write and self.kill_write(path):
            return pa.PythonFile(_CutStream(path, self.limit, kill=True), mode="w")
        if self.write_limit and self.write_limit(path):
            self.failures += 1
            return pa.PythonFile(_CutStream(path, self.limit), mode="w")
        return self.local.open_output_stream(path, metadata=metadata)

    # -- plain delegation ---------------------------------------------------------------------------------------
    def get_type_name(self):
        return "faulty-local"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not supported")

    def delete_file(self, path):
        self.local.delete_file(path)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path, metadata=metadata)

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other


def install(root, **faults) -> FaultyHandler:
    h = FaultyHandler(**faults)
    root.fs = pafs.PyFileSystem(h)
    return h
