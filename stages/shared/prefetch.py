"""Decode ahead while the model works: a bounded prefetch of per-item inputs on a background thread.

``prefetched(items, load, depth)`` yields ``(item, loaded)`` in the order of ``items``; ``loaded`` is what
``load(item)`` returned, or the exception it raised (one unreadable video is that item's error row, not the
shard's). A daemon thread runs ``load`` at most ``depth`` items ahead of the consumer (a bounded queue), so
while the stage's model works on one batch, the frames of the next are decoded (PyAV and numpy release the
GIL while decoding and resizing) and memory holds at most ``depth`` decoded items beyond the current batch.
``batches`` groups such a stream into lists of a given size for batched model calls.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


def prefetched(items: Iterable[T], load: Callable[[T], R], depth: int = 4) -> Iterator[tuple[T, R | Exception]]:
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

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
