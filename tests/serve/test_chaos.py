"""The batcher's queue accounting under clients that misbehave, many at once, on real servers.

The targeted tests hold the one instance inside a batch (a gate in front of the real ONNX
Runtime run) so the queue's state is known without timing. The chaos test runs ``python -m
serve`` and throws every kind of client at it together, then checks the good answers, the
queue depth, and a clean drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc import aio

from protos import kserve_pb2 as pb
from serve.background import BackgroundServer
from serve.benchenv import free_ports
from tests.serve.conftest import reference
from tests.serve.procs import ServeProcess
from tests.serve.test_batching_faults import _gather_model
from tests.serve.v2 import INFER, infer_payload, reply_logits, request_counts, samples

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
WAIT_S = 60  # a bound on waiting for a state, never a measurement


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


class Gate:
    """Wraps a runtime's ``run``: each run waits for a permit, so a test holds a batch."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray]) -> None:
        self._run = run
        self.entered = threading.Semaphore(0)
        self.permits = threading.Semaphore(0)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.release()
        self.permits.acquire(timeout=WAIT_S)
        return self._run(batch)

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=WAIT_S), "no batch reached the runtime"


def _gated(server: BackgroundServer) -> tuple[Gate, object]:
    assert server.server is not None
    batcher = server.server.models["tiny"].batcher
    gate = Gate(batcher.runtime.run)
    batcher.runtime.run = gate  # type: ignore[method-assign]
    return gate, batcher


async def _until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + WAIT_S
    while not condition():
        assert loop.time() < until, f"waited {WAIT_S} s for {what}"
        await asyncio.sleep(0.005)


async def _unary(channel: aio.Channel, rows: np.ndarray, model: str = "tiny") -> object:
    """The logits of one ModelInfer call, or its status code."""
    try:
        reply = await channel.unary_unary(INFER)(infer_payload(model, rows), timeout=WAIT_S)
    except aio.AioRpcError as e:
        return e.code()
    return reply_logits(reply)[1]


def _stream(channel: aio.Channel, timeout: float | None) -> aio.StreamStreamCall:
    """A ModelStreamInfer call: writes serialized requests, reads ModelStreamInferResponses."""
    return channel.stream_stream(
        STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
    )(timeout=timeout)


def _assert_answered(got: object, path: Path, rows: np.ndarray) -> None:
    assert isinstance(got, np.ndarray), f"expected logits, got {got}"
    np.testing.assert_allclose(got, reference(path, rows), rtol=1e-5, atol=1e-5)


def test_the_request_held_for_the_next_batch_counts_against_the_queue_bound(
    start_server: Callable[..., BackgroundServer], classifier_path: Path
) -> None:
    # The request that overflowed the last batch waits outside the queue proper: the
    # queue-full check did not count it, so --max-queue-size 2 held 3 requests.
    server = start_server(max_batch_size=4, max_queue_size=2)
    gate, batcher = _gated(server)
    x, a, b, c, d = _rows(1, 1), _rows(3, 2), _rows(3, 3), _rows(1, 4), _rows(1, 5)

    async def scenario() -> list[object]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            first = asyncio.ensure_future(_unary(channel, x))
            await asyncio.to_thread(gate.wait_entered)
            queued = [asyncio.ensure_future(_unary(channel, rows)) for rows in (a, b)]
            await _until(lambda: batcher.depth == 2, "a and b queued")
            gate.permits.release()  # x ends; a runs and b, 3 + 3 rows > 4, is held back
            await asyncio.to_thread(gate.wait_entered)
            third = asyncio.ensure_future(_unary(channel, c))
            await _until(lambda: batcher.depth == 2, "c queued beside the held b")
            fourth = asyncio.ensure_future(_unary(channel, d))
            await _until(lambda: fourth.done() or batcher.depth > 2, "d refused or queued")
            gate.permits.release(10)
            return await asyncio.gather(first, *queued, third, fourth)

    *answers, refused = asyncio.run(scenario())
    assert not isinstance(refused, np.ndarray), "a 3rd request joined --max-queue-size 2"
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    for got, rows in zip(answers, (x, a, b, c), strict=True):
        _assert_answered(got, classifier_path, rows)
    assert batcher.depth == 0


