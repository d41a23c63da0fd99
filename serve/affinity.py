"""Keep the server's Python threads off the CPUs ONNX Runtime pinned its pool threads to.

With the default thread count, ONNX Runtime pins each intra-op pool thread to a core of its
own and leaves one core for the thread that calls ``run`` (our instance thread), which it does
not pin. Left floating, the scheduler sometimes puts the caller, or the event loop, on a pool
thread's core; the two then take turns on it while every operator waits for both. So after a
session is created, the server reads which CPUs its new threads pinned themselves to, and
pins the instance threads and the event loop (whose Python runs one thread at a time anyway,
under the GIL) to the rest. On 2 shared vCPUs that bought W1 stream c=64 about 10%
(docs/benchmarks.md). Where ORT pinned nothing (``--intra-op-threads N``, one core, not
Linux), nothing is pinned."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

_log = logging.getLogger(__name__)
_TASKS = Path("/proc/self/task")


def thread_ids() -> set[int]:
    """This process's thread ids (Linux), empty where they cannot be listed."""
    try:
        return {int(entry.name) for entry in _TASKS.iterdir()}
    except (OSError, ValueError):
        return set()


def _cpus_of(tid: int) -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(tid))
    except OSError:  # the thread ended meanwhile
        return None


def caller_cpus(allowed: frozenset[int], pinned: list[frozenset[int]]) -> frozenset[int] | None:
    """The ``allowed`` CPUs no pinned thread uses, or None when there is nothing to do.

    ``pinned`` holds the CPU sets of new threads; only sets narrower than ``allowed`` count as
    pinned. None when no thread was pinned or the pinned ones cover every allowed CPU.
    """
    taken = frozenset().union(*(cpus for cpus in pinned if cpus < allowed))
    rest = allowed - taken
    return rest if taken and rest else None


def cpus_left_by(
    before: set[int], settle_s: float = 0.05, timeout_s: float = 1.0
) -> frozenset[int] | None:
    """The CPUs left free by threads started since ``before`` (see ``caller_cpus``).

    ONNX Runtime's pool threads pin themselves once running, which can be a moment after the
    session exists: this waits until every new thread is pinned, or, once some are, for
    ``settle_s`` (another thread may have started meanwhile), or at most ``timeout_s``.
    """
    allowed = current_cpus()
    new = thread_ids() - before
    if allowed is None or not new:
        return None
    started = time.monotonic()
    while True:
        masks = [m for m in map(_cpus_of, new) if m is not None]
        pinned = [m for m in masks if m < allowed]
        waited = time.monotonic() - started
        if len(pinned) == len(masks) or (pinned and waited >= settle_s) or waited >= timeout_s:
            return caller_cpus(allowed, pinned)
        time.sleep(0.001)


def current_cpus() -> frozenset[int] | None:
    """The calling thread's CPUs, None where the OS does not say."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return frozenset(os.sched_getaffinity(0))


def pin_current_thread(cpus: frozenset[int] | None) -> None:
    """Pin the calling thread to ``cpus``; does nothing for None or where the OS refuses."""
    if cpus is None:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:  # e.g. a cpuset changed under the process: run unpinned
        _log.debug("could not pin thread to CPUs %s: %s", sorted(cpus), e)
