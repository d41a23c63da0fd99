"""Graceful drain of `python -m serve` on SIGTERM, under load.

Requests are held in the batcher's queue by a long --max-queue-delay-us, so a known set of
accepted requests is still waiting when SIGTERM arrives; all of them must be answered
correctly, while health turns NOT_SERVING and new calls get UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from serve.client import Client, ClientError
from tests.serve.conftest import free_port, free_ports, reference
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
        with Client(server.target, timeout=60) as client, ThreadPoolExecutor(1) as pool:
            # The Python client's message said "cannot reach a ready server" for this.
            waiting = pool.submit(client.infer, "tiny", batch)
            answers = asyncio.run(scenario(server))
            with pytest.raises(ClientError, match=r"stopped before answering .*: it was shut"):
                waiting.result(timeout=60)
        assert server.wait(60) == 0, server.output()
    # Still queued when the grace period ran out: each client hears UNAVAILABLE (retry
    # elsewhere), none hangs.
    assert answers == [grpc.StatusCode.UNAVAILABLE] * 4
    assert "grace period over" in server.output()


def _empty_loop_body() -> onnx.GraphProto:
    """The body of a Loop that only counts: each step adds 1 to a float, about a microsecond."""
    return helper.make_graph(
        [
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
        ],
        [numpy_helper.from_array(np.array(0.0, np.float32), "one")],
    )


def _slow_model(path: Path, iterations: int) -> Path:
    """A classifier [batch,3,8,8] → [batch,5] whose every run also spins a Loop of
    ``iterations`` empty steps (about a microsecond each): a warm-up that takes seconds."""
    body = _empty_loop_body()
    weights = np.random.default_rng(0).normal(size=(192, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["raw"]),
            helper.make_node("Loop", ["trips", "", "zero"], ["spent"], body=body),
            helper.make_node("Add", ["raw", "spent"], ["logits"]),
        ],
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        [
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.zeros(5, np.float32), "b"),
            numpy_helper.from_array(np.array(iterations, np.int64), "trips"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_sigterm_while_warming_up_stops_without_finishing_the_warm_up(tmp_path: Path) -> None:
    """Each warm-up run of this model spins for seconds; a SIGTERM once the session exists
    must end the process with 0 before the remaining buckets run, never reporting ready."""
    model = _slow_model(tmp_path / "slow.onnx", iterations=3_000_000)
    port, metrics_port = free_ports(2)
    args = [
        str(model), "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--device", "cpu",
        "--max-batch-size", "8",  # 4 buckets: the whole warm-up takes 4 runs
    ]  # fmt: skip
    loaded = "runs on CPUExecutionProvider"  # the session exists; warm-up begins
    with ServeProcess(args, port, tmp_path / "serve.log", ready_line=loaded) as server:
        # While loading, metrics answer (their port is bound first) and say "not ready"; a
        # call to the loading model is counted under its name, not with unknown names.
        payload = infer_payload("slow", np.zeros((1, 4), np.float32))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(
            grpc.RpcError
        ) as refused:
            channel.unary_unary(INFER)(payload, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as reply:
            scraped = reply.read().decode()
        assert 'serve_model_ready{model="slow"} 0.0' in scraped, scraped
        assert 'serve_requests_total{model="slow",outcome="unavailable"} 1.0' in scraped, scraped
        server.terminate()
        code = server.wait(120)
        output = server.output()
    assert code == 0, output
    assert "signal received while loading models; stopping" in output
    assert "loaded from" not in output and "ready:" not in output, output
    assert "Traceback" not in output


def test_an_open_health_watch_does_not_hold_the_shutdown(
    classifier_path: Path, tmp_path: Path
) -> None:
    """A health Watch never ends by itself; gRPC's stop waits for open calls, so before the
    fix one watcher kept an idle server alive for its whole --grace."""
    port = free_port()
    args = [str(classifier_path), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--device", "cpu", "--grace", "300"]  # fmt: skip
    with ServeProcess(args, port, tmp_path / "serve.log") as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(watch).status == SERVING
            server.terminate()
            seen = [reply.status for reply in watch]  # ends when the server ends the stream
            assert watch.code() == grpc.StatusCode.OK
        # Well inside the 300 s grace: nothing was in flight.
        assert server.wait(120) == 0, server.output()
        log = server.output()
    assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert "Traceback" not in log and "Exception" not in log, log


def _spinning_model(path: Path) -> Path:
    """Input [batch, 4] → logits [batch, 3]; every run also spins a Loop as many steps as the
    batch's largest value (about a microsecond each): zeros, as at warm-up, take no time."""
    body = _empty_loop_body()
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["input"], ["top"], keepdims=0),
            helper.make_node("Cast", ["top"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "", "zero"], ["spent"], body=body),
            helper.make_node("MatMul", ["input", "w"], ["raw"]),
            helper.make_node("Add", ["raw", "spent"], ["logits"]),
        ],
        "spin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(np.ones((4, 3), np.float32), "w"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has used so far (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_batch_running_past_the_grace_period_does_not_hold_or_abort_the_exit(
    tmp_path: Path,
) -> None:
    """The server used to wait 10 s more for the batch, then exit while ONNX Runtime still
    ran it: "terminate called without an active exception", SIGABRT instead of exit 0."""
    model = _spinning_model(tmp_path / "spin.onnx")
    port = free_port()
    args = [str(model), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
            "--device", "cpu", "--intra-op-threads", "1", "--max-batch-size", "4",
            "--grace", "1"]  # fmt: skip
    spin = np.zeros((1, 4), np.float32)
    spin[0, 0] = 1e9  # a Loop of minutes

    async def scenario(server: ServeProcess) -> object:
        assert server.proc is not None
        idle = _cpu_seconds(server.proc.pid)
        async with aio.insecure_channel(server.target) as channel:
            call = asyncio.ensure_future(_infer(channel, infer_payload("spin", spin)))
            # Running once the idle server has spent 0.3 s of CPU more: a fixed sleep could end
            # before a loaded machine delivered the call, and then no batch was running.
            until = time.monotonic() + 60
            while _cpu_seconds(server.proc.pid) < idle + 0.3:
                assert time.monotonic() < until, "the batch did not start within 60 s"
                await asyncio.sleep(0.05)
            server.terminate()
            return await call

    with ServeProcess(args, port, tmp_path / "serve.log") as server:
        answer = asyncio.run(scenario(server))
        code = server.wait(60)
        log = server.output()
    assert code == 0, log
    assert answer == grpc.StatusCode.UNAVAILABLE
    assert "1 batch still running when the grace period ended" in log, log
    assert "terminate called" not in log and "Traceback" not in log, log
