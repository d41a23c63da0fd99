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
from serve import classify
from serve.affinity import caller_cpus, thread_ids
from serve.background import BackgroundServer
from serve.batcher import Batcher
from serve.model_info import read_model_info
from serve.runtime import Runtime

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