def test_a_cancelled_held_request_frees_its_place_after_a_purge_too(
    start_server: Callable[..., BackgroundServer], classifier_path: Path
) -> None:
    # The held request, once its client went away, still counted in the queue-full check
    # after a purge had cleared the withdrawn flag: with a and d queued of 3, e was refused.
    server = start_server(max_batch_size=4, max_queue_size=3)
    gate, batcher = _gated(server)
    state = server.server.state
    x, a, c, d, e = _rows(1, 31), _rows(3, 32), _rows(1, 34), _rows(1, 35), _rows(1, 36)

    async def scenario() -> list[object]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            infer = channel.unary_unary(INFER)
            first = asyncio.ensure_future(_unary(channel, x))
            await asyncio.to_thread(gate.wait_entered)
            running = asyncio.ensure_future(_unary(channel, a))
            await _until(lambda: batcher.depth == 1, "a queued")
            held = infer(infer_payload("tiny", _rows(3, 33)))
            await _until(lambda: batcher.depth == 2, "a and b queued")
            gate.permits.release()  # x ends; a runs and b, 3 + 3 rows > 4, is held back
            await asyncio.to_thread(gate.wait_entered)
            held.cancel()
            # in_flight: requests admitted and not answered (a runs; x has been answered)
            await _until(lambda: state.in_flight == 1, "the server to see b cancelled")
            queued = asyncio.ensure_future(_unary(channel, c))
            await _until(lambda: state.in_flight == 2, "c queued")
            gone = infer(infer_payload("tiny", _rows(1, 37)))
            await _until(lambda: state.in_flight == 3, "the one to cancel queued")
            gone.cancel()
            await _until(lambda: state.in_flight == 2, "the server to see it cancelled")
            fourth = asyncio.ensure_future(_unary(channel, d))  # full as counted: a purge
            await _until(lambda: fourth.done() or state.in_flight == 3, "d refused or queued")
            fifth = asyncio.ensure_future(_unary(channel, e))  # c and d of 3: room
            await _until(lambda: fifth.done() or state.in_flight == 4, "e refused or queued")
            gate.permits.release(10)
            return await asyncio.gather(first, running, queued, fourth, fifth)

    answers = asyncio.run(scenario())
    for got, rows in zip(answers, (x, a, c, d, e), strict=True):
        _assert_answered(got, classifier_path, rows)
    assert batcher.depth == 0


@pytest.mark.parametrize("client", ["unary", "stream"])
def test_a_cancelled_request_frees_its_queue_place_at_once(
    start_server: Callable[..., BackgroundServer], classifier_path: Path, client: str
) -> None:
    # A request whose client went away held its place until an instance was free to drop
    # it: a new request got RESOURCE_EXHAUSTED from a queue holding nothing live.
    server = start_server(max_batch_size=4, max_queue_size=2)
    gate, batcher = _gated(server)
    state = server.server.state
    x, c = _rows(1, 11), _rows(2, 14)

    async def scenario() -> tuple[object, object, object]:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            first = asyncio.ensure_future(_unary(channel, x))
            await asyncio.to_thread(gate.wait_entered)
            if client == "unary":  # 5 rows: two pieces of 4 and 1, the whole queue
                gone = channel.unary_unary(INFER)(infer_payload("tiny", _rows(5, 12)))
            else:
                gone = _stream(channel, None)
                await gone.write(infer_payload("tiny", _rows(1, 12)))
                await gone.write(infer_payload("tiny", _rows(1, 13)))
            await _until(lambda: batcher.depth == 2, "the queue filled")
            gone.cancel()
            await _until(lambda: state.in_flight == 1, "the server to see the cancel")
            last = asyncio.ensure_future(_unary(channel, c))
            await _until(lambda: last.done() or batcher.depth == 1, "c refused or queued")
            gate.permits.release(10)
            return await first, await last, await gone.code()

    first, last, gone = asyncio.run(scenario())
    assert gone == grpc.StatusCode.CANCELLED
    _assert_answered(first, classifier_path, x)
    _assert_answered(last, classifier_path, c)
    assert batcher.depth == 0


