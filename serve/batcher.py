"""The dynamic batcher: a bounded queue of requests per model, collected into padded batches."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np

from serve.errors import ServeError, unavailable
from serve.runtime import Runtime, bucket_for

if TYPE_CHECKING:
    from serve.metrics import Metrics

_log = logging.getLogger(__name__)
# With nothing else queued, a batch expected to compute within this long runs on the event
# loop's thread: handing it to a worker thread and back costs two thread wake-ups, about
# 0.15 ms of a 0.55 ms batch-1 call on a 2-core VM (docs/benchmarks.md). Under load, worker
# threads let compute overlap with the loop's gRPC work, which matters more.
_INLINE_S = 0.001


@dataclass(eq=False)
class Pending:
    """One queued piece of work: rows of one request (or a slice of a split request)."""

    rows: np.ndarray  # [r, *sample_shape] float32
    future: asyncio.Future[np.ndarray]
    deadline: float | None  # loop.time() after which computing it is pointless
    enqueued: float  # loop.time()
    started: float = 0.0  # loop.time() when its batch was taken from the queue
    compute_s: float = 0.0  # seconds its batch spent in the runtime


@dataclass
class Trace:
    """What one request went through, for its DEBUG log line (see ``TRACE``)."""

    id: int
    rows: int = 0
    queue_s: float = 0.0
    compute_s: float = 0.0

    def add(self, pieces: list[Pending]) -> None:
        self.rows += sum(len(p.rows) for p in pieces)
        self.queue_s = max(self.queue_s, *(p.started - p.enqueued for p in pieces))
        self.compute_s += sum(p.compute_s for p in pieces)


# Set by the servicer's request task when DEBUG logging is on; ``Batcher.infer`` fills it.
TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("serve_trace", default=None)


async def collect(
    queue: asyncio.Queue[Pending], held: Pending | None, max_rows: int, delay: float
) -> tuple[list[Pending], Pending | None]:
    """Take one batch from ``queue``: everything waiting, up to ``max_rows`` rows.

    Waits for the first request (or starts from ``held``, the request that did not fit last
    time), then takes whatever is already queued; only with ``delay`` > 0 seconds does it wait
    that long for more. Requests whose futures are already done (cancelled by their client)
    are dropped. Returns the batch and the request that would have overflowed it, if any.
    """
    loop = asyncio.get_running_loop()
    batch: list[Pending] = []
    rows = 0
    item = held
    until: float | None = None
    while True:
        if item is None:
            if not batch:
                item = await queue.get()
            elif not queue.empty():
                item = queue.get_nowait()
            else:
                until = loop.time() + delay if until is None else until
                remaining = until - loop.time()
                if remaining <= 0:
                    return batch, None
                try:
                    # A cancelled Queue.get leaves its item in the queue, so nothing is lost.
                    item = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    return batch, None
        if item.future.done():
            item = None
            continue
        if batch and rows + len(item.rows) > max_rows:
            return batch, item
        batch.append(item)
        rows += len(item.rows)
        item = None
        if rows >= max_rows:
            return batch, None


class Batcher:
    """Queues requests for one model and runs them in batches on ``instances`` workers.

    ``batch_rows`` counts executed batches by their real (unpadded) row count.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_queue_size: int,
        max_queue_delay_s: float,
        instances: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.name = runtime.info.name
        self.batch_rows: collections.Counter[int] = collections.Counter()
        self._delay = max_queue_delay_s
        self._instances = instances
        self._metrics = metrics
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=max_queue_size)
        self._executor = ThreadPoolExecutor(instances, thread_name_prefix=f"ort-{self.name}")
        self._workers: list[asyncio.Task[None]] = []
        self._open = False
        # Recent compute seconds per bucket size (moving average), measured on real batches.
        self._seconds: dict[int, float] = {}

    def start(self) -> None:
        """Start the workers; call from the event loop that will submit requests."""
        self._open = True
        self._workers = [
            asyncio.create_task(self._work(), name=f"batcher-{self.name}-{i}")
            for i in range(self._instances)
        ]

    @property
    def depth(self) -> int:
        """Queued requests (slices of split requests count one each)."""
        return self._queue.qsize()

    async def infer(self, rows: np.ndarray, deadline: float | None) -> np.ndarray:
        """Logits [N, K] for ``rows`` [N, *sample_shape]; splits N above the max batch."""
        if not self._open:
            raise unavailable(
                f"model {self.name} is not accepting requests; retry on another replica"
            )
        loop = asyncio.get_running_loop()
        step = self.runtime.max_batch
        pieces = [rows[i : i + step] for i in range(0, len(rows), step)]
        free = self._queue.maxsize - self._queue.qsize()
        if len(pieces) > free:
            raise ServeError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"expected room in the queue of model {self.name}, got {self._queue.qsize()} of "
                f"{self._queue.maxsize} requests waiting; "
                "retry with backoff or raise --max-queue-size",
            )
        now = loop.time()
        queued = [Pending(piece, loop.create_future(), deadline, now) for piece in pieces]
        for pending in queued:
            self._queue.put_nowait(pending)
        if self._metrics is not None:
            self._metrics.queue_depth(self.name, self._queue.qsize())
        try:
            if len(queued) == 1:
                logits = await queued[0].future
            else:
                logits = np.concatenate(await asyncio.gather(*(p.future for p in queued)))
        except BaseException:
            for pending in queued:
                pending.future.cancel()
            raise
        trace = TRACE.get()
        if trace is not None:
            trace.add(queued)
        return logits

    async def close(self) -> None:
        """Stop the workers and fail whatever is still queued with UNAVAILABLE."""
        self._open = False
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        while not self._queue.empty():
            _fail([self._queue.get_nowait()], unavailable(f"model {self.name} was unloaded"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        held: Pending | None = None
        live: list[Pending] = []
        # This worker's batch buffer, reused while big enough: a fresh multi-megabyte array per
        # batch costs page faults that slowed 224×224 batches by ~6% (docs/benchmarks.md).
        buffer = np.empty((0, *self.runtime.info.sample_shape), dtype=np.float32)
        try:
            while True:
                batch, held = await collect(self._queue, held, self.runtime.max_batch, self._delay)
                now = loop.time()
                live = []
                for pending in batch:
                    if pending.future.done():
                        continue
                    if pending.deadline is not None and pending.deadline <= now:
                        waited = now - pending.enqueued
                        pending.future.set_exception(
                            ServeError(
                                grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"expected to start before the deadline, got {waited:.3f} s queued "
                                f"for model {self.name}; raise the client deadline or add capacity",
                            )
                        )
                        continue
                    pending.started = now
                    live.append(pending)
                    if self._metrics is not None:
                        self._metrics.queued(self.name, now - pending.enqueued)
                if self._metrics is not None:
                    self._metrics.queue_depth(self.name, self._queue.qsize())
                if live:
                    buffer = await self._run(loop, live, buffer)
                live = []
        except asyncio.CancelledError:
            message = unavailable(f"model {self.name} stopped before the request was answered")
            _fail(live + ([held] if held is not None else []), message)
            raise

    async def _run(
        self, loop: asyncio.AbstractEventLoop, live: list[Pending], buffer: np.ndarray
    ) -> np.ndarray:
        """Collate ``live`` into ``buffer`` (grown if needed), run it, answer every request;
        returns the buffer for the worker's next batch."""
        rows = sum(len(p.rows) for p in live)
        size = bucket_for(rows, self.runtime.buckets)
        if len(live) == 1 and size == rows:
            batch = live[0].rows
        else:
            if len(buffer) < size:
                buffer = np.empty((size, *buffer.shape[1:]), dtype=np.float32)
            batch = buffer[:size]
            np.concatenate([p.rows for p in live], out=batch[:rows])
            batch[rows:] = 0
        estimate = self._seconds.get(size)
        started = time.perf_counter()
        try:
            if estimate is not None and estimate <= _INLINE_S and self._queue.empty():
                logits = self.runtime.run(batch)
            else:
                logits = await loop.run_in_executor(self._executor, self.runtime.run, batch)
        except Exception as e:
            _log.exception("model %s failed on a batch of %d rows", self.name, rows)
            _fail(live, ServeError(grpc.StatusCode.INTERNAL, f"model {self.name} failed: {e}"))
            return buffer
        seconds = time.perf_counter() - started
        self._seconds[size] = seconds if estimate is None else 0.8 * estimate + 0.2 * seconds
        if logits.shape[0] != size:
            _fail(
                live,
                ServeError(
                    grpc.StatusCode.INTERNAL,
                    f"expected {size} output rows from model {self.name}, got {logits.shape[0]}",
                ),
            )
            return buffer
        self.batch_rows[rows] += 1
        if self._metrics is not None:
            self._metrics.batch(self.name, rows, seconds)
        offset = 0
        for pending in live:
            count = len(pending.rows)
            if not pending.future.done():
                pending.compute_s = seconds
                pending.future.set_result(logits[offset : offset + count])
            offset += count
        return buffer


def _fail(pending: list[Pending], error: Exception) -> None:
    for item in pending:
        if not item.future.done():
            item.future.set_exception(error)
