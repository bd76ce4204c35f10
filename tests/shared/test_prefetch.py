"""Bounded prefetch: order, per-item failures, the bound on look-ahead, overlap with the consumer, early stop."""
from __future__ import annotations

import threading

import pytest

from stages.shared.prefetch import batches, model_batch_size, prefetched


def test_order_and_failures_as_values():
    def load(i):
        if i == 2:
            raise ValueError("unreadable")
        return i * 10

    out = list(prefetched(range(5), load, depth=2))
    assert [i for i, _ in out] == [0, 1, 2, 3, 4]
    assert [v for i, v in out if i != 2] == [0, 10, 30, 40]
    assert isinstance(out[2][1], ValueError) and "unreadable" in str(out[2][1])


def test_loads_ahead_while_the_consumer_works_and_never_more_than_depth():
    loaded, consumed = [], []
    second_loaded = threading.Event()
    lock = threading.Lock()
    ahead = []

    def load(i):
        with lock:
            loaded.append(i)
            ahead.append(len(loaded) - len(consumed))
        if i == 1:
            second_loaded.set()
        return i

    for i, _ in prefetched(range(20), load, depth=3):
        if i == 0:
            # item 1 is decoded while the consumer still holds item 0 (the model's turn)
            assert second_loaded.wait(timeout=30)
        with lock:
            consumed.append(i)
    assert consumed == list(range(20))
    # queue of 3 + the item being loaded + the one the consumer holds
    assert max(ahead) <= 3 + 2


def test_early_stop_ends_the_loader():
    started = []

    def load(i):
        started.append(i)
        return i

    gen = prefetched(range(10_000), load, depth=2)
    assert next(gen) == (0, 0)
    gen.close()
    n = len(started)
    assert n < 10
    assert len(started) == n  # nothing loads after close


def test_a_failing_iterable_raises_in_the_consumer():
    def items():
        yield 1
        raise RuntimeError("listing failed")

    with pytest.raises(RuntimeError, match="listing failed"):
        list(prefetched(items(), lambda i: i))


def test_batches_and_sizes():
    assert list(batches(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    from experts.vlm import VlmSpec

    assert model_batch_size(VlmSpec(model_id="x", batch_size=5)) == 5
    assert model_batch_size(VlmSpec(model_id="x", backend="openai", max_concurrency=3)) == 12
