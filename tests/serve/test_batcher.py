"""serve/batcher.py: batch collection on an instance thread, buckets, padding, splitting."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from serve.batcher import Batcher, Pending, collect
from serve.errors import ServeError
from serve.model_info import read_model_info
from serve.runtime import Runtime, bucket_for, buckets_for
from tests.serve.conftest import reference


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _pending(loop: asyncio.AbstractEventLoop, rows: int, tag: float = 0.0) -> Pending:
    data = np.full((rows, 1), tag, dtype=np.float32)
    return Pending(data, loop.create_future(), None, loop.time())


def _queue(*items: Pending) -> queue.SimpleQueue[Pending | None]:
    pending: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
    for item in items:
        pending.put(item)
    return pending


def test_buckets_are_powers_of_two_then_the_max() -> None:
    assert buckets_for(1) == (1,)
    assert buckets_for(8) == (1, 2, 4, 8)
    assert buckets_for(12) == (1, 2, 4, 8, 12)
    assert bucket_for(3, buckets_for(12)) == 4
    assert bucket_for(9, buckets_for(12)) == 12
    with pytest.raises(ValueError, match="at most 12 rows"):
        bucket_for(13, buckets_for(12))


def test_collect_takes_everything_queued_without_waiting(loop: asyncio.AbstractEventLoop) -> None:
    items = [_pending(loop, 1, i) for i in range(5)]
    pending = _queue(*items)
    started = time.monotonic()
    assert collect(pending, None, max_rows=64, delay=0.0) == (items, None, False)
    assert time.monotonic() - started < 1.0  # no idle waiting (generous bound)


def test_collect_stops_at_max_rows_and_holds_the_overflow(
    loop: asyncio.AbstractEventLoop,
) -> None:
    a, b, c = _pending(loop, 3), _pending(loop, 4), _pending(loop, 2)
    pending = _queue(a, b, c)
    assert collect(pending, None, max_rows=5, delay=0.0) == ([a], b, False)
    assert collect(pending, b, max_rows=5, delay=0.0) == ([b], c, False)
    assert collect(pending, c, max_rows=5, delay=0.0) == ([c], None, False)
    assert pending.empty()


class _ArrivesOnWait:
    """A queue holding ``first``, to which ``late`` comes the moment a caller blocks waiting
    for more (once). A timer putting ``late`` 50 ms on raced a collect that started late on a
    loaded machine: it found both queued, and rightly took both."""

    def __init__(self, first: Pending, late: Pending) -> None:
        self._items = [first]
        self._late: Pending | None = late

    def get(self, block: bool = True, timeout: float | None = None) -> Pending:
        if not self._items and self._late is not None:
            self._items.append(self._late)
            self._late = None
        return self.get_nowait()

    def get_nowait(self) -> Pending:
        if not self._items:
            raise queue.Empty
        return self._items.pop(0)


def test_collect_waits_for_more_only_with_a_delay(loop: asyncio.AbstractEventLoop) -> None:
    first, late = _pending(loop, 1), _pending(loop, 1)
    assert collect(_ArrivesOnWait(first, late), None, max_rows=8, delay=0.0)[0] == [first]
    assert collect(_ArrivesOnWait(first, late), None, max_rows=8, delay=2.0)[0] == [first, late]
    pending = _queue()
    threading.Timer(0.05, pending.put, (late,)).start()
    assert collect(pending, None, max_rows=8, delay=0.0)[0] == [late]  # blocks for the first
    third, fourth = _pending(loop, 1), _pending(loop, 1)
    pending.put(third)
    threading.Timer(0.05, pending.put, (fourth,)).start()
    batch, _, _ = collect(pending, None, max_rows=8, delay=2.0)
    assert batch == [third, fourth]  # the window stayed open for the late one


def test_collect_returns_when_the_window_fills(loop: asyncio.AbstractEventLoop) -> None:
    items = [_pending(loop, 2) for _ in range(3)]
    pending = _queue(items[0])
    threading.Timer(0.02, pending.put, (items[1],)).start()
    threading.Timer(0.04, pending.put, (items[2],)).start()
    started = time.monotonic()
    assert collect(pending, None, max_rows=6, delay=30.0) == (items, None, False)
    assert time.monotonic() - started < 10.0  # a full batch ends the window, not the delay


def test_collect_skips_cancelled_requests_and_ends_at_a_stop_mark(
    loop: asyncio.AbstractEventLoop,
) -> None:
    gone, kept = _pending(loop, 4), _pending(loop, 4)
    gone.future.cancel()
    pending = _queue(gone, kept)
    assert collect(pending, None, max_rows=4, delay=0.0) == ([kept], None, False)
    last = _pending(loop, 1)
    pending = _queue(last)
    pending.put(None)
    assert collect(pending, None, max_rows=4, delay=5.0) == ([last], None, True)


def test_collect_returns_empty_after_dropping_instead_of_blocking(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # The instance then loops back to wait for requests; it must not block holding nothing.
    gone = [_pending(loop, 2) for _ in range(3)]
    for item in gone:
        item.future.cancel()
    pending = _queue(*gone[1:])
    stop = threading.Timer(10, pending.put, (None,))  # ends a collect that would block
    stop.start()
    try:
        assert collect(pending, gone[0], max_rows=4, delay=0.0) == ([], None, False)
    finally:
        stop.cancel()
    assert pending.empty()


def test_batcher_splits_pads_and_reassembles(classifier_path: Path) -> None:
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=4, intra_op_threads=1)
    runtime.warm_up()
    rows = np.random.default_rng(3).normal(size=(11, *info.sample_shape)).astype(np.float32)
    expected = np.concatenate([runtime.run(rows[i : i + 1]) for i in range(len(rows))])

    async def scenario() -> np.ndarray:
        batcher = Batcher(runtime, max_queue_size=16, max_queue_delay_s=0, instances=2)
        batcher.start()
        try:
            return await batcher.infer(rows, None)
        finally:
            await batcher.close()

    got = asyncio.run(scenario())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_idle_instances_closed_at_once_are_not_reported_as_running_batches(
    classifier_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With no time left (--grace 0, or spent by gRPC's stop), idle instance threads that had
    not yet taken their stop mark were logged as batches "still running"."""
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=4, intra_op_threads=1)

    async def scenario() -> None:
        for _ in range(20):
            batcher = Batcher(runtime, max_queue_size=16, max_queue_delay_s=0, instances=4)
            batcher.start()
            await batcher.close(0.0)

    asyncio.run(scenario())
    assert "still running" not in caplog.text


