"""serve/affinity.py: instance threads run on the CPUs ONNX Runtime left free of its pool."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from protos import classifier_pb2, classifier_pb2_grpc
from serve import affinity, classify
from serve.affinity import (
    ThreadPlan,
    caller_cpus,
    cgroup_cpu_quota,
    cpu_cores,
    plan_threads,
    thread_ids,
)
from serve.background import BackgroundServer
from serve.batcher import Batcher
from serve.model_info import read_model_info
from serve.runtime import Runtime
from tests.serve.conftest import free_port
from tests.serve.procs import ServeProcess
from tests.serve.v2 import INFER, infer_payload, reply_logits

ALL = frozenset({0, 1, 2, 3})


@pytest.mark.parametrize(
    ("pinned", "expected"),
    [
        ([], None),  # ORT started no thread (one core, or one thread)
        ([ALL, ALL], None),  # --intra-op-threads N: ORT pins nothing
        ([frozenset({1}), frozenset({2}), frozenset({3})], frozenset({0})),
        ([frozenset({2, 3}), ALL], frozenset({0, 1})),  # an unpinned thread is ignored
        ([frozenset({0, 1}), frozenset({2, 3})], None),  # nothing left: leave the caller be
    ],
    ids=["no-threads", "unpinned", "one-core-left", "mixed", "all-taken"],
)
def test_the_caller_gets_the_cpus_no_pinned_thread_uses(
    pinned: list[frozenset[int]], expected: frozenset[int] | None
) -> None:
    assert caller_cpus(ALL, pinned) == expected


def _affinity(thread: threading.Thread) -> frozenset[int]:
    assert thread.native_id is not None
    return frozenset(os.sched_getaffinity(thread.native_id))


def _instance_cpus(runtime: Runtime) -> list[frozenset[int]]:
    """Start a batcher of two instances, answer one request, and read its threads' CPUs."""

    async def scenario() -> list[frozenset[int]]:
        batcher = Batcher(runtime, max_queue_size=4, max_queue_delay_s=0, instances=2)
        batcher.start()
        try:
            rows = np.zeros((1, *runtime.info.sample_shape), dtype=np.float32)
            await batcher.infer(rows, None)
            return [_affinity(thread) for thread in batcher._threads]
        finally:
            await batcher.close()

    return asyncio.run(scenario())


needs_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least 2 usable CPUs (ONNX Runtime pins its pool only then)",
)


@needs_cpus
def test_instance_threads_leave_the_pool_threads_cores_to_them(classifier_path: Path) -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    before = thread_ids()
    runtime = Runtime(
        read_model_info("tiny", classifier_path),
        device="cpu",
        max_batch_size=4,
        intra_op_threads=0,  # ORT's default: it pins its pool threads, one core each
    )
    pool = [frozenset(os.sched_getaffinity(tid)) for tid in thread_ids() - before]
    pinned = frozenset().union(*(cpus for cpus in pool if cpus < allowed))
    assert pinned, f"expected ONNX Runtime to pin its pool threads, got {pool}"
    assert runtime.caller_cpus == allowed - pinned
    assert _instance_cpus(runtime) == [runtime.caller_cpus] * 2


@needs_cpus
def test_nothing_is_pinned_with_an_explicit_thread_count(classifier_path: Path) -> None:
    runtime = Runtime(
        read_model_info("tiny", classifier_path),
        device="cpu",
        max_batch_size=4,
        intra_op_threads=2,
    )
    assert runtime.caller_cpus is None
    assert _instance_cpus(runtime) == [frozenset(os.sched_getaffinity(0))] * 2


