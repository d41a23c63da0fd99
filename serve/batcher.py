"""The dynamic batcher: a bounded queue of requests per model, collected into batches.

The event loop only queues requests and answers them. Each model instance is a thread of its
own that takes everything queued whenever it is free, collates, runs ONNX Runtime and hands
the results back to the loop with one call per batch. Collecting on the instance's thread
means the next batch starts the moment the last one ends, without a round trip through a busy
event loop: on a 2-core VM that round trip left the ONNX Runtime threads idle a fifth of the
time (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np

from serve.affinity import pin_current_thread
from serve.errors import ServeError, unavailable
from serve.runtime import ORT_ERRORS, Runtime, device_failed, ort_reason, out_of_memory

if TYPE_CHECKING:
    from serve.metrics import Metrics

_log = logging.getLogger(__name__)
# Put once per instance thread by ``Batcher.close``: the thread ends when it takes one.
_STOP = None
_THREAD_PREFIX = "ort-"  # instance threads are named ort-<model>-<i>
# Withdrawn pieces' rows, in bytes, above which ``withdraw`` purges the queue at once. A
# withdrawn call gives its share of Classify's decoded-rows budget back at once, so calls
# cancelled on a busy model could keep up to --max-queue-size x --max-batch-size rows queued
# (~37 GiB at the defaults and 3x224x224) that no budget counted. A purge walks the queue
# (~1 ms at a depth of 1024): once per GiB withdrawn costs nothing.
PURGE_WITHDRAWN_BYTES = 1 << 30


@dataclass(eq=False)
class Pending:
    """One queued piece of work: rows of one request (or a slice of a split request)."""

    rows: np.ndarray  # [r, *sample_shape] float32
    future: asyncio.Future[np.ndarray]
    deadline: float | None  # loop.time() after which computing it is pointless
    enqueued: float  # loop.time()
    started: float = 0.0  # loop.time() when its batch was taken from the queue
    compute_s: float = 0.0  # seconds its batch spent in the runtime
    collate_s: float = 0.0  # seconds its batch took to collate


@dataclass
class Trace:
    """What one request went through, for its DEBUG log line (see ``TRACE``)."""

    id: int
    rows: int = 0
    queue_s: float = 0.0
    compute_s: float = 0.0

    def add(self, pieces: list[Pending]) -> None:
        queue_s, _, compute_s = request_times(pieces)
        self.rows += sum(len(p.rows) for p in pieces)
        self.queue_s = max(self.queue_s, queue_s)
        self.compute_s += compute_s


def request_times(pieces: list[Pending]) -> tuple[float, float, float]:
    """One answered request's queue time (its longest piece's: pieces wait side by side) and
    its batches' collate and compute times (summed over its pieces)."""
    return (
        max(p.started - p.enqueued for p in pieces),
        sum(p.collate_s for p in pieces),
        sum(p.compute_s for p in pieces),
    )


# One run's answers: its requests, their logits or their error, compute and collate seconds.
_Result = tuple[list[Pending], np.ndarray | None, ServeError | None, float, float]


# Set by the servicer's request task when DEBUG logging is on; ``Batcher.infer`` fills it.
TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("serve_trace", default=None)


