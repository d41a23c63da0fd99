"""Per-model totals for Triton's ``ModelStatistics`` RPC (what ``tritonclient``'s
``get_inference_statistics`` and ``perf_analyzer``'s server-side numbers read).

The same events feed the Prometheus metrics (``serve.metrics``); these are plain cumulative
counts and nanosecond sums, as Triton reports them:

- ``success`` / ``fail``: finished requests and their time from arrival to answer; as in
  Triton, ``fail`` leaves out requests refused before they reached the model (a wrong version,
  a missing token, a server not taking requests: ``serve.metrics``);
- ``queue``, ``compute_input``, ``compute_infer``, ``compute_output``: per answered request
  (counted when its logits are ready, so the counts follow ``success``, but for an answer
  then refused as above the message size limit, a ``fail``), its time from enqueue
  to its batch's start and that batch's collate, ONNX Runtime and output times (output: 0,
  the rows are views of the batch's output; encoding each answer happens on the event loop,
  inside ``success``). A request split above the max batch counts once: its longest piece's
  wait (the pieces wait side by side) and the sums of their batches' times;
- ``inference_count``: rows computed; ``execution_count``: batches run; ``batch_stats``: the
  compute times per batch size; ``last_inference``: milliseconds since the epoch.

The per-request totals are written by the event loop's thread only, so they take no lock
(a request costs a few additions); the per-batch ones by the instance threads, under a lock.
A snapshot read meanwhile may be one request or one batch apart between fields.
"""

from __future__ import annotations

import threading
import time

from protos import kserve_pb2 as pb
from serve.state import VERSION


def _duration(count: int, seconds: float) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=count, ns=round(seconds * 1e9))


class Tally:
    """One model's running totals, in seconds; ``snapshot()`` gives them as Triton reports
    them."""

    def __init__(self) -> None:
        # Event loop thread only.
        self._succeeded = self._failed = self._served = 0
        self._success_s = self._fail_s = 0.0
        self._queue_s = self._collate_s = self._compute_s = 0.0
        # Instance threads, under the lock: rows, batches, last batch's end, and per batch
        # size [batches, collate seconds, compute seconds].
        self._lock = threading.Lock()
        self._rows = self._batches = self._last_ms = 0
        self._sizes: dict[int, list[float]] = {}

    def request(self, succeeded: bool, seconds: float) -> None:
        """One finished request and its time from arrival to answer (event loop thread)."""
        if succeeded:
            self._succeeded += 1
            self._success_s += seconds
        else:
            self._failed += 1
            self._fail_s += seconds

    def served(self, queue_s: float, collate_s: float, compute_s: float) -> None:
        """One answered request: its wait in the queue and its batches' collate and compute
        times, summed over its pieces when it was split (event loop thread)."""
        self._served += 1
        self._queue_s += queue_s
        self._collate_s += collate_s
        self._compute_s += compute_s

    def batch(self, rows: int, collate_s: float, compute_s: float) -> None:
        """One executed batch of ``rows`` rows (an instance thread)."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            self._rows += rows
            self._batches += 1
            self._last_ms = now_ms
            size = self._sizes.setdefault(rows, [0, 0.0, 0.0])
            size[0] += 1
            size[1] += collate_s
            size[2] += compute_s

    def snapshot(self, name: str) -> pb.ModelStatistics:
        """The totals of model ``name`` as Triton's ModelStatistics message."""
        with self._lock:
            rows, batches, last_ms = self._rows, self._batches, self._last_ms
            sizes = sorted((size, tuple(totals)) for size, totals in self._sizes.items())
        served = self._served
        return pb.ModelStatistics(
            name=name,
            version=VERSION,
            last_inference=last_ms,
            inference_count=rows,
            execution_count=batches,
            inference_stats=pb.InferStatistics(
                success=_duration(self._succeeded, self._success_s),
                fail=_duration(self._failed, self._fail_s),
                queue=_duration(served, self._queue_s),
                compute_input=_duration(served, self._collate_s),
                compute_infer=_duration(served, self._compute_s),
                compute_output=_duration(served, 0.0),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=_duration(int(n), collate),
                    compute_infer=_duration(int(n), compute),
                    compute_output=_duration(int(n), 0.0),
                )
                for size, (n, collate, compute) in sizes
            ],
        )
