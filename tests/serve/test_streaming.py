"""serve/streaming.py: KServe v2 ModelStreamInfer on real servers, raw and through tritonclient.

Pipelined requests batch together and come back matched by id; bad requests get an
``error_message`` on a stream that stays open; a drain ends streams with UNAVAILABLE; a client
cancelling a stream leaves the server serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc import aio

from protos import kserve_pb2 as pb
from serve import streaming
from serve.background import BackgroundServer
from serve.state import ServingState
from tests.serve.conftest import free_port, plant_counting_bug, reference
from tests.serve.procs import ServeProcess
from tests.serve.test_queueing import _slow_classifier
from tests.serve.v2 import INFER, request_counts

Reference = Callable[[Path, np.ndarray], np.ndarray]
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
Answers = list[pb.ModelStreamInferResponse]


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


def _request(
    x: np.ndarray, request_id: str, model: str = "tiny", datatype: str = "FP32", **fields: object
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id, **fields)
    request.inputs.add(name="input", datatype=datatype, shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def _logits(response: pb.ModelInferResponse) -> np.ndarray:
    shape = list(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)


def _serialize(request: pb.ModelInferRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _open(channel: aio.Channel, timeout: float = 60) -> aio.StreamStreamCall:
    """A new ModelStreamInfer call on ``channel``: writes messages (or raw bytes), reads
    ModelStreamInferResponses."""
    return channel.stream_stream(
        STREAM,
        request_serializer=_serialize,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )(timeout=timeout)


async def _rest(call: aio.StreamStreamCall) -> tuple[Answers, grpc.StatusCode, str]:
    """Read ``call`` to its end: the answers still to come, its status and its details."""
    answers: Answers = []
    try:
        while (answer := await call.read()) is not aio.EOF:
            answers.append(answer)
    except grpc.RpcError:
        pass  # a non-OK end; its code and details follow
    return answers, await call.code(), await call.details()


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the in-process server logged at ERROR or above, with the exception's type."""
    return [
        f"{r.name}: {r.getMessage()}" + (f" ({r.exc_info[1]!r})" if r.exc_info else "")
        for r in caplog.records
        if r.levelno >= logging.ERROR
    ]


def _quiet_server(
    start_server: Callable[..., BackgroundServer],
    caplog: pytest.LogCaptureFixture,
    **config: object,
) -> tuple[BackgroundServer, ServingState]:
    """An in-process server with ``config``, and its state; captures its WARNING+ logs."""
    caplog.set_level(logging.WARNING)
    server = start_server(**config)
    assert server.server is not None
    return server, server.server.state


def _check_answer(
    answer: pb.ModelStreamInferResponse, x: np.ndarray, path: Path, reference: Reference
) -> None:
    assert answer.error_message == "", answer.error_message
    assert answer.infer_response.model_name == "tiny"
    assert answer.infer_response.model_version == "1"
    np.testing.assert_allclose(_logits(answer.infer_response), reference(path, x), atol=1e-5)