def collect(
    pending: queue.SimpleQueue[Pending | None],
    held: Pending | None,
    max_rows: int,
    delay: float,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[Pending], Pending | None, bool]:
    """Take one batch from ``pending``: everything waiting, up to ``max_rows`` rows.

    Blocks for the first request (or starts from ``held``, the request that did not fit last
    time), then takes whatever is already queued; only with ``delay`` > 0 seconds does it wait
    that long for more. Requests whose futures are already done (cancelled by their client)
    are dropped; when that leaves nothing queued, the batch comes back empty instead of
    blocking (the caller calls again). Returns the batch, the request
    that would have overflowed it, and whether a stop mark was taken (the caller runs the
    batch, then ends).
    """
    batch: list[Pending] = []
    rows = 0
    item = held
    until: float | None = None
    dropped = False
    while True:
        if item is None:
            try:
                if not batch:
                    item = pending.get_nowait() if dropped else pending.get()
                elif delay <= 0:
                    item = pending.get_nowait()
                else:
                    until = clock() + delay if until is None else until
                    item = pending.get(timeout=max(0.0, until - clock()))
            except queue.Empty:
                return batch, None, False
            if item is _STOP:
                return batch, None, True
        if item.future.done():
            item, dropped = None, True
            continue
        if batch and rows + len(item.rows) > max_rows:
            return batch, item, False
        batch.append(item)
        rows += len(item.rows)
        item = None
        if rows >= max_rows:
            return batch, None, False


