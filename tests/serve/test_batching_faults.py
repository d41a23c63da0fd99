"""A request whose values make ONNX Runtime fail, batched with good ones, on a real server.

The model gathers a row of a 10-row table at the index its first input column holds: any
other value fails the whole run. Validation cannot see that, so the batcher must keep the
failure to the requests that cause it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc import aio
from onnx import TensorProto, helper, numpy_helper

from protos import classifier_pb2 as cpb
from protos import kserve_pb2 as pb
from serve.background import BackgroundServer
from tests.serve.conftest import reference
from tests.serve.v2 import INFER, infer_payload, reply_logits

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
CLASSIFY = "/classifier.v1.Classifier/Classify"
TABLE_ROWS = 10


def _gather_model(path: Path, classes: int = 5) -> Path:
    """Input [batch, 4]; logits = table[int(input[:, 0])] + input @ w."""
    rng = np.random.default_rng(0)
    initializers = {
        "table": rng.normal(size=(TABLE_ROWS, classes)).astype(np.float32),
        "w": rng.normal(size=(4, classes)).astype(np.float32),
        "start": np.array([0], np.int64),
        "end": np.array([1], np.int64),
        "axis": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("Slice", ["input", "start", "end", "axis"], ["column"]),
        helper.make_node("Cast", ["column"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["picked"], axis=0),
        helper.make_node("Squeeze", ["picked", "axis"], ["bias"]),
        helper.make_node("MatMul", ["input", "w"], ["product"]),
        helper.make_node("Add", ["bias", "product"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gather",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _rows(n: int, seed: int, bad_row: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, 4)).astype(np.float32)
    rows[:, 0] = rng.integers(0, TABLE_ROWS, n)
    if bad_row is not None:
        rows[bad_row, 0] = 55  # out of the table: Gather fails
    return rows


async def _unary(channel: aio.Channel, rows: np.ndarray, request_id: str) -> object:
    try:
        return await channel.unary_unary(INFER)(
            infer_payload("gather", rows, request_id), timeout=60
        )
    except aio.AioRpcError as e:
        return e.code(), e.details()


async def _classify(channel: aio.Channel, rows: np.ndarray) -> object:
    request = cpb.ClassifyRequest(model="gather", top_k=1)
    for row in rows:
        request.images.add().tensor.CopyFrom(cpb.Tensor(shape=[4], data=row.tobytes()))
    try:
        reply = await channel.unary_unary(CLASSIFY)(request.SerializeToString(), timeout=60)
    except aio.AioRpcError as e:
        return e.code(), e.details()
    return cpb.ClassifyResponse.FromString(reply)


async def _stream(channel: aio.Channel, requests: list[tuple[str, np.ndarray]]) -> dict:
    call = channel.stream_stream(STREAM)(timeout=60)
    for request_id, rows in requests:
        await call.write(infer_payload("gather", rows, request_id))
    await call.done_writing()
    answers = {}
    while (message := await call.read()) is not aio.EOF:
        answer = pb.ModelStreamInferResponse.FromString(message)
        answers[answer.infer_response.id] = answer
    assert await call.code() == grpc.StatusCode.OK
    return answers


@pytest.fixture
def gather_path(tmp_path: Path) -> Path:
    return _gather_model(tmp_path / "gather.onnx")


def _assert_refused(outcome: object) -> None:
    assert isinstance(outcome, tuple), "a request the model fails on was answered"
    code, details = outcome
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "check the values sent" in details and "idx=55" in details, details


def test_a_request_the_model_fails_on_fails_alone_in_its_batch(
    start_server: Callable[..., BackgroundServer], gather_path: Path
) -> None:
    # One long window: every call below is queued before the batch runs.
    server = start_server(models=(gather_path,), max_batch_size=32, max_queue_delay_us=1_500_000)
    good = [_rows(n, seed) for seed, n in enumerate((1, 3, 2))]
    on_stream = [_rows(2, 10), _rows(1, 11, bad_row=0), _rows(3, 12)]
    tensors = _rows(2, 13)

    async def scenario() -> tuple[list[object], object, object, dict]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            calls = [_unary(channel, rows, f"good{i}") for i, rows in enumerate(good)]
            return await asyncio.gather(
                asyncio.gather(*calls),
                _unary(channel, _rows(2, 9, bad_row=1), "bad"),
                _classify(channel, tensors),
                _stream(channel, [(f"s{i}", rows) for i, rows in enumerate(on_stream)]),
            )

    unary, bad, classified, streamed = asyncio.run(scenario())
    for i, (reply, rows) in enumerate(zip(unary, good, strict=True)):
        assert isinstance(reply, bytes), f"good request {i} got {reply}"
        request_id, logits = reply_logits(reply)
        assert request_id == f"good{i}"
        np.testing.assert_allclose(logits, reference(gather_path, rows), rtol=1e-5, atol=1e-5)
    _assert_refused(bad)
    assert isinstance(classified, cpb.ClassifyResponse), classified
    best = reference(gather_path, tensors).argmax(axis=1)
    assert [r.labels[0].index for r in classified.results] == best.tolist()
    assert streamed["s1"].error_message.startswith("INVALID_ARGUMENT: ")
    for request_id in ("s0", "s2"):
        answer = streamed[request_id]
        assert not answer.error_message, answer.error_message
        _, logits = reply_logits(answer.infer_response.SerializeToString())
        rows = on_stream[int(request_id[1])]
        np.testing.assert_allclose(logits, reference(gather_path, rows), rtol=1e-5, atol=1e-5)
    batches = server.server.models["gather"].batcher.batch_rows
    assert sum(rows * count for rows, count in batches.items()) == 6 + 2 + 5


def test_a_split_request_with_a_failing_piece_fails_and_its_neighbours_do_not(
    start_server: Callable[..., BackgroundServer], gather_path: Path
) -> None:
    server = start_server(
        models=(gather_path,), max_batch_size=4, instances=2, max_queue_delay_us=500_000
    )
    small = [_rows(1, 20 + i) for i in range(6)]
    big_good = _rows(11, 30)  # three pieces
    big_bad = _rows(11, 31, bad_row=9)  # its third piece fails

    async def scenario() -> list[object]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            calls = [_unary(channel, big_bad, "big_bad"), _unary(channel, big_good, "big_good")]
            calls += [_unary(channel, rows, f"small{i}") for i, rows in enumerate(small)]
            return await asyncio.gather(*calls)

    bad, good, *answers = asyncio.run(scenario())
    _assert_refused(bad)
    for reply, rows in zip([good, *answers], [big_good, *small], strict=True):
        assert isinstance(reply, bytes), reply
        np.testing.assert_allclose(
            reply_logits(reply)[1], reference(gather_path, rows), rtol=1e-5, atol=1e-5
        )
