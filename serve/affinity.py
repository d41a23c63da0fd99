"""Keep the server's Python threads off the CPUs ONNX Runtime pinned its pool threads to.

With the default thread count, ONNX Runtime pins each intra-op pool thread to a core of its
own and leaves one core for the thread that calls ``run`` (our instance thread), which it does
not pin. Left floating, the scheduler sometimes puts the caller, or the event loop, on a pool
thread's core; the two then take turns on it while every operator waits for both. So after a
session is created, the server reads which CPUs its new threads pinned themselves to, and
pins the instance threads and the event loop (whose Python runs one thread at a time anyway,
under the GIL) to the rest. On 2 shared vCPUs that bought W1 stream c=64 about 10%
(docs/benchmarks.md). Where ORT pinned nothing (``--intra-op-threads N``, one core, not
Linux), nothing is pinned.

ONNX Runtime's default thread count is one per physical core of the whole machine, whatever
the process's cpuset or cgroup CPU quota: in a container given 2 CPUs of a 32-core node that is
31 pool threads waiting for each other at every operator. ``thread_plan`` reads what the process
may use and, where that is less than the machine, gives ORT a count (and, for a cpuset, the
cores to pin its pool threads to, as its own default would) instead."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxruntime import SessionOptions

_log = logging.getLogger(__name__)
_TASKS = Path("/proc/self/task")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


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


@dataclass(frozen=True)
class ThreadPlan:
    """ONNX Runtime's intra-op thread count for a session, when its own default would not fit.

    ``threads`` 0 means ORT's default; ``affinities`` is the value of the session option
    ``session.intra_op_thread_affinities`` (None: ORT pins nothing); ``why`` names the limit.
    """

    threads: int = 0
    affinities: str | None = None
    why: str = ""

    @property
    def pins(self) -> bool:
        """Whether ONNX Runtime pins its pool threads under this plan: with its own default,
        or with the affinities given here."""
        return not self.threads or self.affinities is not None

    def apply(self, options: SessionOptions) -> None:
        """Set this plan on ONNX Runtime session ``options``."""
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.affinities:
            options.add_session_config_entry("session.intra_op_thread_affinities", self.affinities)


def plan_threads(
    allowed: frozenset[int],
    online: int,
    cores: dict[int, frozenset[int]],
    quota: float | None,
) -> ThreadPlan:
    """The intra-op plan for a process that may run on ``allowed`` of ``online`` CPUs, under a
    CPU ``quota`` (CPUs' worth of time, None: none), where ``cores`` maps a CPU to the CPUs
    of its physical core, itself included (CPUs missing from it count as cores of their own).

    ORT's default (one thread per physical core of the machine) is kept when every CPU is
    allowed and the quota, if any, covers every core. Otherwise one thread per allowed core,
    at most the quota (rounded down, at least 1); with a cpuset the pool threads are pinned to
    allowed cores other than the first, which is left to the caller, as ORT's default does.
    """
    by_core: dict[frozenset[int], list[int]] = {}
    for cpu in sorted(allowed):
        by_core.setdefault(cores.get(cpu, frozenset({cpu})), []).append(cpu)
    machine_cores = len(set(cores.values())) if len(cores) >= online else online
    restricted = len(allowed) < online
    if not restricted and (quota is None or quota >= machine_cores):
        return ThreadPlan()
    threads = len(by_core)
    if quota is not None:
        threads = max(1, min(threads, math.floor(quota)))
    limits = []
    if restricted:
        cpus = _ranges(allowed)
        limits.append(f"the process's CPU affinity allows {len(allowed)} of {online} CPUs ({cpus})")
    if quota is not None:
        limits.append(f"the process's cgroup allows {quota:g} CPUs' time")
    why = " and ".join(limits)
    if not restricted or threads < 2:
        return ThreadPlan(threads, None, why)
    # ORT numbers logical processors from 1; one ';'-separated entry per pool thread.
    pool = list(by_core.values())[1:threads]
    return ThreadPlan(threads, ";".join(",".join(str(c + 1) for c in group) for group in pool), why)


def thread_plan() -> ThreadPlan:
    """``plan_threads`` for this process (Linux); ORT's default where the OS does not say."""
    allowed = current_cpus()
    online = os.cpu_count()
    if allowed is None or not online:
        return ThreadPlan()
    return plan_threads(allowed, online, cpu_cores(), cgroup_cpu_quota())


def worker_count(
    allowed: frozenset[int] | None, online: int | None, quota: float | None, cap: int = 32
) -> int:
    """How many threads of CPU-bound work (image decoding) a process can keep busy: one per
    CPU it may run on (``allowed``, else the ``online`` count), at most its cgroup ``quota``
    rounded down, at most ``cap``, at least 1."""
    count = len(allowed) if allowed else online or 1
    if quota is not None:
        count = min(count, math.floor(quota))
    return max(1, min(count, cap))


def cpu_cores(topology: Path = _CPU_TOPOLOGY) -> dict[int, frozenset[int]]:
    """Each online CPU's core, as the CPUs sharing it (sysfs ``thread_siblings_list``: unlike
    ``core_id``, unique across packages and dies); empty where it cannot be read."""
    cores: dict[int, frozenset[int]] = {}
    try:
        for entry in topology.glob("cpu[0-9]*/topology"):
            siblings = _parse_ranges((entry / "thread_siblings_list").read_text())
            cores[int(entry.parent.name[3:])] = siblings
    except (OSError, ValueError):
        return {}
    return cores


def _parse_ranges(text: str) -> frozenset[int]:
    """'0-2,5' -> {0, 1, 2, 5} (the notation of sysfs CPU lists, taskset and cpuset.cpus)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def cgroup_cpu_quota(root: Path = _CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The CPU time this process's cgroup (and its ancestors) allows, in CPUs, or None.

    cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") and v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (-1: none); the smallest along the path to the root counts.
    ``membership`` is ``/proc/self/cgroup``'s text (read when None).
    """
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    quotas: list[float] = []
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            quotas += _quotas_along(root, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                if (root / mount).is_dir():
                    quotas += _quotas_along(root / mount, path, _v1_quota)
                    break
    return min(quotas, default=None)


def _quotas_along(
    mount: Path, path: str, read: Callable[[Path], float | None]
) -> list[float]:
    parts = [part for part in path.split("/") if part and part != ".."]
    found = []
    for depth in range(len(parts), -1, -1):
        quota = read(mount.joinpath(*parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _ranges(cpus: frozenset[int]) -> str:
    """0,1,2,5 -> '0-2,5' (the notation of taskset and cpuset.cpus)."""
    spans: list[list[int]] = []
    for cpu in sorted(cpus):
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