class Batcher:
    """Queues requests for one model and runs them in batches on ``instances`` threads.

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
        self.batch_rows: Counter[int] = Counter()
        self._delay = max_queue_delay_s
        self._max_queue = max_queue_size
        self._instances = instances
        self._metrics = metrics
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        # One instance collects at a time: with a batch window, instances waiting side by side
        # split the requests of one window between them (two half batches, each after the full
        # delay). The request that did not fit the last batch is shared under the same lock:
        # held by the instance that took it, it waited behind a collector blocked on an empty
        # queue until its deadline. Without a window this changes nothing: the collector takes
        # whatever is queued at once.
        self._collecting = threading.Lock()
        self._held: Pending | None = None
        self._withdrawn = False  # a queued piece may have been cancelled since the last purge
        self._withdrawn_bytes = 0  # rows of the pieces withdrawn since the last purge
        self._busy: set[int] = set()  # idents of the instance threads inside a batch
        self._open = False
        fixed = runtime.info.fixed_batch
        self._piece = (
            f"the model's fixed batch {fixed}" if fixed else f"--max-batch-size {runtime.max_batch}"
        )

    def start(self) -> None:
        """Start the instance threads; call from the event loop that will submit requests."""
        loop = asyncio.get_running_loop()
        self._open = True
        if self._metrics is not None:
            self._metrics.watch_queue(self.name, lambda: self.depth)
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(loop,),
                name=f"{_THREAD_PREFIX}{self.name}-{i}",
                daemon=True,
            )
            for i in range(self._instances)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Queued requests (slices of split requests count one each), the one held back for
        the next batch included unless its client went away."""
        held = self._held
        return self._queue.qsize() + (held is not None and not held.future.done())

    def check_rows(self, rows: int) -> None:
        """INVALID_ARGUMENT unless one request of ``rows`` rows could ever be queued (split
        into pieces of the max batch, at most ``--max-queue-size`` of them)."""
        limit = self._max_queue * self.runtime.max_batch
        if rows > limit:
            raise ServeError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"expected at most {limit} rows per request to model "
                f"{self.name} (--max-queue-size {self._max_queue} pieces of {self._piece}), "
                f"got {rows}; split the request or raise --max-queue-size",
            )

    def submit(
        self, rows: np.ndarray, deadline: float | None
    ) -> tuple[asyncio.Future[np.ndarray], list[Pending]]:
        """Queue ``rows`` [N, *sample_shape] (split above the max batch) without waiting.

        Returns a future of the logits [N, K] (cancelling it withdraws every piece still
        queued) and the queued pieces. Raises UNAVAILABLE when closed, RESOURCE_EXHAUSTED when
        the queue has no room for every piece, INVALID_ARGUMENT when it never could.
        """
        if not self._open:
            raise unavailable(
                f"model {self.name} is not accepting requests; retry on another replica"
            )
        loop = asyncio.get_running_loop()
        step = self.runtime.max_batch
        count = -(-len(rows) // step)
        self.check_rows(len(rows))
        # A withdrawn held request counted until the next collect: after a purge had reset
        # _withdrawn, it refused a request with a place free.
        waiting = self.depth
        if count > self._max_queue - waiting:
            if self._withdrawn:  # places may be held by pieces whose clients went away
                waiting = self._purge()
            if count > self._max_queue - waiting:
                # A split request takes a place per piece: "3 of 4 waiting" alone reads as room.
                pieces = f" for the {count} pieces of {self._piece} rows" if count > 1 else ""
                raise ServeError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"expected room in the queue of model {self.name}{pieces}, got {waiting} of "
                    f"{self._max_queue} requests waiting; retry with backoff or raise "
                    "--max-queue-size",
                )
        now = loop.time()
        queued = [
            Pending(rows[i : i + step], loop.create_future(), deadline, now)
            for i in range(0, len(rows), step)
        ]
        for pending in queued:
            self._queue.put(pending)
        if count == 1:
            return queued[0].future, queued
        return _joined([p.future for p in queued], loop), queued

    async def infer(self, rows: np.ndarray, deadline: float | None) -> np.ndarray:
        """Logits [N, K] for ``rows`` [N, *sample_shape]; splits N above the max batch."""
        future, queued = self.submit(rows, deadline)
        try:
            logits = await future
        except BaseException:
            self.withdraw(future, queued)
            raise
        trace = TRACE.get()
        if trace is not None:
            trace.add(queued)
        self.served(queued)
        return logits

    def withdraw(self, future: asyncio.Future[np.ndarray], pieces: list[Pending]) -> None:
        """Cancel what ``submit`` returned, for a request that ends without its answer (its
        client went away, or one of its pieces failed): its pieces still queued stop counting
        against ``--max-queue-size`` at once, not only once an instance is free to drop them."""
        future.cancel()
        for piece in pieces:
            piece.future.cancel()
        # Not answered: still queued or in a batch (or cancelled already, when a sibling failed).
        withdrawn = [piece for piece in pieces if piece.future.cancelled()]
        if withdrawn:
            self._withdrawn = True
            self._withdrawn_bytes += sum(piece.rows.nbytes for piece in withdrawn)
        if self._withdrawn_bytes >= PURGE_WITHDRAWN_BYTES:
            self._purge()

    def _purge(self) -> int:
        """Take the withdrawn pieces out of the queue (in the loop, when it looks full);
        returns the depth left. An instance collecting meanwhile gets the rest in order."""
        self._withdrawn = False
        self._withdrawn_bytes = 0
        kept: list[Pending | None] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP or not item.future.done():
                kept.append(item)
        for item in kept:
            self._queue.put(item)
        return self.depth

    def served(self, pieces: list[Pending]) -> None:
        """Count one request answered from ``pieces`` in the ModelStatistics totals."""
        if self._metrics is not None:
            self._metrics.served(self.name, *request_times(pieces))

    async def close(self, timeout: float = 10.0) -> None:
        """Fail whatever is still queued with UNAVAILABLE, let running batches finish (up to
        ``timeout`` seconds), and end the instance threads."""
        self._open = False
        left: list[Pending] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                left.append(item)
        _fail(left, unavailable(f"model {self.name} was unloaded"))
        for _ in self._threads:
            self._queue.put(_STOP)
        threads, self._threads = self._threads, []

        def join() -> None:
            until = time.monotonic() + timeout
            for thread in threads:
                thread.join(max(0.0, until - time.monotonic()))

        await asyncio.to_thread(join)
        # An idle instance still alive has only not yet taken its stop mark (a grace of ~0).
        running = sum(thread.is_alive() and thread.ident in self._busy for thread in threads)
        if running:
            _log.warning(
                "model %s: %d batch%s still running when the grace period ended; not waited for",
                self.name,
                running,
                "" if running == 1 else "es",
            )

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        """One instance: collect, run, hand results to the loop; until a stop mark."""
        pin_current_thread(self.runtime.caller_cpus)
        # This instance's batch buffer, reused while big enough: a fresh multi-megabyte array
        # per batch costs page faults that slowed 224×224 batches by ~6% (docs/benchmarks.md).
        buffer = np.empty((0, *self.runtime.info.sample_shape), dtype=np.float32)
        stop = False
        me = threading.get_ident()
        while not stop:
            with self._collecting:
                batch, self._held, stop = collect(
                    self._queue, self._held, self.runtime.max_batch, self._delay
                )
            if not batch:  # only withdrawn requests were taken: the queue shrank without a batch
                continue
            self._busy.add(me)
            try:
                buffer = self._run(loop, batch, buffer)
            except Exception as e:  # a bug: fail this batch, keep the instance serving
                _log.exception("model %s: instance failed on a batch", self.name)
                error = ServeError(grpc.StatusCode.INTERNAL, f"model {self.name} failed: {e}")
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_fail, batch, error)
            finally:
                self._busy.discard(me)
            # Idle until the next batch, the instance must not keep this one's rows alive
            # (views of a caller's whole array: a Classify call's can be 1 GiB).
            del batch

    def _run(
        self, loop: asyncio.AbstractEventLoop, batch: list[Pending], buffer: np.ndarray
    ) -> np.ndarray:
        """Drop expired requests, run the rest, and post every answer to the loop in one call;
        returns the buffer for the next batch.

        One request's values can make the model fail for its whole batch (an index out of
        range, a shape computed from the input): then the batch's halves run again, down to
        single requests, so that only the requests that fail on their own get the error.
        """
        now = loop.time()
        live: list[Pending] = []
        expired: list[Pending] = []
        for pending in batch:
            if pending.future.done():  # cancelled by its client while the window was open
                continue
            if pending.deadline is not None and pending.deadline <= now:
                expired.append(pending)
                continue
            pending.started = now
            live.append(pending)
        if self._metrics is not None:
            for pending in live:
                self._metrics.queued(self.name, now - pending.enqueued)
        results: list[_Result] = []
        groups = [live] if live else []
        while groups:
            group = groups.pop()
            result, failure, buffer = self._compute(group, buffer)
            if failure is not None and len(group) > 1:
                half = len(group) // 2
                groups += [group[half:], group[:half]]
                continue
            if failure is not None:
                result = (group, None, self._failed(group[0], failure), 0.0, 0.0)
            results.append(result)
        if not expired and not results:  # every request was withdrawn: nothing to answer
            return buffer
        # RuntimeError: the loop is closed, so nobody waits for these answers any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._answer, expired, results)
        return buffer

    def _compute(
        self, group: list[Pending], buffer: np.ndarray
    ) -> tuple[_Result, Exception | None, np.ndarray]:
        """Collate ``group`` into ``buffer`` (grown if needed) and run it. Returns its result,
        the ONNX Runtime error when the model failed on these inputs (the result is then
        unset), and the buffer."""
        collating = time.perf_counter()
        rows = sum(len(p.rows) for p in group)
        size = self.runtime.batch_size(rows)
        if len(group) == 1 and size == rows:
            inputs = group[0].rows
        else:
            if len(buffer) < size:
                buffer = np.empty((size, *buffer.shape[1:]), dtype=np.float32)
            inputs = buffer[:size]
            np.concatenate([p.rows for p in group], out=inputs[:rows])
            inputs[rows:] = 0
        started = time.perf_counter()
        collate_s = started - collating
        logits: np.ndarray | None = None
        error: ServeError | None = None
        try:
            logits = self.runtime.run(inputs)
        except ORT_ERRORS as e:
            if not device_failed(e):
                return (group, None, None, 0.0, 0.0), e, buffer
            _log.error("model %s: the device failed on a batch of %d rows: %s",
                       self.name, rows, ort_reason(e))  # fmt: skip
            error = ServeError(
                grpc.StatusCode.INTERNAL,
                f"expected model {self.name} to run on its device, got {ort_reason(e)}; retry "
                "on another replica (the device of this one needs attention)",
            )
        except Exception as e:
            _log.exception("model %s failed on a batch of %d rows", self.name, rows)
            error = ServeError(grpc.StatusCode.INTERNAL, f"model {self.name} failed: {e}")
        seconds = time.perf_counter() - started
        if logits is not None and logits.shape[0] != size:
            error = ServeError(
                grpc.StatusCode.INTERNAL,
                f"expected {size} output rows from model {self.name}, got {logits.shape[0]}",
            )
        if error is None and self._metrics is not None:
            self._metrics.batch(self.name, rows, seconds, collate_s)
        return (group, logits, error, seconds, collate_s), None, buffer

    def _failed(self, pending: Pending, error: Exception) -> ServeError:
        """The status of one request the model failed on when run alone."""
        reason = f"{type(error).__name__}: {ort_reason(error)}"
        _log.warning("model %s failed on a request of %d rows: %s",
                     self.name, len(pending.rows), reason)  # fmt: skip
        if out_of_memory(error):
            return ServeError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"expected memory to run model {self.name} on {len(pending.rows)} rows, got "
                f"{reason}; retry with backoff or send fewer rows",
            )
        # Warm-up ran every batch size, so what the model refuses here is these values.
        return ServeError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"expected input values model {self.name} can compute, got ONNX Runtime failing on "
            f"this request's rows ({reason}); check the values sent",
        )

    def _answer(self, expired: list[Pending], results: list[_Result]) -> None:
        """On the loop: set every future of one batch."""
        for pending in expired:
            if not pending.future.done():
                waited = pending.future.get_loop().time() - pending.enqueued
                pending.future.set_exception(
                    ServeError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"expected to start before the deadline, got {waited:.3f} s queued "
                        f"for model {self.name}; raise the client deadline or add capacity",
                    )
                )
        for live, logits, error, seconds, collate_s in results:
            if error is not None or logits is None:
                _fail(live, error or ServeError(grpc.StatusCode.INTERNAL, "no output"))
                continue
            self.batch_rows[sum(len(p.rows) for p in live)] += 1
            offset = 0
            for pending in live:
                count = len(pending.rows)
                if not pending.future.done():
                    pending.compute_s = seconds
                    pending.collate_s = collate_s
                    pending.future.set_result(logits[offset : offset + count])
                offset += count


