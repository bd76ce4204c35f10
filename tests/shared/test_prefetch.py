"""Bounded prefetch: order, per-item failures, the bound on look-ahead, overlap with the consumer, early stop."""
from __future__ import annotations

import threading

import pytest

from stages.shared.prefetch import batches, model_batch_size, prefetched, prefetched_streams


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


def test_depth_zero_loads_inline_with_the_same_contract():
    on_thread = []

    def load(i):
        on_thread.append(threading.current_thread() is threading.main_thread())
        if i == 1:
            raise OSError("unreadable")
        return i

    out = list(prefetched(range(3), load, depth=0))
    assert [i for i, _ in out] == [0, 1, 2] and isinstance(out[1][1], OSError) and out[2][1] == 2
    assert all(on_thread)  # inline: nothing runs on another thread
    with pytest.raises(ValueError):
        list(prefetched(range(3), load, depth=-1))


def _frames(i):
    """Clip ``i``'s frames; clip 2 cannot be opened, clip 3 breaks after two frames."""
    if i == 2:
        raise ValueError("cannot open clip 2")
    for k in range(5):
        if i == 3 and k == 2:
            raise OSError("truncated clip 3")
        yield (i, k)


def _consume(stream_of_streams, stop_early_at=4):
    out = []
    for item, frames in stream_of_streams:
        got = []
        try:
            for x in frames:
                got.append(x)
                if item == stop_early_at and len(got) == 1:
                    break  # the consumer gives up on this clip (e.g. the tracker failed)
            out.append((item, got))
        except Exception as exc:  # noqa: BLE001
            out.append((item, f"{type(exc).__name__}: {exc}"))
    return out


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_streams_order_errors_limit_and_early_stop(depth):
    out = _consume(prefetched_streams(range(6), _frames, depth=depth, limit=4))
    full = [(i, k) for i in range(6) for k in range(4)]
    assert out == [
        (0, [x for x in full if x[0] == 0]), (1, [x for x in full if x[0] == 1]),
        (2, "ValueError: cannot open clip 2"), (3, "OSError: truncated clip 3"),
        (4, [(4, 0)]), (5, [x for x in full if x[0] == 5]),
    ]


def test_prefetched_streams_decode_into_the_next_clip_while_the_consumer_works():
    decoded = []
    next_clip_started = threading.Event()

    def frames(i):
        for k in range(3):
            decoded.append((i, k))
            if i == 1:
                next_clip_started.set()
            yield (i, k)

    seen = []
    for item, stream in prefetched_streams(range(3), frames, depth=8):
        for x in stream:
            if x == (0, 2):
                # the model still holds clip 0's last frame; clip 1 is being decoded meanwhile
                assert next_clip_started.wait(timeout=30)
            seen.append(x)
    assert seen == [(i, k) for i in range(3) for k in range(3)]


def test_prefetched_streams_cancel_the_rest_of_an_abandoned_clip():
    decoded = []

    def frames(i):
        for k in range(10_000 if i == 0 else 2):
            decoded.append((i, k))
            yield (i, k)

    out = [(item, next(stream)) for item, stream in prefetched_streams(range(2), frames, depth=2)]
    assert out == [(0, (0, 0)), (1, (1, 0))]
    assert sum(1 for i, _ in decoded if i == 0) < 100  # not decoded to the end after the consumer moved on
