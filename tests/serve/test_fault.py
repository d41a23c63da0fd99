"""Fault injection against one `python -m serve` subprocess, bounded to about a minute.

Many concurrent clients send a fixed set of requests: valid ones (distinct inputs and ids),
10 % malformed, 10 % cancelled by the client, 5 % with deadlines far too short. Every request
must end in its exact status, every valid answer must be the caller's own (compared with a
local ONNX Runtime run), and the server's metrics must agree with the client's tally. Then,
with requests still arriving, SIGTERM: each late request is answered correctly or refused with
UNAVAILABLE, and the server exits 0.

The three request families use three names for the same model (tiny, cancel, deadline), so
the server's per-model counts can be compared exactly where the client knows the outcome
(tiny) and bounded where it cannot (a cancelled call may finish on the server first).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc import aio

from protos import kserve_pb2
from tests.serve.conftest import free_ports, reference
from tests.serve.procs import ServeProcess
from tests.serve.v2 import INFER, infer_payload, reply_logits, request_counts, samples

TOTAL = 1200
CLIENTS = 32
CHANNELS = 4
LATE = 96  # requests sent around SIGTERM
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class Spec:
    index: int
    kind: str  # valid | malformed | cancelled | deadline
    model: str
    payload: bytes
    rows: np.ndarray | None  # the input of a valid request


@dataclass
class Result:
    spec: Spec
    code: grpc.StatusCode
    reply: bytes | None = None
    details: str = ""
    cancel_took: bool | None = None  # for cancelled: whether cancel() came before the answer


def _malformed(index: int, rows: np.ndarray) -> bytes:
    request = kserve_pb2.ModelInferRequest.FromString(infer_payload("tiny", rows, str(index)))
    variant = index % 5
    if variant == 0:  # wrong image size, bytes consistent with it
        request.inputs[0].shape[:] = [len(rows), 3, 4, 16]
    elif variant == 1:
        request.inputs[0].datatype = "FP64"
    elif variant == 2:  # one float short
        request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    elif variant == 3:
        request.inputs[0].name = "pixels"
    else:
        request.outputs.add(name="probabilities")
    return request.SerializeToString()


def _specs(seed: int) -> list[Spec]:
    rng = np.random.default_rng(seed)
    kinds = ["malformed"] * (TOTAL // 10) + ["cancelled"] * (TOTAL // 10)
    kinds += ["deadline"] * (TOTAL // 20)
    kinds += ["valid"] * (TOTAL - len(kinds))
    order = rng.permutation(len(kinds))
    specs = []
    for index, k in enumerate(order):
        kind = kinds[k]
        rows = rng.normal(size=(int(rng.integers(1, 5)), 3, 8, 8)).astype(np.float32)
        if kind == "malformed":
            specs.append(Spec(index, kind, "tiny", _malformed(index, rows), None))
        else:
            model = {"valid": "tiny", "cancelled": "cancel", "deadline": "deadline"}[kind]
            specs.append(Spec(index, kind, model, infer_payload(model, rows, str(index)), rows))
    return specs


async def _run_one(channel: aio.Channel, spec: Spec, rand: random.Random) -> Result:
    call = channel.unary_unary(INFER)(
        spec.payload, timeout=0.0001 if spec.kind == "deadline" else 60
    )
    cancel_took = None
    if spec.kind == "cancelled":
        await asyncio.sleep(rand.uniform(0, 0.003))
        cancel_took = call.cancel()
    try:
        reply = await call
    except asyncio.CancelledError:
        return Result(spec, grpc.StatusCode.CANCELLED, None, "cancelled", cancel_took)
    except aio.AioRpcError as e:
        return Result(spec, e.code(), None, e.details() or "", cancel_took)
    return Result(spec, OK, reply, "", cancel_took)


async def _drive(channels: list[aio.Channel], specs: list[Spec], seed: int) -> list[Result]:
    queue: asyncio.Queue[Spec] = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)
    results: list[Result] = []

    async def client(n: int) -> None:
        rand = random.Random(seed * 1000 + n)
        while not queue.empty():
            spec = queue.get_nowait()
            results.append(await _run_one(channels[n % len(channels)], spec, rand))

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return results


def _check_answer(result: Result, expected: np.ndarray) -> None:
    assert result.reply is not None
    request_id, logits = reply_logits(result.reply)
    assert request_id == str(result.spec.index), "answered to the wrong caller"
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_mixed_faults_then_sigterm(classifier_path: Path, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    for name in ("tiny", "cancel", "deadline"):
        (repository / name / "1").mkdir(parents=True)
        shutil.copy(classifier_path, repository / name / "1" / "model.onnx")
    port, metrics_port = free_ports(2)
    args = [
        "--model-repository", str(repository), "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--device", "cpu", "--intra-op-threads", "1",
        "--max-batch-size", "16", "--max-queue-size", "4096", "--grace", "30",
    ]
    specs = _specs(seed=5)
    late = [s for s in _specs(seed=6) if s.kind == "valid"][:LATE]
    late = [Spec(TOTAL + i, "valid", "tiny", infer_payload("tiny", s.rows, str(TOTAL + i)),
                 s.rows) for i, s in enumerate(late)]

    async def scenario(server: ServeProcess) -> tuple[list[Result], str, list[Result]]:
        channels = [aio.insecure_channel(server.target) for _ in range(CHANNELS)]
        try:
            results = await _drive(channels, specs, seed=5)
            with urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=30
            ) as r:
                scraped = r.read().decode()
            rand = random.Random(7)
            first = [
                asyncio.ensure_future(_run_one(channels[i % CHANNELS], s, rand))
                for i, s in enumerate(late[: LATE // 2])
            ]
            await asyncio.sleep(0.005)
            server.terminate()
            second = await _drive(channels, late[LATE // 2 :], seed=8)
            return results, scraped, [*await asyncio.gather(*first), *second]
        finally:
            for channel in channels:
                await channel.close()

    with ServeProcess(args, port, tmp_path / "serve.log") as server:
        results, scraped, late_results = asyncio.run(scenario(server))
        assert server.wait(60) == 0, server.output()
    assert "Traceback" not in server.output()

    # Every request ended exactly once, in its exact status.
    assert sorted(r.spec.index for r in results) == list(range(TOTAL))
    valid = [r for r in results if r.spec.kind == "valid"]
    expected = {r.spec.index: r.spec.rows for r in valid}
    batch = np.concatenate([rows for rows in expected.values()])
    logits = reference(classifier_path, batch)
    offset = 0
    for r in valid:
        count = len(r.spec.rows)
        assert r.code == OK, f"valid request {r.spec.index} got {r.code}"
        _check_answer(r, logits[offset : offset + count])
        offset += count
    for r in results:
        if r.spec.kind == "malformed":
            assert r.code == INVALID, f"malformed request {r.spec.index} got {r.code}"
        elif r.spec.kind == "deadline":
            assert r.code == grpc.StatusCode.DEADLINE_EXCEEDED, r.code
        elif r.spec.kind == "cancelled":
            if r.cancel_took:
                assert r.code == grpc.StatusCode.CANCELLED, r.code
            else:  # answered before the client got to cancel: must be its own answer
                assert r.code == OK, r.code
                _check_answer(r, reference(classifier_path, r.spec.rows))
    tally = Counter((r.spec.kind, r.code) for r in results)

    # The server's metrics agree with the client's tally.
    counts = request_counts(scraped)
    assert counts[("tiny", "success")] == tally[("valid", OK)] == len(valid)
    assert counts[("tiny", "invalid")] == tally[("malformed", INVALID)] == TOTAL // 10
    for outcome in ("not_found", "rejected", "deadline", "cancelled", "unavailable", "internal"):
        assert counts[("tiny", outcome)] == 0, outcome
    assert samples(scraped, "serve_batch_size_sum", "tiny") == len(batch)
    assert samples(scraped, "serve_model_ready", "tiny") == 1
    for model, kind in (("cancel", "cancelled"), ("deadline", "deadline")):
        # The server sees at most every such call (some die in the client), and it finished
        # at least those the client got answers for.
        seen = sum(v for (m, _), v in counts.items() if m == model)
        assert seen <= sum(1 for r in results if r.spec.kind == kind)
        assert counts[(model, "success")] >= tally[(kind, OK)]
        for outcome in ("invalid", "not_found", "rejected", "internal"):
            assert counts[(model, outcome)] == 0, (model, outcome)
    # The unknown-model series exist at zero from the start; none may have counted anything.
    assert not any(v for (m, _), v in counts.items() if m == "_unknown")

    # Around SIGTERM: the right answer, or UNAVAILABLE; nothing else, nothing lost.
    assert sorted(r.spec.index for r in late_results) == [s.index for s in late]
    for r in late_results:
        if r.code == OK:
            _check_answer(r, reference(classifier_path, r.spec.rows))
        else:
            assert r.code == grpc.StatusCode.UNAVAILABLE, (r.code, r.details)