def batches_running() -> bool:
    """True while an instance thread of this process is still running a batch that a
    ``Batcher.close`` stopped waiting for. ONNX Runtime aborts the process at exit
    ("terminate called without an active exception") while one of its runs is in progress,
    so a process ending then must end with ``os._exit``."""
    return any(
        thread.name.startswith(_THREAD_PREFIX) and thread.is_alive()
        for thread in threading.enumerate()
    )


def _joined(pieces: list[asyncio.Future], loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """One future of the pieces' logits in order; cancelling it cancels the pieces."""
    joined: asyncio.Future[np.ndarray] = loop.create_future()
    left = len(pieces)

    def piece_done(piece: asyncio.Future) -> None:
        nonlocal left
        left -= 1
        if joined.done():
            return
        if piece.cancelled():
            joined.cancel()  # joined_done cancels the other pieces
        elif piece.exception() is not None:
            joined.set_exception(piece.exception())
            for other in pieces:
                other.cancel()
        elif left == 0:
            joined.set_result(np.concatenate([p.result() for p in pieces]))

    def joined_done(_: asyncio.Future) -> None:
        if joined.cancelled():
            for piece in pieces:
                piece.cancel()

    for piece in pieces:
        piece.add_done_callback(piece_done)
    joined.add_done_callback(joined_done)
    return joined


def _fail(pending: list[Pending], error: Exception) -> None:
    for item in pending:
        if not item.future.done():
            item.future.set_exception(error)