@pytest.mark.parametrize(
    ("fixed", "piece"),
    [(None, "--max-batch-size 2"), (2, "the model's fixed batch 2")],
    ids=["max-batch-size", "fixed-batch"],
)
def test_batcher_refuses_a_request_the_queue_could_never_hold(
    classifier_path: Path, tmp_path: Path, fixed: int | None, piece: str
) -> None:
    path = classifier_path
    if fixed is not None:  # a graph exported for one batch size: that, not the flag, limits
        model = onnx.load(str(classifier_path))
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_value = fixed
        path = tmp_path / "fixed.onnx"
        onnx.save(model, str(path))
    info = read_model_info("tiny", path)
    runtime = Runtime(info, device="cpu", max_batch_size=64 if fixed else 2, intra_op_threads=1)
    rows = np.zeros((7, *info.sample_shape), dtype=np.float32)

    async def scenario() -> None:
        batcher = Batcher(runtime, max_queue_size=3, max_queue_delay_s=0, instances=1)
        batcher.start()
        try:
            with pytest.raises(ServeError) as caught:
                await batcher.infer(rows, None)  # 4 pieces of 2 rows, room for 3 at most
            # Not RESOURCE_EXHAUSTED: retrying with backoff could never help.
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.message == (
                f"expected at most 6 rows per request to model tiny (--max-queue-size 3 pieces "
                f"of {piece}), got 7; split the request or raise --max-queue-size"
            )
            assert batcher.depth == 0  # nothing half-queued
            np.testing.assert_allclose(  # six rows fit
                await batcher.infer(rows[:6], None), reference(classifier_path, rows[:6]), atol=1e-5
            )
        finally:
            await batcher.close()

    asyncio.run(scenario())


def test_a_full_queue_says_a_split_request_needs_a_place_per_piece(classifier_path: Path) -> None:
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=2, intra_op_threads=1)
    rows = np.zeros((3, *info.sample_shape), dtype=np.float32)

    async def scenario() -> None:
        # No instance threads: whatever is queued stays queued.
        batcher = Batcher(runtime, max_queue_size=3, max_queue_delay_s=0, instances=0)
        batcher.start()
        try:
            waiting, _ = batcher.submit(rows, None)  # two pieces
            with pytest.raises(ServeError) as caught:
                batcher.submit(rows, None)
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # "2 of 3 requests waiting" alone read as room for this one.
            assert caught.value.message.startswith(
                "expected room in the queue of model tiny for the 2 pieces of --max-batch-size "
                "2 rows, got 2 of 3 requests waiting;"
            )
            batcher.submit(rows[:1], None)  # one piece fits
            waiting.cancel()
        finally:
            await batcher.close()

    asyncio.run(scenario())


def test_expired_deadline_is_dropped_before_compute(classifier_path: Path) -> None:
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=4, intra_op_threads=1)
    rows = np.zeros((1, *info.sample_shape), dtype=np.float32)

    async def scenario() -> None:
        batcher = Batcher(runtime, max_queue_size=8, max_queue_delay_s=0, instances=1)
        batcher.start()
        try:
            loop = asyncio.get_running_loop()
            with pytest.raises(ServeError) as caught:
                await batcher.infer(rows, loop.time() - 1)
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert sum(batcher.batch_rows.values()) == 0
            await batcher.infer(rows, loop.time() + 60)
            assert batcher.batch_rows == {1: 1}
        finally:
            await batcher.close()

    asyncio.run(scenario())


class _FailsOnce(Runtime):
    """The real runtime, except that sizing the first batch hits a bug."""

    failed = False

    def batch_size(self, rows: int) -> int:
        if not self.failed:
            self.failed = True
            raise RuntimeError("planted bug")
        return super().batch_size(rows)


def test_a_bug_in_one_batch_fails_it_and_the_instance_keeps_serving(
    classifier_path: Path,
) -> None:
    info = read_model_info("tiny", classifier_path)
    runtime = _FailsOnce(info, device="cpu", max_batch_size=4, intra_op_threads=1)
    rows = np.zeros((1, *info.sample_shape), dtype=np.float32)

    async def scenario() -> np.ndarray:
        batcher = Batcher(runtime, max_queue_size=8, max_queue_delay_s=0, instances=1)
        batcher.start()
        try:
            with pytest.raises(ServeError) as caught:
                await asyncio.wait_for(batcher.infer(rows, None), 10)
            assert caught.value.code == grpc.StatusCode.INTERNAL
            assert "planted bug" in caught.value.message
            return await asyncio.wait_for(batcher.infer(rows, None), 10)
        finally:
            await batcher.close()

    assert asyncio.run(scenario()).shape == (1, info.num_classes)
