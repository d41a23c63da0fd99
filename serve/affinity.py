"""Keep a model instance's thread off the CPUs ONNX Runtime pinned its own pool threads to.

With the default thread count, ONNX Runtime pins each intra-op pool thread to a core of its
own and leaves one core for the thread that calls ``run`` (our instance thread), which it does
not pin. Left floating, the scheduler sometimes puts the caller on a pool thread's core, and
the two then take turns on it while every operator waits for both of them; on 2 shared vCPUs
that cost W1 stream c=64 about 4% (docs/benchmarks.md). So after a session is created, the
server reads which CPUs its new threads were pinned to and pins each instance thread to the
rest. Where nothing was pinned (``--intra-op-threads N``, one core, not Linux), nothing is.
"""

from __future__ import annotations

import logging
import os
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


def cpus_left_by(before: set[int]) -> frozenset[int] | None:
    """The CPUs left free by threads started since ``before`` (see ``caller_cpus``)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = frozenset(os.sched_getaffinity(0))
    masks = [_cpus_of(tid) for tid in thread_ids() - before]
    return caller_cpus(allowed, [m for m in masks if m is not None])


def pin_current_thread(cpus: frozenset[int] | None) -> None:
    """Pin the calling thread to ``cpus``; does nothing for None or where the OS refuses."""
    if cpus is None:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:  # e.g. a cpuset changed under the process: run unpinned
        _log.debug("could not pin thread to CPUs %s: %s", sorted(cpus), e)