@needs_cpus
def test_the_loop_joins_the_instance_threads_and_decoding_stays_unpinned(
    start_server: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    decoded_on: list[frozenset[int]] = []
    decode = classify.images.decode

    def recording_decode(*args: object) -> np.ndarray:
        decoded_on.append(frozenset(os.sched_getaffinity(0)))
        return decode(*args)

    monkeypatch.setattr(classify.images, "decode", recording_decode)
    bg = start_server(intra_op_threads=0)
    assert bg.server is not None
    caller = bg.server.models["tiny"].batcher.runtime.caller_cpus
    assert caller is not None and caller < allowed
    assert _affinity(bg._thread) == caller

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    request = classifier_pb2.ClassifyRequest(model="tiny")
    request.images.add(encoded=buffer.getvalue())
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        answer = classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    assert len(answer.results) == 1
    assert decoded_on == [allowed]

    bg.stop(0)
    assert _affinity(bg._thread) == allowed


@needs_cpus
def test_the_loop_gets_its_cpus_back_when_a_stop_step_fails(
    start_server: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    bg = start_server(intra_op_threads=0)
    assert bg.server is not None
    assert _affinity(bg._thread) < allowed

    async def failing_close(self: Batcher, timeout: float = 10.0) -> None:
        raise RuntimeError("close failed")

    monkeypatch.setattr(Batcher, "close", failing_close)
    with pytest.raises(RuntimeError, match="close failed"):
        bg.stop(0)
    assert _affinity(bg._thread) == allowed
    monkeypatch.undo()
    bg.call(bg.server.models["tiny"].batcher.close)  # end the instance threads it left


def test_a_server_with_an_explicit_thread_count_pins_nothing(
    start_server: Callable[..., BackgroundServer],
) -> None:
    bg = start_server(intra_op_threads=1)
    assert bg.server is not None
    assert bg.server.models["tiny"].batcher.runtime.caller_cpus is None
    if hasattr(os, "sched_getaffinity"):
        assert _affinity(bg._thread) == frozenset(os.sched_getaffinity(0))


# 8 CPUs: 4 cores of 2 hyperthreads each, CPU n and n + 4 siblings (as Linux numbers them).
SMT = {cpu: frozenset({cpu % 4, cpu % 4 + 4}) for cpu in range(8)}


@pytest.mark.parametrize(
    ("allowed", "quota", "expected"),
    [
        (range(8), None, ThreadPlan()),  # the whole machine: ORT's default
        (range(8), 4.0, ThreadPlan()),  # a quota covering every core: ORT's default
        (range(8), 2.5, ThreadPlan(2, None, "the process's cgroup allows 2.5 CPUs' time")),
        (range(8), 0.5, ThreadPlan(1, None, "the process's cgroup allows 0.5 CPUs' time")),
        (
            {2, 3, 6, 7},  # two cores with both their threads: the pool gets the second core
            None,
            ThreadPlan(2, "4,8", "the process's CPU affinity allows 4 of 8 CPUs (2-3,6-7)"),
        ),
        (
            {0, 1, 2},
            1.0,
            ThreadPlan(
                1,
                None,
                "the process's CPU affinity allows 3 of 8 CPUs (0-2) and "
                "the process's cgroup allows 1 CPUs' time",
            ),
        ),
        ({5}, None, ThreadPlan(1, None, "the process's CPU affinity allows 1 of 8 CPUs (5)")),
    ],
    ids=["machine", "quota-covers", "quota", "quota-below-one", "cpuset", "both", "one-cpu"],
)
def test_onnx_runtime_gets_the_cores_the_process_may_use(
    allowed: range | set[int], quota: float | None, expected: ThreadPlan
) -> None:
    assert plan_threads(frozenset(allowed), 8, SMT, quota) == expected


def test_cpus_without_a_known_core_count_as_cores_of_their_own() -> None:
    assert plan_threads(frozenset({1, 2, 3}), 4, {}, None).threads == 3
    assert plan_threads(frozenset({1, 2, 3}), 4, {}, None).affinities == "3;4"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "max 100000\n")
    _write(tmp_path / "kubepods" / "cpu.max", "400000 100000\n")
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "web").mkdir()  # no cpu.max of its own
    assert cgroup_cpu_quota(tmp_path, "0::/kubepods/pod1/web\n") == 1.5
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path, "0::/kubepods/pod1/web\n") == 4.0
    assert cgroup_cpu_quota(tmp_path, "0::/\n") is None  # the root: "max"


