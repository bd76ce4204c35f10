"""Decode ahead while the model works: a bounded prefetch of per-item inputs on a background thread.

``prefetched(items, load, depth)`` yields ``(item, loaded)`` in the order of ``items``; ``loaded`` is what
``load(item)`` returned, or the exception it raised (one unreadable video is that item's error row, not the
shard's). A daemon thread runs ``load`` at most ``depth`` items ahead of the consumer (a bounded queue), so
while the stage's model works on one batch, the frames of the next are decoded (PyAV and numpy release the
GIL while decoding and resizing) and memory holds at most ``depth`` decoded items beyond the current batch.
``batches`` groups such a stream into lists of a given size for batched model calls. ``depth=0`` loads
inline, one item at a time on the consumer's thread (the baseline the benchmarks compare against).

``prefetched_streams`` is the same for items that are themselves streams (the frames of a clip, fed to a
tracker one at a time): the thread decodes up to ``depth`` frames ahead and runs on into the next clip's
frames while the model still works on the current clip's last ones.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


def _put(q: queue.Queue, stop: threading.Event, value) -> bool:
    """Put ``value`` on the bounded queue, waiting while it is full; False once the consumer has stopped."""
    while not stop.is_set():
        try:
            q.put(value, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _inline(items: Iterable[T], load: Callable[[T], R]) -> Iterator[tuple[T, R | Exception]]:
    for item in items:
        try:
            value: R | Exception = load(item)
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer as this item's result
            value = exc
        yield item, value


def prefetched(items: Iterable[T], load: Callable[[T], R], depth: int = 4) -> Iterator[tuple[T, R | Exception]]:
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    if depth == 0:
        yield from _inline(items, load)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        return _put(q, stop, value)

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                try:
                    value: R | Exception = load(item)
                except Exception as exc:  # noqa: BLE001 -- handed to the consumer as this item's result
                    value = exc
                if not put((item, value)):
                    return
        except BaseException as exc:  # the iterable itself failed: re-raised in the consumer
            put((_END, exc))
            return
        put((_END, None))

    thread = threading.Thread(target=work, name="motionforge-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, value = q.get()
            if item is _END:
                if value is not None:
                    raise value
                return
            yield item, value
    finally:
        stop.set()  # the consumer stopped early (or finished): let the loader thread exit
        thread.join(timeout=5)


_START, _ITEM, _FAIL, _DONE = "start", "item", "fail", "done"


class _Stream:
    """The consumer's view of one item's stream, fed from the shared queue by :func:`prefetched_streams`."""

    def __init__(self, pull: Callable[[], tuple], index: int) -> None:
        self._pull = pull
        self._index = index
        self.finished = False

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self):
        if self.finished:
            raise StopIteration
        kind, index, value = self._pull()
        if index != self._index:  # cannot happen: the loader sends one item's messages contiguously
            raise RuntimeError(f"prefetch stream out of order: got item {index} inside item {self._index}")
        if kind == _ITEM:
            return value
        self.finished = True
        if kind == _FAIL:
            raise value
        raise StopIteration


def prefetched_streams(items: Iterable[T], open_stream: Callable[[T], Iterable[R]], depth: int = 32,
                       limit: int | None = None) -> Iterator[tuple[T, Iterator[R]]]:
    """``(item, stream)`` in the order of ``items``; ``stream`` yields what ``open_stream(item)`` yields (at most
    ``limit`` elements), decoded on a daemon thread at most ``depth`` elements ahead of the consumer, across item
    boundaries. An exception from opening or reading an item's stream is raised when the consumer reaches it in
    that item's ``stream`` (the same place a plain generator raises it); the next items are unaffected. A
    consumer that moves on before the end of a stream cancels the rest of it. ``depth=0`` reads inline."""
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")

    def bounded(item: T) -> Iterator[R]:
        for n, x in enumerate(open_stream(item)):
            if limit is not None and n >= limit:
                return
            yield x

    if depth == 0:
        for item in items:
            yield item, bounded(item)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cancelled = [-1]  # the highest item index whose remaining elements the consumer no longer wants

    def put(value) -> bool:
        return _put(q, stop, value)

    def work() -> None:
        try:
            for index, item in enumerate(items):
                if not put((_START, index, item)):
                    return
                try:
                    for x in bounded(item):
                        if stop.is_set():
                            return
                        if cancelled[0] >= index:
                            break
                        if not put((_ITEM, index, x)):
                            return
                except Exception as exc:  # noqa: BLE001 -- raised in the consumer, inside this item's stream
                    if not put((_FAIL, index, exc)):
                        return
                    continue
                if not put((_DONE, index, None)):
                    return
        except BaseException as exc:  # the iterable itself failed: re-raised in the consumer
            put((_END, -1, exc))
            return
        put((_END, -1, None))

    thread = threading.Thread(target=work, name="motionforge-prefetch-streams", daemon=True)
    thread.start()
    try:
        current: _Stream | None = None
        while True:
            if current is not None and not current.finished:
                cancelled[0] = current._index  # the consumer moved on: skip the rest of that item's stream
                try:
                    for _ in current:
                        pass
                except Exception:  # noqa: BLE001 -- a failure in the part the consumer gave up on
                    pass
            kind, index, value = q.get()
            if kind is _END:
                if value is not None:
                    raise value
                return
            if kind != _START:
                raise RuntimeError(f"prefetch stream out of order: got {kind!r} for item {index} between items")
            current = _Stream(q.get, index)
            yield value, current
    finally:
        stop.set()
        thread.join(timeout=5)


def prefetched_batches(items: Iterable[T], load: Callable[[T], R], size: int,
                       depth: int | None = None) -> Iterator[list[tuple[T, R | Exception]]]:
    """``(item, loaded)`` pairs in lists of ``size`` for batched model calls, loaded on a prefetch thread
    ``depth`` items ahead (None: one batch ahead; 0: inline), as :func:`prefetched` gives them."""
    return batches(prefetched(items, load, depth=size if depth is None else depth), size)


def batches(stream: Iterable[T], size: int) -> Iterator[list[T]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    batch: list[T] = []
    for x in stream:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def model_batch_size(spec) -> int:
    """How many items a stage hands its chat model per call when it prefetches: the in-process batch size,
    or enough requests to fill an endpoint's concurrency a few times over."""
    if getattr(spec, "backend", "transformers") == "openai":
        return max(1, 4 * int(getattr(spec, "max_concurrency", 8)))
    return max(1, int(getattr(spec, "batch_size", 8)))
