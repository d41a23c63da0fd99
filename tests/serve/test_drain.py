"""Graceful drain of `python -m serve` on SIGTERM, under load.

Requests are held in the batcher's queue by a long --max-queue-delay-us, so a known set of
accepted requests is still waiting when SIGTERM arrives; all of them must be answered
correctly, while health turns NOT_SERVING and new calls get UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serve.conftest import free_port, reference
from tests.serve.procs import ServeProcess
from tests.serve.v2 import INFER, infer_payload, reply_logits

GRACE = 20
SERVING = health_pb2.HealthCheckResponse.SERVING


async def _infer(channel: aio.Channel, payload: bytes) -> bytes | grpc.StatusCode:
    try:
        return await channel.unary_unary(INFER)(payload, timeout=60)
    except aio.AioRpcError as e:
        return e.code()


async def _health(channel: aio.Channel) -> int | grpc.StatusCode:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    except aio.AioRpcError as e:
        return e.code()
    return reply.status


def test_sigterm_drains_accepted_requests(classifier_path: Path, tmp_path: Path) -> None:
    port = free_port()
    args = [
        str(classifier_path), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--device", "cpu", "--grace", str(GRACE), "--max-batch-size", "64",
        # Hold batches for 4 s so the accepted requests are still queued at SIGTERM.
        "--max-queue-delay-us", "4000000",
    ]
    rng = np.random.default_rng(11)
    accepted = rng.normal(size=(24, 1, 3, 8, 8)).astype(np.float32)
    expected = reference(classifier_path, accepted[:, 0])

    async def scenario(server: ServeProcess) -> None:
        async with aio.insecure_channel(server.target) as channel:
            assert await _health(channel) == SERVING
            calls = [
                asyncio.ensure_future(_infer(channel, infer_payload("tiny", x, str(i))))
                for i, x in enumerate(accepted)
            ]
            await asyncio.sleep(1.0)  # on loopback they are queued within milliseconds
            assert not any(c.done() for c in calls), "answered before the queue delay ran out"
            server.terminate()
            statuses = []
            while True:  # health must leave SERVING while the accepted requests are pending
                statuses.append(await _health(channel))
                if statuses[-1] != SERVING:
                    break
                await asyncio.sleep(0.02)
            assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not all(c.done() for c in calls)
            late = await asyncio.gather(
                *(_infer(channel, infer_payload("tiny", accepted[0])) for _ in range(5))
            )
            assert late == [grpc.StatusCode.UNAVAILABLE] * 5
            answers = await asyncio.gather(*calls)
        for i, answer in enumerate(answers):
            assert isinstance(answer, bytes), f"accepted request {i} got {answer}"
            request_id, logits = reply_logits(answer)
            assert request_id == str(i)
            np.testing.assert_allclose(logits[0], expected[i], rtol=1e-4, atol=1e-5)

    with ServeProcess(args, port, tmp_path / "serve.log") as server:
        asyncio.run(scenario(server))
        assert server.wait(GRACE + 30) == 0, server.output()
        log = server.output()
    assert "draining" in log and "stopped" in log
    assert "Traceback" not in log


def test_grace_running_out_still_exits_cleanly(classifier_path: Path, tmp_path: Path) -> None:
    port = free_port()
    args = [
        str(classifier_path), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--device", "cpu", "--grace", "1", "--max-queue-delay-us", "8000000",
    ]
    batch = np.random.default_rng(12).normal(size=(1, 3, 8, 8)).astype(np.float32)

    async def scenario(server: ServeProcess) -> list[object]:
        async with aio.insecure_channel(server.target) as channel:
            calls = [
                asyncio.ensure_future(_infer(channel, infer_payload("tiny", batch)))
                for _ in range(4)
            ]
            await asyncio.sleep(1.0)
            server.terminate()
            return await asyncio.gather(*calls)

    with ServeProcess(args, port, tmp_path / "serve.log") as server:
        answers = asyncio.run(scenario(server))
        assert server.wait(60) == 0, server.output()
    # Still queued when the grace period ran out: each client hears UNAVAILABLE (retry
    # elsewhere), none hangs.
    assert answers == [grpc.StatusCode.UNAVAILABLE] * 4
    assert "grace period over" in server.output()
