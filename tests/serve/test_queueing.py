"""Batch windows, deadlines, cancellation, a full queue and message limits, on real servers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from protos import kserve_pb2
from serve.background import BackgroundServer
from tests.serve.test_drain import _spinning_model

Reference = Callable[[Path, np.ndarray], np.ndarray]
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _stub(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        INFER,
        request_serializer=kserve_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=kserve_pb2.ModelInferResponse.FromString,
    )


def _request(x: np.ndarray, model: str = "tiny") -> kserve_pb2.ModelInferRequest:
    request = kserve_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request


def _logits(response: kserve_pb2.ModelInferResponse) -> np.ndarray:
    shape = response.outputs[0].shape
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


def test_a_bad_request_in_a_batch_window_harms_no_good_one(
    start_server: Callable[..., BackgroundServer], classifier_path: Path, reference: Reference
) -> None:
    server = start_server(max_queue_delay_us=2_000_000)
    good = [_rows(1, 1), _rows(2, 2), _rows(1, 3)]
    bad = [_rows(1, 4)[:, :, :, :7], np.zeros((0, 3, 8, 8), np.float32)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = _stub(channel)
        calls = [infer.future(_request(good[0]), timeout=60)]
        calls += [infer.future(_request(x), timeout=60) for x in bad]
        calls += [infer.future(_request(x), timeout=60) for x in good[1:]]
        bad_calls = calls[1:3]
        good_calls = [calls[0], *calls[3:]]
        for call in bad_calls:
            with pytest.raises(grpc.RpcError) as caught:
                call.result()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for call, x in zip(good_calls, good, strict=True):
            np.testing.assert_allclose(
                _logits(call.result()), reference(classifier_path, x), atol=1e-5
            )
    batches = server.server.models["tiny"].batcher.batch_rows
    assert sum(rows * count for rows, count in batches.items()) == 4
    assert max(batches) > 1  # the good requests shared a batch


def test_instances_share_one_batch_window_instead_of_splitting_it(
    start_server: Callable[..., BackgroundServer], classifier_path: Path, reference: Reference
) -> None:
    # Two idle instances used to wait side by side, each taking some of the window's
    # requests: two half batches, both after the whole delay. A full batch of 8 rows runs at
    # once, so the long window costs nothing; it only has to outlast eight arrivals 50 ms
    # apart on a loaded machine.
    server = start_server(instances=2, max_queue_delay_us=10_000_000)
    inputs = [_rows(1, 40 + i) for i in range(16)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = _stub(channel)
        for window in (inputs[:8], inputs[8:]):
            calls = []
            for x in window:  # one by one, as separate clients arrive
                calls.append(infer.future(_request(x), timeout=60))
                time.sleep(0.05)
            for call, x in zip(calls, window, strict=True):
                np.testing.assert_allclose(
                    _logits(call.result()), reference(classifier_path, x), atol=1e-5
                )
    assert server.server.models["tiny"].batcher.batch_rows == {8: 2}


def test_the_request_that_overflows_a_window_runs_on_the_next_free_instance(
    start_server: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    # 3 + 3 rows overflow a batch of 4. The second request was held by the instance that ran
    # the first while the other one, holding the collect lock, waited on the empty queue: it
    # was answered DEADLINE_EXCEEDED after its whole deadline. The first batch spins a while,
    # so that the other instance is surely waiting on the queue when it ends.
    model = _spinning_model(tmp_path / "spin.onnx")
    server = start_server(
        models=(model,), instances=2, max_batch_size=4, max_queue_delay_us=1_000_000
    )
    rng = np.random.default_rng(60)
    inputs = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(2)]
    inputs[0][0, 0] = 300_000  # Loop steps of about a microsecond
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = _stub(channel)
        calls = [infer.future(_request(x, "spin"), timeout=15) for x in inputs]
        for call, x in zip(calls, inputs, strict=True):
            logits = _logits(call.result())
            np.testing.assert_allclose(logits, np.repeat(x.sum(1, keepdims=True), 3, 1))
    assert server.server.models["spin"].batcher.batch_rows == {3: 2}


def test_deadline_passing_while_queued_is_dropped_before_compute(
    start_server: Callable[..., BackgroundServer], classifier_path: Path, reference: Reference
) -> None:
    server = start_server(max_queue_delay_us=1_500_000)
    x = _rows(1, 5)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = _stub(channel)
        patient = infer.future(_request(x), timeout=60)
        hasty = infer.future(_request(_rows(3, 6)), timeout=0.3)
        with pytest.raises(grpc.RpcError) as caught:
            hasty.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        np.testing.assert_allclose(
            _logits(patient.result()), reference(classifier_path, x), atol=1e-5
        )
    assert server.server.models["tiny"].batcher.batch_rows == {1: 1}  # the 3 rows never ran


def _wait_in_flight(server: BackgroundServer, count: int) -> None:
    """Wait (up to 30 s) until ``count`` requests are in flight in ``server``."""
    assert server.server is not None
    state = server.server.state
    until = time.monotonic() + 30
    while state.in_flight != count and time.monotonic() < until:
        time.sleep(0.01)
    assert state.in_flight == count


def test_a_cancelled_request_is_dropped_and_others_answered(
    start_server: Callable[..., BackgroundServer], classifier_path: Path, reference: Reference
) -> None:
    server = start_server(max_queue_delay_us=1_500_000)
    x = _rows(2, 7)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = _stub(channel)
        kept = infer.future(_request(x), timeout=60)
        dropped = infer.future(_request(_rows(4, 8)), timeout=60)
        _wait_in_flight(server, 2)  # both queued in the open batch window
        assert dropped.cancel()
        np.testing.assert_allclose(_logits(kept.result()), reference(classifier_path, x), atol=1e-5)
    assert server.server.models["tiny"].batcher.batch_rows == {2: 1}


def _slow_classifier(path: Path, layers: int = 40) -> Path:
    """Input [batch, 256, 256]; every layer is a 256³ MatMul per row, so batches take a while."""
    rng = np.random.default_rng(0)
    inits, nodes, current = [], [], "input"
    for i in range(layers):
        inits.append(
            numpy_helper.from_array(rng.normal(0, 0.06, (256, 256)).astype(np.float32), f"w{i}")
        )
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        current = f"t{i}"
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (256, 4)).astype(np.float32), "head"))
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"))
    nodes.append(helper.make_node("ReduceMean", [current, "axis"], ["pooled"], keepdims=0))
    nodes.append(helper.make_node("MatMul", ["pooled", "head"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 256, 256])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_a_full_queue_answers_resource_exhausted(
    start_server: Callable[..., BackgroundServer], tmp_path: Path, reference: Reference
) -> None:
    slow = _slow_classifier(tmp_path / "slow.onnx")
    server = start_server(models=(slow,), max_batch_size=1, max_queue_size=2)
    inputs = [
        np.random.default_rng(i).normal(size=(1, 256, 256)).astype(np.float32) for i in range(16)
    ]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = _stub(channel)
        calls = [infer.future(_request(x, "slow"), timeout=120) for x in inputs]
        answered, rejected = 0, 0
        for call, x in zip(calls, inputs, strict=True):
            try:
                got = _logits(call.result())
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert "--max-queue-size" in e.details()
                rejected += 1
            else:
                np.testing.assert_allclose(got, reference(slow, x), atol=1e-4)
                answered += 1
    assert answered >= 1 and rejected >= 1
    assert server.server.models["slow"].batcher.depth == 0


def test_messages_above_the_limit_are_refused(
    start_server: Callable[..., BackgroundServer], classifier_path: Path, reference: Reference
) -> None:
    server = start_server(max_message_bytes=64 * 1024)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = _stub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            infer(_request(_rows(200, 9)), timeout=30)  # 150 KiB of floats
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        x = _rows(4, 10)
        np.testing.assert_allclose(
            _logits(infer(_request(x), timeout=30)), reference(classifier_path, x), atol=1e-5
        )