def test_pipelined_requests_come_back_by_id_and_share_a_batch(
    start_server: Callable[..., BackgroundServer], classifier_path: Path, reference: Reference
) -> None:
    # The batch window stays open 1 s, so everything written at once must land in one batch,
    # and the client's half-close arrives while all three requests are still queued.
    server = start_server(max_queue_delay_us=1_000_000)
    inputs = {"one": _rows(1, 1), "three": _rows(3, 2), "two": _rows(2, 3)}

    async def scenario() -> tuple[Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = _open(channel)
            for ident, x in inputs.items():
                await call.write(_request(x, ident))
            await call.done_writing()
            return await _rest(call)

    answers, code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.OK, details
    assert sorted(a.infer_response.id for a in answers) == sorted(inputs)
    for answer in answers:
        _check_answer(answer, inputs[answer.infer_response.id], classifier_path, reference)
    assert server.server is not None
    assert server.server.models["tiny"].batcher.batch_rows == {6: 1}
    counts = request_counts(server.server.metrics.render().decode())
    assert counts[("tiny", "success")] == 3


def test_requests_on_several_streams_share_a_batch(
    start_server: Callable[..., BackgroundServer], classifier_path: Path, reference: Reference
) -> None:
    server = start_server(max_queue_delay_us=1_000_000)
    inputs = [_rows(2, 4), _rows(3, 5)]

    async def scenario() -> list[tuple[Answers, grpc.StatusCode, str]]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            calls = [_open(channel) for _ in inputs]
            for i, (call, x) in enumerate(zip(calls, inputs, strict=True)):
                await call.write(_request(x, f"s{i}"))
            for call in calls:
                await call.done_writing()
            return [await _rest(call) for call in calls]

    ends = asyncio.run(scenario())
    for i, ((answers, code, details), x) in enumerate(zip(ends, inputs, strict=True)):
        assert code == grpc.StatusCode.OK, details
        assert [a.infer_response.id for a in answers] == [f"s{i}"]
        _check_answer(answers[0], x, classifier_path, reference)
    assert server.server is not None
    assert server.server.models["tiny"].batcher.batch_rows == {5: 1}


def test_an_empty_stream_ends_ok(shared_server: BackgroundServer) -> None:
    async def scenario() -> tuple[Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
            call = _open(channel, timeout=10)
            await call.done_writing()
            return await _rest(call)

    assert asyncio.run(scenario()) == ([], grpc.StatusCode.OK, "")


def test_bad_requests_get_error_messages_and_the_stream_stays_open(
    shared_server: BackgroundServer, classifier_path: Path, reference: Reference
) -> None:
    zeros = np.zeros((2, 3, 8, 8), np.float32)
    doubles = zeros.astype(np.float64)
    probs = pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")
    bad = {
        "wrong-shape": ("INVALID_ARGUMENT", _request(np.zeros((2, 3, 8, 9), np.float32), "")),
        "unknown-model": ("NOT_FOUND", _request(zeros, "", model="nope")),
        "wrong-datatype": ("INVALID_ARGUMENT", _request(doubles, "", "tiny", "FP64")),
        "unknown-version": ("NOT_FOUND", _request(zeros, "", model_version="2")),
        "zero-rows": ("INVALID_ARGUMENT", _request(np.zeros((0, 3, 8, 8), np.float32), "")),
        "wrong-output": ("INVALID_ARGUMENT", _request(zeros, "", outputs=[probs])),
    }  # fmt: skip
    for ident, (_, request) in bad.items():
        request.id = ident
    good = _rows(3, 6)

    async def scenario() -> tuple[Answers, Answers, tuple[Answers, grpc.StatusCode, str]]:
        async with aio.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
            call = _open(channel)
            await call.write(b"\xff\xff\xff\x01not a protobuf")
            garbage = await call.read()
            for _, request in bad.values():
                await call.write(request)
            errors = [garbage] + [await call.read() for _ in bad]
            # Only now, with every error answered, the good request on the same stream.
            await call.write(_request(good, "good"))
            answers = [await call.read()]
            await call.done_writing()
            return errors, answers, await _rest(call)

    errors, answers, (rest, code, details) = asyncio.run(scenario())
    assert all(isinstance(e, pb.ModelStreamInferResponse) for e in errors), errors
    garbage, *errors = errors
    # Bytes that do not parse carry no id to echo, but are refused like any bad request.
    assert garbage.error_message.startswith("INVALID_ARGUMENT: "), garbage
    assert "do not parse" in garbage.error_message
    assert garbage.infer_response.id == ""
    assert sorted(e.infer_response.id for e in errors) == sorted(bad)
    for error in errors:
        ident = error.infer_response.id
        status, request = bad[ident]
        assert error.error_message.startswith(f"{status}: "), (ident, error.error_message)
        assert "expected" in error.error_message, error.error_message
        assert error.infer_response.model_name == request.model_name
        assert not error.infer_response.outputs
    assert [a.infer_response.id for a in answers] == ["good"]
    _check_answer(answers[0], good, classifier_path, reference)
    assert (rest, code) == ([], grpc.StatusCode.OK), details
    assert shared_server.server is not None
    counts = request_counts(shared_server.server.metrics.render().decode())
    assert counts[("tiny", "invalid")] >= 4
    assert counts[("_unknown", "not_found")] >= 1
    assert counts[("_unknown", "invalid")] >= 1  # the bytes that did not parse


def _input(array: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def test_tritonclient_stream_infer_logits_and_classification(
    shared_server: BackgroundServer, classifier_path: Path, reference: Reference
) -> None:
    results: queue.Queue[tuple[tc.InferResult | None, Exception | None]] = queue.Queue()
    client = tc.InferenceServerClient(f"127.0.0.1:{shared_server.port}")
    plain = _rows(11, 7)  # more rows than the max batch (8): split, then joined
    ranked = _rows(4, 8)
    k = 3
    try:
        client.start_stream(
            callback=lambda result, error: results.put((result, error)), stream_timeout=60
        )
        client.async_stream_infer("tiny", [_input(plain)], request_id="plain")
        client.async_stream_infer(
            "tiny",
            [_input(ranked)],
            request_id="ranked",
            outputs=[tc.InferRequestedOutput("logits", class_count=k)],
        )
        client.async_stream_infer("nope", [_input(ranked)], request_id="lost")
        client.stop_stream()  # half-closes and waits for the server to end the stream
    finally:
        client.close()
    got: dict[str, tc.InferResult] = {}
    errors: list[Exception] = []
    while not results.empty():
        result, error = results.get_nowait()
        if error is not None:
            errors.append(error)
        else:
            assert result is not None
            got[result.get_response().id] = result
    # One error (the unknown model) and no other: the stream itself ended OK.
    assert len(errors) == 1, [e.message() for e in errors]
    assert errors[0].message().startswith("NOT_FOUND: "), errors[0].message()
    assert sorted(got) == ["plain", "ranked"]
    np.testing.assert_allclose(
        got["plain"].as_numpy("logits"), reference(classifier_path, plain), atol=1e-5
    )
    strings = got["ranked"].as_numpy("logits")
    assert strings.shape == (4, k)
    expected = reference(classifier_path, ranked)
    for row, values in zip(strings, expected, strict=True):
        parsed = [s.decode().split(":") for s in row]
        assert int(parsed[0][1]) == int(np.argmax(values))
        order = np.argsort(-values, kind="stable")[:k]
        assert [int(p[1]) for p in parsed] == list(order)
        assert [p[2] for p in parsed] == [f"label{i}" for i in order]
        np.testing.assert_allclose([float(p[0]) for p in parsed], values[order], atol=1e-5)


def test_sigterm_ends_an_idle_stream_unavailable_and_exits_cleanly(
    classifier_path: Path, tmp_path: Path, reference: Reference
) -> None:
    grace = 30
    port = free_port()
    args = [
        str(classifier_path), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--device", "cpu", "--grace", str(grace),
    ]  # fmt: skip
    x = _rows(2, 9)

    async def scenario(server: ServeProcess) -> tuple[Answers, Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(server.target) as channel:
            call = _open(channel, timeout=120)
            await call.write(_request(x, "before"))
            first = [await call.read()]
            server.terminate()
            rest, code, details = await _rest(call)
            return first, rest, code, details

    with ServeProcess(args, port, tmp_path / "serve.log") as server:
        started = time.monotonic()
        first, rest, code, details = asyncio.run(scenario(server))
        ended = time.monotonic() - started
        assert server.wait(grace + 30) == 0, server.output()
        exited = time.monotonic() - started
        log = server.output()
    assert [a.infer_response.id for a in first] == ["before"]
    _check_answer(first[0], x, classifier_path, reference)
    assert rest == []
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "shutting down" in details
    # Ended by the drain itself, not by gRPC cancelling the call when the grace ran out.
    assert ended < 10, f"stream ended {ended:.1f} s after SIGTERM (grace {grace} s)"
    assert exited < 15, f"server exited {exited:.1f} s after SIGTERM (grace {grace} s)"
    assert "draining" in log and "stopped" in log
    assert "grace period over" not in log
    assert "Traceback" not in log and "ERROR" not in log, log


async def _admitted(state: ServingState) -> None:
    """Wait (up to 30 s) until a request is in flight: read by the server and queued. A fixed
    sleep instead let a loaded machine act on the call before the server had it."""
    until = time.monotonic() + 30
    while state.in_flight == 0:
        assert time.monotonic() < until, "no request reached the server within 30 s"
        await asyncio.sleep(0.01)


async def _drain(server: BackgroundServer, state: ServingState) -> asyncio.Future[None]:
    """Start stopping ``server`` (grace 30 s) on a thread; returns, with that stop's future, as
    soon as the server drains."""
    stopping = asyncio.ensure_future(asyncio.to_thread(server.stop, 30))
    while not state.draining:
        await asyncio.sleep(0.01)
    return stopping


def test_drain_answers_the_admitted_then_ends_unavailable(
    start_server: Callable[..., BackgroundServer],
    classifier_path: Path,
    reference: Reference,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, state = _quiet_server(start_server, caplog, max_queue_delay_us=2_000_000, grace=30)
    x = _rows(3, 10)

    async def scenario() -> tuple[Answers, grpc.StatusCode, str, float]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = _open(channel)
            await call.write(_request(x, "admitted"))
            await _admitted(state)  # queued, its batch window still open
            started = time.monotonic()
            stopping = await _drain(server, state)
            await call.write(_request(x, "late"))
            answers, code, details = await _rest(call)
            await stopping
            return answers, code, details, time.monotonic() - started

    answers, code, details, stopped = asyncio.run(scenario())
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["admitted", "late"]
    _check_answer(by_id["admitted"], x, classifier_path, reference)
    assert by_id["late"].error_message.startswith("UNAVAILABLE: "), by_id["late"]
    assert [a.infer_response.id for a in answers] == ["late", "admitted"]  # the error at once
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "shutting down" in details
    assert stopped < 10, f"stop took {stopped:.1f} s (grace 30 s)"
    assert state.in_flight == 0
    assert _errors_logged(caplog) == []  # a drain is routine, not an error


def test_a_closed_stream_answered_during_a_drain_ends_ok(
    start_server: Callable[..., BackgroundServer],
    classifier_path: Path,
    reference: Reference,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A client that has sent everything (tritonclient's stop_stream, Client.infer_stream at the
    # end of its batches) and gets every answer during a rolling restart: the stream ended
    # UNAVAILABLE, which both clients report as an error after every request succeeded.
    server, state = _quiet_server(start_server, caplog, max_queue_delay_us=2_000_000, grace=30)
    x = _rows(3, 21)

    async def scenario() -> tuple[Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = _open(channel)
            await call.write(_request(x, "last"))
            await _admitted(state)  # queued, its batch window still open
            stopping = await _drain(server, state)
            await call.done_writing()
            ending = await _rest(call)
            await stopping
            return ending

    answers, code, details = asyncio.run(scenario())
    assert [a.infer_response.id for a in answers] == ["last"]
    _check_answer(answers[0], x, classifier_path, reference)
    assert code == grpc.StatusCode.OK, (code, details)
    assert state.in_flight == 0
    assert _errors_logged(caplog) == []


def test_a_cancelled_stream_leaves_the_server_serving(
    start_server: Callable[..., BackgroundServer],
    classifier_path: Path,
    reference: Reference,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, state = _quiet_server(start_server, caplog, max_queue_delay_us=1_500_000)
    x = _rows(2, 11)

    async def scenario() -> tuple[grpc.StatusCode, Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            dropped = _open(channel)
            await dropped.write(_request(_rows(4, 12), "dropped"))
            await _admitted(state)  # queued in the open batch window
            assert dropped.cancel()
            dropped_code = await dropped.code()
            kept = _open(channel)
            await kept.write(_request(x, "kept"))
            answers = [await kept.read()]
            await kept.done_writing()
            rest, code, details = await _rest(kept)
            return dropped_code, answers + rest, code, details

    dropped_code, answers, code, details = asyncio.run(scenario())
    assert dropped_code == grpc.StatusCode.CANCELLED
    assert code == grpc.StatusCode.OK, details
    assert [a.infer_response.id for a in answers] == ["kept"]
    _check_answer(answers[0], x, classifier_path, reference)
    assert server.server.models["tiny"].batcher.batch_rows == {2: 1}  # the 4 rows never ran
    until = time.monotonic() + 5
    while state.in_flight and time.monotonic() < until:
        time.sleep(0.01)
    assert state.in_flight == 0  # the cancelled request was finished, so drains do not wait
    counts = request_counts(server.server.metrics.render().decode())
    assert counts[("tiny", "cancelled")] == 1
    assert counts[("tiny", "success")] == 1
    assert _errors_logged(caplog) == []  # a client going away is routine, not an error


def test_a_bug_in_counting_an_answer_still_delivers_it(
    start_server: Callable[..., BackgroundServer],
    classifier_path: Path,
    reference: Reference,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, state = _quiet_server(start_server, caplog)
    planted = plant_counting_bug(server, monkeypatch)
    first, second = _rows(2, 13), _rows(1, 14)

    async def scenario() -> tuple[Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = _open(channel, timeout=10)  # without the guard, the first answer never comes
            await call.write(_request(first, "first"))
            answers = [await call.read()]
            await call.write(_request(second, "second"))
            answers.append(await call.read())
            await call.done_writing()
            rest, code, details = await _rest(call)
            return answers + rest, code, details

    answers, code, details = asyncio.run(scenario())
    assert planted == [grpc.StatusCode.OK]
    assert code == grpc.StatusCode.OK, details
    assert [a.infer_response.id for a in answers] == ["first", "second"]
    _check_answer(answers[0], first, classifier_path, reference)
    _check_answer(answers[1], second, classifier_path, reference)
    assert state.in_flight == 0  # counted as finished all the same, so a drain does not wait
    assert _errors_logged(caplog) == [
        "serve.state: counting a request to model tiny failed (RuntimeError('planted bug'))"
    ]


def _read_before_held_back(server: BackgroundServer, count: int = 2000, width: int = 0) -> int:
    """How many of ``count`` requests, sent on one stream without reading any answer, the
    server read before it stopped reading; then every answer is read and checked. ``width``:
    each request's id, zero-padded to that many characters."""
    assert server.server is not None
    state = server.server.state
    x = _rows(1, 0)
    names = [str(i).zfill(width) for i in range(count)]
    payloads = [_request(x, name, model="wide").SerializeToString() for name in names]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = pb.ModelStreamInferResponse.FromString
        answers = channel.stream_stream(STREAM, response_deserializer=answer)(
            iter(payloads), timeout=120
        )
        read, until = -1, time.monotonic() + 30
        while state.arrivals != read and time.monotonic() < until:  # until reading stops
            read = state.arrivals
            time.sleep(0.5)
        ids = [a.infer_response.id for a in answers]  # read now: the rest comes
    assert sorted(ids, key=lambda name: (len(name), name)) == names
    return read


def test_a_client_that_does_not_read_is_held_back_not_buffered(
    start_server: Callable[..., BackgroundServer],
    make_classifier: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before the window, the server read on and kept every answer it could not write: memory
    # grew by ~7 MB/s for as long as the client sent. Answers of 32 KiB (8192 classes) fill
    # what HTTP/2 buffers for the client after about a hundred.
    monkeypatch.setattr(streaming, "WINDOW", 16)
    server = start_server(models=(make_classifier(tmp_path / "wide.onnx", classes=8192),))
    assert _read_before_held_back(server) < 1000


def test_a_client_that_does_not_read_is_held_back_by_the_bytes_it_holds_too(
    start_server: Callable[..., BackgroundServer],
    make_classifier: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With 1024 answers held per stream, answers of many rows and classes could pin gigabytes
    # for one client that does not read; the byte window stops reading long before. The
    # request window alone stopped reading after ~1100 (what HTTP/2 buffers for the client
    # comes on top of either window).
    monkeypatch.setattr(streaming, "WINDOW_BYTES", 1 << 20, raising=False)  # 32 answers
    server = start_server(models=(make_classifier(tmp_path / "wide.onnx", classes=8192),))
    assert _read_before_held_back(server) < 600


def test_the_byte_window_counts_the_ids_answers_echo(
    start_server: Callable[..., BackgroundServer],
    make_classifier: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It counted output tensors only: answers of 4 classes echoing 16 KiB ids never filled it,
    # so reading went on to the request window (1024), and with ids near --max-message-bytes
    # one client that did not read held gigabytes (1 MiB ids: 91 MB -> 1.18 GB).
    monkeypatch.setattr(streaming, "WINDOW_BYTES", 1 << 20, raising=False)  # 64 answers
    server = start_server(models=(make_classifier(tmp_path / "wide.onnx", classes=4),))
    assert _read_before_held_back(server, width=16 * 1024) < 1000


def test_a_full_queue_refuses_stream_requests_one_by_one_and_the_stream_goes_on(
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    reference: Reference,
    caplog: pytest.LogCaptureFixture,
) -> None:
    slow = _slow_classifier(tmp_path / "slow.onnx")
    server, state = _quiet_server(
        start_server, caplog, models=(slow,), max_batch_size=1, max_queue_size=2
    )
    inputs = {
        str(i): np.random.default_rng(i).normal(size=(1, 256, 256)).astype(np.float32)
        for i in range(16)
    }

    async def scenario() -> tuple[Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = _open(channel, timeout=120)
            for ident, x in inputs.items():
                await call.write(_request(x, ident, model="slow"))
            await call.done_writing()
            return await _rest(call)

    answers, code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.OK, details
    assert sorted(a.infer_response.id for a in answers) == sorted(inputs)
    rejected = [a for a in answers if a.error_message]
    assert all(a.error_message.startswith("RESOURCE_EXHAUSTED: ") for a in rejected), rejected
    assert all("--max-queue-size" in a.error_message for a in rejected), rejected
    for answer in answers:
        if not answer.error_message:
            expected = reference(slow, inputs[answer.infer_response.id])
            np.testing.assert_allclose(_logits(answer.infer_response), expected, atol=1e-4)
    assert 1 <= len(rejected) < len(inputs)
    _settled(state)
    assert server.server.models["slow"].batcher.depth == 0
    counts = request_counts(server.server.metrics.render().decode())
    assert counts[("slow", "rejected")] == len(rejected)
    assert counts[("slow", "success")] == len(inputs) - len(rejected)
    assert _errors_logged(caplog) == []  # a full queue is load, not an error


def _settled(state: ServingState) -> None:
    until = time.monotonic() + 10
    while state.in_flight and time.monotonic() < until:
        time.sleep(0.01)
    assert state.in_flight == 0


def test_a_stream_deadline_passing_in_the_queue_is_counted_as_deadline(
    start_server: Callable[..., BackgroundServer], caplog: pytest.LogCaptureFixture
) -> None:
    # The stream's deadline ends the call while its request waits in the 10 s batch window;
    # the request was counted as cancelled, as if the client had gone away. The deadline
    # leaves a loaded machine time to deliver the request first (with 0.3 s the stream could
    # end before the server read it, and nothing was counted).
    server, state = _quiet_server(start_server, caplog, max_queue_delay_us=10_000_000)
    caplog.set_level(logging.DEBUG)

    async def scenario() -> tuple[Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await channel.channel_ready()
            call = _open(channel, timeout=2)
            await call.write(_request(_rows(2, 15), "hasty"))
            return await _rest(call)

    answers, code, _ = asyncio.run(scenario())
    assert (answers, code) == ([], grpc.StatusCode.DEADLINE_EXCEEDED)
    _settled(state)
    counts = request_counts(server.server.metrics.render().decode())
    assert counts[("tiny", "deadline")] == 1
    assert counts[("tiny", "cancelled")] == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]
    assert len(lines) == 1 and "status=DEADLINE_EXCEEDED" in lines[0], lines


def test_stream_requests_refused_before_queueing_get_a_debug_line_each(
    start_server: Callable[..., BackgroundServer], caplog: pytest.LogCaptureFixture
) -> None:
    server, state = _quiet_server(start_server, caplog)
    caplog.set_level(logging.DEBUG)
    x = _rows(1, 16)
    requests = [
        _request(x, "good"),
        _request(_rows(1, 17)[:, :, :, :7], "wrong-shape"),
        _request(x, "unknown-model", model="nope"),
        _request(x, "unknown-version", model_version="2"),
    ]

    async def scenario() -> tuple[Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = _open(channel)
            for request in requests:
                await call.write(request)
            await call.write(b"\xff\xff\xff\x01not a protobuf")
            await call.done_writing()
            return await _rest(call)

    answers, code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.OK, details
    assert len(answers) == 5
    _settled(state)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]
    logged = sorted(line.split()[1:4] for line in lines)
    assert logged == [
        ["id=1", "model=tiny", "status=OK"],
        ["id=2", "model=tiny", "status=INVALID_ARGUMENT"],
        ["id=3", "model=nope", "status=NOT_FOUND"],
        ["id=4", "model=tiny", "status=NOT_FOUND"],
        ["id=5", "model=", "status=INVALID_ARGUMENT"],
    ], lines


def _final(response: pb.ModelInferResponse) -> bool:
    flag = response.parameters.get("triton_final_response")
    return flag is not None and flag.WhichOneof("parameter_choice") == "bool_param" and (
        flag.bool_param
    )


def test_every_stream_response_is_marked_final_as_triton_does(
    shared_server: BackgroundServer,
) -> None:
    # Triton sets triton_final_response on every stream response; tritonclient users that
    # loop until they see it true (decoupled-style code) would wait forever without it.
    results: queue.Queue[tuple[tc.InferResult | None, Exception | None]] = queue.Queue()
    client = tc.InferenceServerClient(f"127.0.0.1:{shared_server.port}")
    try:
        client.start_stream(
            callback=lambda result, error: results.put((result, error)), stream_timeout=60
        )
        client.async_stream_infer("tiny", [_input(_rows(2, 18))], request_id="plain")
        client.async_stream_infer(
            "tiny",
            [_input(_rows(11, 19))],  # split above the max batch, then joined
            request_id="ranked",
            outputs=[tc.InferRequestedOutput("logits", class_count=2)],
        )
        client.stop_stream()
    finally:
        client.close()
    got = []
    while not results.empty():
        result, error = results.get_nowait()
        assert error is None, error
        assert result is not None
        got.append(result.get_response())
    assert sorted(r.id for r in got) == ["plain", "ranked"]
    assert all(_final(r) for r in got), got

    # Error answers too (tritonclient hands those over as exceptions, so read them raw).
    async def scenario() -> tuple[Answers, grpc.StatusCode, str]:
        async with aio.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
            call = _open(channel)
            await call.write(_request(_rows(1, 20), "wrong-shape", datatype="FP64"))
            await call.write(_request(_rows(1, 20), "lost", model="nope"))
            await call.write(b"\xff\xff\xff\x01not a protobuf")
            await call.done_writing()
            return await _rest(call)

    errors, code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.OK, details
    assert len(errors) == 3 and all(e.error_message for e in errors), errors
    assert all(_final(e.infer_response) for e in errors), errors


def test_an_answer_above_the_message_limit_is_refused_alone(
    start_server: Callable[..., BackgroundServer],
    make_classifier: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """gRPC refuses to send a message above its limit by ending the call: the stream, with the
    answers of every other request on it, ended RESOURCE_EXHAUSTED; unary calls logged an
    ExecuteBatchError and were counted as successes."""
    wide = make_classifier(tmp_path / "wide.onnx", classes=8192)  # 32 KiB of logits per row
    server = start_server(models=(wide,), max_message_bytes=64 * 1024)

    async def scenario() -> tuple[Answers, grpc.StatusCode]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = _open(channel)
            # 40 KB of UTF-8 in 10 000 characters: the size is counted in bytes.
            for request_id, rows in (("small", 1), ("big", 4), ("😀" * 10_000, 1), ("after", 1)):
                await call.write(_request(_rows(rows, 0), request_id, model="wide"))
            await call.done_writing()
            answers, code, _ = await _rest(call)
            return answers, code

    answers, code = asyncio.run(scenario())
    assert code == grpc.StatusCode.OK
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["after", "big", "small", "😀" * 10_000]
    for request_id in ("big", "😀" * 10_000):
        message = by_id[request_id].error_message
        assert message.startswith("RESOURCE_EXHAUSTED: expected an answer within"), message
    for request_id in ("small", "after"):
        assert not by_id[request_id].error_message
        np.testing.assert_allclose(
            _logits(by_id[request_id].infer_response), reference(wide, _rows(1, 0)), atol=1e-4
        )
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = channel.unary_unary(INFER)
        with pytest.raises(grpc.RpcError) as refused:
            infer(_request(_rows(4, 0), "big", model="wide").SerializeToString(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-message-bytes 65536" in refused.value.details()
    assert server.server is not None and server.server.metrics is not None
    counts = request_counts(server.server.metrics.render().decode())
    assert (counts[("wide", "success")], counts[("wide", "rejected")]) == (2, 3)
