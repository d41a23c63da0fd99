"""Per-model totals for Triton's ``ModelStatistics`` RPC (what ``tritonclient``'s
``get_inference_statistics`` and ``perf_analyzer``'s server-side numbers read).

The same events feed the Prometheus metrics (``serve.metrics``); these are plain cumulative
counts and nanosecond sums, as Triton reports them:

- ``success`` / ``fail``: finished requests and their time from arrival to answer;
- ``queue``, ``compute_input``, ``compute_infer``, ``compute_output``: per answered request
  (counted when its logits are ready, so the counts follow ``success``), its time from enqueue
  to its batch's start and that batch's collate, ONNX Runtime and output times (output: 0,
  the rows are views of the batch's output; encoding each answer happens on the event loop,
  inside ``success``). A request split above the max batch counts once: its longest piece's
  wait (the pieces wait side by side) and the sums of their batches' times;
- ``inference_count``: rows computed; ``execution_count``: batches run; ``batch_stats``: the
  compute times per batch size; ``last_inference``: milliseconds since the epoch.

Instance threads and the event loop both update a model's tally, so it takes a lock.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """A count and a total in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, count: int, seconds: float) -> None:
        self.count += count
        self.ns += round(seconds * 1e9)


@dataclass
class BatchSize:
    """The compute times of every batch of one size, counted once per batch."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class Snapshot:
    """One model's totals at one moment (see the module docstring)."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchSize] = field(default_factory=dict)


class Tally:
    """One model's running totals; ``snapshot()`` copies them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = Snapshot()

    def request(self, succeeded: bool, seconds: float) -> None:
        """One finished request and its time from arrival to answer."""
        with self._lock:
            (self._totals.success if succeeded else self._totals.fail).add(1, seconds)

    def served(self, queue_s: float, collate_s: float, compute_s: float) -> None:
        """One answered request: its wait in the queue and its batches' collate and compute
        times (the sums over its pieces when it was split)."""
        with self._lock:
            totals = self._totals
            totals.queue.add(1, queue_s)
            totals.compute_input.add(1, collate_s)
            totals.compute_infer.add(1, compute_s)
            totals.compute_output.add(1, 0.0)

    def batch(self, rows: int, collate_s: float, compute_s: float) -> None:
        """One executed batch of ``rows`` rows."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            totals = self._totals
            totals.last_inference_ms = now_ms
            totals.inference_count += rows
            totals.execution_count += 1
            size = totals.batches.setdefault(rows, BatchSize())
            size.compute_input.add(1, collate_s)
            size.compute_infer.add(1, compute_s)
            size.compute_output.add(1, 0.0)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return copy.deepcopy(self._totals)