# A client that opens a stream, sends requests, never half-closes, and is SIGKILLed.
_KILLED_CLIENT = """
import sys, threading
import grpc, numpy as np
from tests.serve.v2 import infer_payload

def requests():
    rng = np.random.default_rng(int(sys.argv[2]))
    for i in range(40):
        rows = rng.normal(size=(1 + i % 3, 3, 8, 8)).astype(np.float32)
        yield infer_payload("tiny", rows, f"k{i}")
    threading.Event().wait()

answers = grpc.insecure_channel(sys.argv[1]).stream_stream(sys.argv[3])(requests())
next(answers)
print("streaming", flush=True)
threading.Event().wait()
"""

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class Expected:
    """In-process ONNX Runtime logits, one session per model, each row run alone."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self._sessions = {
            name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for name, path in paths.items()
        }

    def check(self, got: object, model: str, rows: np.ndarray) -> None:
        assert isinstance(got, np.ndarray), f"a good request to {model} got {got}"
        session = self._sessions[model]
        want = np.concatenate([session.run(None, {"input": row[None]})[0] for row in rows])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@dataclass
class Outcomes:
    """What the chaos clients saw, checked once they are all done."""

    good: list[tuple[str, np.ndarray, object]] = field(default_factory=list)
    maybe: list[tuple[str, np.ndarray, object]] = field(default_factory=list)  # may not end OK
    refused: list[tuple[object, set[grpc.StatusCode]]] = field(default_factory=list)


def _stream_answer(answer: pb.ModelStreamInferResponse) -> object:
    if answer.error_message:
        return grpc.StatusCode[answer.error_message.split(":", 1)[0]]
    return reply_logits(answer.infer_response.SerializeToString())[1]


async def _retried(send: Callable[[], Awaitable[object]]) -> object:
    """``send()`` again while the queue is full, as the RESOURCE_EXHAUSTED message asks."""
    for attempt in range(10_000):
        got = await send()
        if not (isinstance(got, grpc.StatusCode) and got == EXHAUSTED):
            return got
        await asyncio.sleep(0.002 * (1 + attempt % 8))
    return got


class Chaos:
    """Every kind of client at once against one server at ``target``."""

    def __init__(self, target: str, gather_rows: Callable[..., np.ndarray], seed: int) -> None:
        self.target = target
        self.gather_rows = gather_rows
        self.seen = Outcomes()
        self.rng = random.Random(seed)

    def rows(self, model: str, n: int, seed: int) -> np.ndarray:
        return _rows(n, seed) if model == "tiny" else self.gather_rows(n, seed)

    async def run(self) -> Outcomes:
        async with aio.insecure_channel(self.target) as channel:
            work: list[Awaitable[object]] = [self.killed_client(i) for i in range(2)]
            for i in range(30):
                model = ("tiny", "gather")[i % 2]
                rows = self.rows(model, 1 + i % 7, 100 + i)  # 5 rows and up: split in pieces
                work.append(self.good_unary(channel, model, rows))
            work += [self.good_stream(channel, i) for i in range(6)]
            work += [self.cancelled_unary(channel, i) for i in range(15)]
            work += [self.cancelled_stream(channel, i) for i in range(4)]
            work += [self.hasty_unary(channel, i) for i in range(15)]
            work.append(self.hasty_stream(channel))
            work += [self.malformed(channel, i) for i in range(18)]
            self.rng.shuffle(work)
            await asyncio.gather(*work)
        return self.seen

    async def good_unary(self, channel: aio.Channel, model: str, rows: np.ndarray) -> None:
        got = await _retried(lambda: _unary(channel, rows, model))
        self.seen.good.append((model, rows, got))

    async def good_stream(self, channel: aio.Channel, s: int) -> None:
        call = _stream(channel, WAIT_S)
        models = ("tiny", "gather")
        todo = {f"{s}-{j}": (models[j % 2], self.rows(models[j % 2], 1 + j, 300 + 10 * s + j))
                for j in range(6)}  # fmt: skip
        bad = self.gather_rows(2, 400 + s)
        bad[1, 0] = 55  # out of the gather table: fails in its batch, alone
        todo[f"{s}-bad"] = ("gather", bad)
        answers: dict[str, object] = {}
        while todo:
            for request_id, (model, rows) in todo.items():
                await call.write(infer_payload(model, rows, request_id))
            for _ in range(len(todo)):
                answer = await call.read()
                got = _stream_answer(answer)
                if not (isinstance(got, grpc.StatusCode) and got == EXHAUSTED):
                    answers[answer.infer_response.id] = got
                    todo.pop(answer.infer_response.id)
            await asyncio.sleep(0.005)
        await call.done_writing()
        assert await call.read() is aio.EOF
        self.seen.refused.append((await call.code(), {grpc.StatusCode.OK}))
        for j in range(6):
            model = models[j % 2]
            rows = self.rows(model, 1 + j, 300 + 10 * s + j)
            self.seen.good.append((model, rows, answers[f"{s}-{j}"]))
        self.seen.refused.append((answers[f"{s}-bad"], {grpc.StatusCode.INVALID_ARGUMENT}))

    async def cancelled_unary(self, channel: aio.Channel, i: int) -> None:
        rows = _rows(1 + i % 6, 500 + i)
        call = channel.unary_unary(INFER)(infer_payload("tiny", rows), timeout=WAIT_S)
        await asyncio.sleep(self.rng.uniform(0, 0.01))
        call.cancel()
        try:
            got: object = reply_logits(await call)[1]
        except asyncio.CancelledError:
            return
        except aio.AioRpcError as e:
            got = e.code()
        self.seen.maybe.append(("tiny", rows, got))

    async def cancelled_stream(self, channel: aio.Channel, i: int) -> None:
        call = _stream(channel, WAIT_S)
        for j in range(5):
            await call.write(infer_payload("tiny", _rows(1 + j, 600 + 10 * i + j)))
        if i % 2:
            await call.read()  # cancelled with answers still coming
        call.cancel()

    async def killed_client(self, i: int) -> None:
        root = Path(__file__).resolve().parents[2]
        client = subprocess.Popen(
            [sys.executable, "-c", _KILLED_CLIENT, self.target, str(i), STREAM],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            line = await asyncio.to_thread(client.stdout.readline)
            assert line == b"streaming\n", client.stderr.read().decode(errors="replace")
        finally:
            os.kill(client.pid, signal.SIGKILL)
            await asyncio.to_thread(client.communicate)

    async def hasty_unary(self, channel: aio.Channel, i: int) -> None:
        rows = _rows(1 + i % 6, 700 + i)
        timeout = self.rng.uniform(0.001, 0.03)
        try:
            reply = await channel.unary_unary(INFER)(infer_payload("tiny", rows), timeout=timeout)
        except aio.AioRpcError as e:
            self.seen.refused.append((e.code(), {EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}))
        else:
            self.seen.good.append(("tiny", rows, reply_logits(reply)[1]))

    async def hasty_stream(self, channel: aio.Channel) -> None:
        with_ids = {f"h{j}": _rows(1 + j % 3, 800 + j) for j in range(20)}

        async def never_closed() -> AsyncIterator[bytes]:
            for request_id, rows in with_ids.items():
                yield infer_payload("tiny", rows, request_id)
            await asyncio.Event().wait()  # the stream can only end by its deadline

        call = channel.stream_stream(
            STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
        )(never_closed(), timeout=0.05)
        with contextlib.suppress(aio.AioRpcError):
            async for answer in call:
                got = _stream_answer(answer)
                if isinstance(got, grpc.StatusCode):
                    # Queued past the stream's deadline before its batch started, or refused.
                    self.seen.refused.append((got, {EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}))
                else:
                    self.seen.good.append(("tiny", with_ids[answer.infer_response.id], got))
        code = await call.code()
        if code == grpc.StatusCode.INTERNAL and await call.details() == "Internal error from Core":
            # The client saw the server's reset for the deadline before its own timer: gRPC's
            # DEADLINE_EXCEEDED is best effort on HTTP/2 (grpc/grpc#2685). Not our status.
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        self.seen.refused.append((code, {grpc.StatusCode.DEADLINE_EXCEEDED}))

    async def malformed(self, channel: aio.Channel, i: int) -> None:
        kind = i % 6
        invalid = {grpc.StatusCode.INVALID_ARGUMENT}
        if kind == 0:
            payload = infer_payload("tiny", _rows(1, 900 + i)[:, :, :7, :7])
        elif kind == 1:
            request = pb.ModelInferRequest(model_name="tiny")
            request.inputs.add(name="input", datatype="FP16", shape=[1, 3, 8, 8])
            request.raw_input_contents.append(bytes(3 * 8 * 8 * 2))
            payload = request.SerializeToString()
        elif kind == 2:
            payload = infer_payload("tiny", _rows(2, 900 + i))[:-40]  # torn off mid-tensor
        elif kind == 3:
            payload, invalid = infer_payload("nope", _rows(1, 900 + i)), {grpc.StatusCode.NOT_FOUND}
        elif kind == 4:
            payload = b"\xff\xff\xff\xff"
        else:
            rows = self.gather_rows(3 + i % 4, 900 + i)
            rows[-1, 0] = 55  # passes every check, fails when run: among good ones in a batch
            payload = infer_payload("gather", rows)
        got = await _retried(lambda: _call(channel, payload))
        self.seen.refused.append((got, invalid))


async def _call(channel: aio.Channel, payload: bytes) -> object:
    try:
        return reply_logits(await channel.unary_unary(INFER)(payload, timeout=WAIT_S))[1]
    except aio.AioRpcError as e:
        return e.code()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def test_many_misbehaving_clients_at_once_leave_the_server_sound(
    classifier_path: Path, tmp_path: Path
) -> None:
    from tests.serve.test_batching_faults import _rows as gather_rows

    paths = {"tiny": classifier_path, "gather": _gather_model(tmp_path / "gather.onnx")}
    port, metrics_port = free_ports(2)
    args = [*map(str, paths.values()), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--device", "cpu", "--intra-op-threads", "1",
            "--max-batch-size", "4", "--max-queue-size", "6", "--instances", "2",
            "--max-queue-delay-us", "5000", "--grace", "10"]  # fmt: skip
    expected = Expected(paths)
    with ServeProcess(args, port, tmp_path / "serve.log") as server:
        seen = Outcomes()
        for seed in range(2):  # the second round on a server the first one went through
            chaos = asyncio.run(Chaos(server.target, gather_rows, seed).run())
            for name in ("good", "maybe", "refused"):
                getattr(seen, name).extend(getattr(chaos, name))
        for model, rows, got in seen.good:
            expected.check(got, model, rows)
        for model, rows, got in seen.maybe:
            if isinstance(got, grpc.StatusCode):
                assert got in (EXHAUSTED, grpc.StatusCode.CANCELLED), got
            else:
                expected.check(got, model, rows)
        for got, allowed in seen.refused:
            assert got in allowed, (got, allowed, server.output())
        assert len(seen.good) >= 2 * (30 + 6 * 6)

        def queued() -> float:
            text = _metrics(metrics_port)
            return sum(samples(text, "serve_queue_depth", model) for model in paths)

        asyncio.run(_until(lambda: queued() == 0, "the queues to empty"))
        counts = request_counts(_metrics(metrics_port))
        outcomes = {outcome for (_, outcome), count in counts.items() if count}
        assert "success" in outcomes and "internal" not in outcomes, outcomes

        async def still_serving() -> list[object]:
            async with aio.insecure_channel(server.target) as channel:
                return [await _unary(channel, expected_rows[m], m) for m in paths]

        expected_rows = {"tiny": _rows(3, 1000), "gather": gather_rows(3, 1000)}
        for model, got in zip(paths, asyncio.run(still_serving()), strict=True):
            expected.check(got, model, expected_rows[model])
        server.terminate()
        code = server.wait(WAIT_S)
        log = server.output()
    assert code == 0, log
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "grace period over" not in log, log  # a request of a client gone still counted