def test_cgroup_v1_quota_is_read_from_the_cpu_controller_mount(tmp_path: Path) -> None:
    mount = tmp_path / "cpu,cpuacct"
    _write(mount / "cpu.cfs_quota_us", "-1\n")
    _write(mount / "cpu.cfs_period_us", "100000\n")
    membership = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cgroup_cpu_quota(tmp_path, membership) is None
    # Inside a container without a cgroup namespace the host's path is not mounted: the
    # mount's own root is the container's cgroup.
    _write(mount / "cpu.cfs_quota_us", "200000\n")
    assert cgroup_cpu_quota(tmp_path, membership) == 2.0
    _write(mount / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    _write(mount / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path, membership) == 0.5


@pytest.mark.parametrize(
    "membership",
    ["", "5:memory:/x\n", "0::/nowhere\n", "garbage without colons\n"],
    ids=["empty", "no-cpu-controller", "missing-files", "garbage"],
)
def test_no_readable_quota_means_none(tmp_path: Path, membership: str) -> None:
    assert cgroup_cpu_quota(tmp_path, membership) is None


def test_cpu_cores_reads_the_cpus_sharing_each_core(tmp_path: Path) -> None:
    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3", 4: "4-5", 5: "4-5", 6: "6"}
    for cpu, text in siblings.items():
        _write(tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list", f"{text}\n")
    (tmp_path / "cpufreq").mkdir()  # not a CPU
    cores = cpu_cores(tmp_path)
    assert cores[0] == cores[2] == frozenset({0, 2}) and cores[5] == frozenset({4, 5})
    assert cores[6] == frozenset({6}) and len(cores) == 7
    assert plan_threads(frozenset(range(7)), 7, cores, None) == ThreadPlan()
    assert plan_threads(frozenset({0, 1, 2, 3}), 7, cores, None).affinities == "2,4"
    (tmp_path / "cpu3" / "topology" / "thread_siblings_list").write_text("?\n")
    assert cpu_cores(tmp_path) == {}


@needs_cpus
def test_a_planned_pool_is_pinned_and_the_caller_gets_the_rest(
    classifier_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if this process's cpuset were two of four CPUs: the plan pins ORT's one pool thread
    # to the second allowed CPU, and the instance threads get the first.
    first, second = sorted(os.sched_getaffinity(0))[:2]
    plan = plan_threads(frozenset({first, second}), 4, {}, None)
    assert plan.threads == 2 and plan.affinities == str(second + 1)
    monkeypatch.setattr(affinity, "thread_plan", lambda: plan)
    before = thread_ids()
    runtime = Runtime(
        read_model_info("tiny", classifier_path), device="cpu", max_batch_size=4, intra_op_threads=0
    )
    pool = [frozenset(os.sched_getaffinity(tid)) for tid in thread_ids() - before]
    assert pool == [frozenset({second})]
    allowed = frozenset(os.sched_getaffinity(0))
    assert runtime.caller_cpus == allowed - {second}


@needs_cpus
def test_a_server_limited_to_one_cpu_runs_one_intra_op_thread_on_it(
    classifier_path: Path, tmp_path: Path, reference: Callable[[Path, np.ndarray], np.ndarray]
) -> None:
    """ONNX Runtime alone starts a pool thread per core of the machine and pins it outside
    the process's CPUs (seen under taskset); the server gives it the CPUs it has."""
    cpu = min(os.sched_getaffinity(0))  # ORT pins its pool from the second core on
    port = free_port()
    args = [str(classifier_path), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--device", "cpu"]  # fmt: skip
    with ServeProcess(args, port, tmp_path / "serve.log", cpus={cpu}) as server:
        assert server.proc is not None
        tasks = Path(f"/proc/{server.proc.pid}/task")
        cpus = {frozenset(os.sched_getaffinity(int(task.name))) for task in tasks.iterdir()}
        with grpc.insecure_channel(server.target) as channel:
            rows = np.ones((1, 3, 8, 8), dtype=np.float32)
            reply = channel.unary_unary(INFER)(infer_payload("tiny", rows), timeout=30)
        log = server.output()
    assert cpus == {frozenset({cpu})}, log
    np.testing.assert_allclose(reply_logits(reply)[1], reference(classifier_path, rows), rtol=1e-4)
    assert "1 ONNX Runtime intra-op thread, as the process's CPU affinity allows 1 of" in log


def test_a_quota_only_plan_pins_nothing_and_waits_for_no_pinning(
    classifier_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An explicit count without affinities: ORT pins no pool thread, so looking for pinned
    # threads would only wait out cpus_left_by's timeout (a second per model).
    plan = plan_threads(frozenset(range(8)), 8, SMT, 2.0)
    assert plan == ThreadPlan(2, None, "the process's cgroup allows 2 CPUs' time")
    monkeypatch.setattr(affinity, "thread_plan", lambda: plan)

    def no_pinning_expected(*args: object, **kwargs: object) -> None:
        raise AssertionError("cpus_left_by called for a plan that pins nothing")

    monkeypatch.setattr(affinity, "cpus_left_by", no_pinning_expected)
    runtime = Runtime(
        read_model_info("tiny", classifier_path), device="cpu", max_batch_size=4, intra_op_threads=0
    )
    assert runtime.caller_cpus is None


@pytest.mark.parametrize(
    ("allowed", "online", "quota", "expected"),
    [
        (frozenset({0, 1}), 2, None, 2),
        (frozenset(range(96)), 96, 2.0, 2),  # a pod limited to 2 CPUs on a 96-CPU node
        (frozenset(range(96)), 96, None, 32),  # never more than the executor's old cap
        (frozenset({3}), 96, 1.5, 1),
        (frozenset(range(8)), 8, 0.5, 1),
        (None, 4, None, 4),  # where the OS gives no affinity
        (None, None, None, 1),
    ],
)
def test_decode_workers_follow_the_cpus_and_the_quota(
    allowed: frozenset[int] | None, online: int | None, quota: float | None, expected: int
) -> None:
    assert affinity.worker_count(allowed, online, quota) == expected
