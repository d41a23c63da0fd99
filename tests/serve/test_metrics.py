"""serve/metrics.py: the registry on its own, its HTTP endpoint, and counts after real traffic."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import classifier_pb2, kserve_pb2
from serve.background import BackgroundServer
from serve.metrics import OUTCOMES, Metrics
from tests.serve.conftest import free_port, plant_counting_bug, reference
from tests.serve.v2 import INFER, infer_payload, reply_logits, request_counts, samples


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counts_and_histograms_follow_the_calls() -> None:
    m = Metrics()
    m.model_ready("digits", True)
    for _ in range(3):
        m.request("digits", "success", 0.01)
    m.request("digits", "invalid", 0.001)
    m.queued("digits", 0.002)
    m.batch("digits", 3, 0.004)
    m.batch("digits", 5, 0.004)
    m.watch_queue("digits", lambda: 7)
    got = _samples(m.render().decode())
    assert got[("serve_requests_total", (("model", "digits"), ("outcome", "success")))] == 3
    assert got[("serve_requests_total", (("model", "digits"), ("outcome", "invalid")))] == 1
    assert got[("serve_requests_total", (("model", "digits"), ("outcome", "deadline")))] == 0
    assert got[("serve_request_duration_seconds_count", (("model", "digits"),))] == 4
    assert got[("serve_queue_duration_seconds_count", (("model", "digits"),))] == 1
    assert got[("serve_batch_size_sum", (("model", "digits"),))] == 8
    assert got[("serve_batch_size_count", (("model", "digits"),))] == 2
    assert got[("serve_compute_duration_seconds_count", (("model", "digits"),))] == 2
    assert got[("serve_queue_depth", (("model", "digits"),))] == 7
    assert got[("serve_model_ready", (("model", "digits"),))] == 1
    m.model_ready("digits", False)
    assert _samples(m.render().decode())[("serve_model_ready", (("model", "digits"),))] == 0


def test_model_ready_creates_every_outcome_at_zero() -> None:
    m = Metrics()
    m.model_ready("a", True)
    got = _samples(m.render().decode())
    for outcome in OUTCOMES:
        assert got[("serve_requests_total", (("model", "a"), ("outcome", outcome)))] == 0


def test_no_created_series_beside_the_documented_ones() -> None:
    m = Metrics()
    m.model_ready("a", True)
    m.request("a", "success", 0.01)
    m.batch("a", 2, 0.004)
    text = m.render().decode()
    assert "_created" not in text
    assert "serve_requests_total" in text


def test_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.request("m", "success", 0.1)
    assert b'model="m"' in a.render()
    assert b'model="m"' not in b.render()


def test_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="expected an outcome in"):
        Metrics().request("m", "ok", 0.1)


def test_http_endpoint_serves_and_closes() -> None:
    m = Metrics()
    m.request("m", "rejected", 0.5)
    port = free_port()
    m.serve_http("127.0.0.1", port)
    try:
        assert m.http_port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        got = _samples(text)
        assert got[("serve_requests_total", (("model", "m"), ("outcome", "rejected")))] == 1
    finally:
        m.close()
    m.close()  # a second close is harmless
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_http_endpoint_answers_at_metrics_only_and_to_head() -> None:
    # Every path used to answer with the metrics, so an HTTP readiness probe pointed at this
    # port by mistake (Triton's /v2/health/ready) passed while loading and draining; HEAD
    # got 405.
    m = Metrics()
    m.model_ready("m", False)
    port = free_port()
    m.serve_http("127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    try:
        for path in ("/", "/v2/health/ready", "/metrics/", "/metricsx", "/favicon.ico"):
            for method in ("GET", "HEAD"):
                request = urllib.request.Request(base + path, method=method)
                with pytest.raises(urllib.error.HTTPError) as missing:
                    urllib.request.urlopen(request, timeout=10)
                assert missing.value.code == 404, (method, path)
                body = missing.value.read()
                assert body == b"" if method == "HEAD" else b"at /metrics only" in body, body
        head = urllib.request.Request(f"{base}/metrics", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            length = int(r.headers["Content-Length"])
            assert r.read() == b""
        with urllib.request.urlopen(f"{base}/metrics?x=1", timeout=10) as r:
            text = r.read()
        assert len(text) == length
        assert _samples(text.decode())[("serve_model_ready", (("model", "m"),))] == 0
    finally:
        m.close()


def test_port_zero_disables_http() -> None:
    m = Metrics()
    m.serve_http("127.0.0.1", 0)
    assert m.http_port is None
    m.close()


def test_busy_port_gives_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match="--metrics-port"):
            Metrics().serve_http("127.0.0.1", port)


# --- a real server: counts after known traffic ------------------------------------------------


def _call(channel: grpc.Channel, payload: bytes) -> grpc.StatusCode:
    return _call_method(channel, INFER, payload)


def _call_method(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    try:
        channel.unary_unary(method)(payload, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


CLASSIFY = "/classifier.v1.Classifier/Classify"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_scrape_matches_the_traffic_sent(start_server, classifier_path) -> None:
    metrics_port = free_port()
    bg = start_server(metrics_port=metrics_port)
    rng = np.random.default_rng(3)
    row_counts = [1, 2, 3, 5, 8, 13]  # 13 > max batch 8: split in two batches
    bad_shape = rng.normal(size=(2, 3, 7, 8)).astype(np.float32)
    codes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        for rows in row_counts:
            batch = rng.normal(size=(rows, 3, 8, 8)).astype(np.float32)
            codes.append(_call(channel, infer_payload("tiny", batch)))
        for _ in range(4):
            codes.append(_call(channel, infer_payload("tiny", bad_shape)))
        for _ in range(3):
            codes.append(_call(channel, infer_payload("missing", bad_shape)))
        bad_version = kserve_pb2.ModelInferRequest.FromString(
            infer_payload("tiny", bad_shape[:1, :, :, :])
        )
        bad_version.model_version = "7"
        codes.append(_call(channel, bad_version.SerializeToString()))
    status = grpc.StatusCode
    assert codes == [status.OK] * 6 + [status.INVALID_ARGUMENT] * 4 + [status.NOT_FOUND] * 4

    text = _scrape(metrics_port)
    counts = request_counts(text)
    assert counts[("tiny", "success")] == 6
    assert counts[("tiny", "invalid")] == 4
    assert counts[("tiny", "not_found")] == 1  # a known model at an unknown version
    assert counts[("_unknown", "not_found")] == 3
    for outcome in ("rejected", "deadline", "cancelled", "unavailable", "internal"):
        assert counts[("tiny", outcome)] == 0
    assert samples(text, "serve_request_duration_seconds_count", "tiny") == 11
    # One queue wait per queued piece: the 13-row request is queued as 8 + 5.
    assert samples(text, "serve_queue_duration_seconds_count", "tiny") == 7
    assert samples(text, "serve_batch_size_sum", "tiny") == sum(row_counts)
    batches = samples(text, "serve_batch_size_count", "tiny")
    assert batches == samples(text, "serve_compute_duration_seconds_count", "tiny")
    assert batches >= 7  # sequential calls: no two requests share a batch
    assert samples(text, "serve_model_ready", "tiny") == 1
    assert samples(text, "serve_queue_depth", "tiny") == 0


def _bounds(text: str, histogram: str, model: str) -> list[float]:
    """The upper bounds of ``histogram``'s buckets for ``model``, in order."""
    return [
        float(s.labels["le"])
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == f"{histogram}_bucket" and s.labels["model"] == model
    ]


def test_latency_histograms_resolve_a_tenth_of_a_millisecond(start_server) -> None:
    # An idle queue's wait and a small model's batch take well under half a millisecond, the
    # old first bound: every observation fell in one bucket, and histogram_quantile read
    # 0.25 ms and 0.5 ms as p50 and p99 whatever the truth.
    metrics_port = free_port()
    bg = start_server(metrics_port=metrics_port)
    x = np.zeros((1, 3, 8, 8), np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        codes = [_call(channel, infer_payload("tiny", x)) for _ in range(5)]
    assert codes == [grpc.StatusCode.OK] * 5
    text = _scrape(metrics_port)
    for histogram in (
        "serve_request_duration_seconds",
        "serve_queue_duration_seconds",
        "serve_compute_duration_seconds",
    ):
        bounds = _bounds(text, histogram, "tiny")
        assert bounds[:3] == [0.0001, 0.00025, 0.0005], histogram
        assert bounds[-2:] == [30.0, float("inf")], histogram
        assert samples(text, f"{histogram}_count", "tiny") == 5


def test_unknown_models_share_series_that_exist_before_the_first_one(start_server) -> None:
    # The _unknown series used to appear with the first unknown request, at 1: rate() and
    # increase() never saw that first one, so an alert on them missed a misconfigured client
    # until its second request.
    metrics_port = free_port()
    bg = start_server(metrics_port=metrics_port)
    before = _scrape(metrics_port)
    unknown = {o: n for (m, o), n in request_counts(before).items() if m == "_unknown"}
    assert unknown == dict.fromkeys(OUTCOMES, 0.0)
    assert samples(before, "serve_request_duration_seconds_count", "_unknown") == 0
    x = np.zeros((1, 3, 8, 8), np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        codes = {_call(channel, infer_payload(f"made-up-{i}", x)) for i in range(20)}
        classify = classifier_pb2.ClassifyRequest(model="made-up-classify")
        codes.add(_call_method(channel, CLASSIFY, classify.SerializeToString()))
        stream = channel.stream_stream(STREAM)(iter([infer_payload("made-up-stream", x)]))
        (answer,) = list(stream)
    assert codes == {grpc.StatusCode.NOT_FOUND}
    assert "made-up-stream" in kserve_pb2.ModelStreamInferResponse.FromString(answer).error_message
    after = _scrape(metrics_port)
    assert request_counts(after)[("_unknown", "not_found")] == 22
    labelled = {
        s.labels["model"]
        for family in text_string_to_metric_families(after)
        for s in family.samples
        if "model" in s.labels
    }
    assert labelled == {"tiny", "_unknown"}
    assert _samples(after).keys() == _samples(before).keys()  # no series added by the names


def test_a_bug_in_counting_a_request_costs_no_client_its_answer(
    start_server, classifier_path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    bg = start_server()
    planted = plant_counting_bug(bg, monkeypatch)
    caplog.set_level(logging.WARNING)
    x = np.random.default_rng(4).normal(size=(3, 3, 8, 8)).astype(np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        infer = channel.unary_unary(INFER)
        replies = [infer(infer_payload("tiny", x, f"r{i}"), timeout=10) for i in range(2)]
    assert planted == [grpc.StatusCode.OK]
    for i, reply in enumerate(replies):
        ident, logits = reply_logits(reply)
        assert ident == f"r{i}"
        np.testing.assert_allclose(logits, reference(classifier_path, x), atol=1e-5)
    assert bg.server is not None and bg.server.state.in_flight == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["counting a request to model tiny failed"]
    counts = request_counts(bg.server.metrics.render().decode())
    assert counts[("tiny", "success")] == 1  # the second; the first's count was the bug


def _settle(server: BackgroundServer, in_flight: int = 0) -> None:
    """Wait (up to 10 s) until ``in_flight`` requests are left in ``server``."""
    assert server.server is not None
    until = time.monotonic() + 10
    while server.server.state.in_flight != in_flight and time.monotonic() < until:
        time.sleep(0.01)
    assert server.server.state.in_flight == in_flight


def _request_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]


def test_a_deadline_passing_in_the_queue_is_counted_as_deadline_not_cancelled(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    # gRPC cancels the handler when the deadline passes, long before the 10 s batch window
    # closes and the batcher could answer DEADLINE_EXCEEDED itself: that cancel used to be
    # counted as the client's own. The deadline leaves a loaded machine time to deliver the
    # request first (with 0.3 s it could expire in the client, and the server counted none).
    caplog.set_level(logging.DEBUG)
    bg = start_server(max_queue_delay_us=10_000_000)
    x = np.zeros((1, 3, 8, 8), np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        infer = channel.unary_unary(INFER)
        hasty = infer.future(infer_payload("tiny", x), timeout=2)
        assert hasty.exception(timeout=30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _settle(bg)
        withdrawn = infer.future(infer_payload("tiny", x), timeout=60)
        _settle(bg, in_flight=1)  # queued in the open batch window
        assert withdrawn.cancel()
        _settle(bg)
    assert bg.server is not None
    counts = request_counts(bg.server.metrics.render().decode())
    assert counts[("tiny", "deadline")] == 1
    assert counts[("tiny", "cancelled")] == 1
    statuses = [re.search(r"status=(\S+)", line)[1] for line in _request_lines(caplog)]
    assert statuses == ["DEADLINE_EXCEEDED", "CANCELLED"]


def test_queue_depth_reads_zero_once_queued_requests_are_withdrawn_or_expire(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bg = start_server()
    assert bg.server is not None
    batcher = bg.server.models["tiny"].batcher
    entered, release = threading.Event(), threading.Event()
    run = batcher.runtime.run

    def held_run(batch: np.ndarray) -> np.ndarray:
        entered.set()
        release.wait(30)
        return run(batch)

    monkeypatch.setattr(batcher.runtime, "run", held_run)  # the one instance stays busy

    def depth() -> float:
        return samples(bg.server.metrics.render().decode(), "serve_queue_depth", "tiny")

    one, thirteen = np.zeros((1, 3, 8, 8), np.float32), np.zeros((13, 3, 8, 8), np.float32)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
            infer = channel.unary_unary(INFER)
            busy = infer.future(infer_payload("tiny", one), timeout=60)
            assert entered.wait(30)
            withdrawn = infer.future(infer_payload("tiny", thirteen), timeout=60)  # 2 pieces
            # Long enough to be queued before it expires on a loaded machine.
            expired = infer.future(infer_payload("tiny", one), timeout=3)
            until = time.monotonic() + 10
            while batcher.depth < 3 and time.monotonic() < until:
                time.sleep(0.01)
            assert depth() == 3
            assert withdrawn.cancel()
            assert expired.exception(timeout=30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
            _settle(bg, in_flight=1)
            release.set()
            assert busy.exception(timeout=30) is None
            until = time.monotonic() + 10  # the instance drops the two, then idles
            while depth() != 0 and time.monotonic() < until:
                time.sleep(0.01)
            assert depth() == 0
            assert batcher.depth == 0
    finally:
        release.set()
    counts = request_counts(bg.server.metrics.render().decode())
    assert counts[("tiny", "success")] == 1
    assert counts[("tiny", "cancelled")] == 1
    assert counts[("tiny", "deadline")] == 1


def test_queue_depth_counts_the_request_that_did_not_fit_the_last_batch(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken from the queue and held back for the next batch, that request waits like the
    # others, but the gauge (qsize) no longer counted it: under steady load it read one low.
    bg = start_server()
    assert bg.server is not None
    batcher = bg.server.models["tiny"].batcher
    runs: list[int] = []
    gate = threading.Semaphore(0)
    run = batcher.runtime.run

    def held_run(batch: np.ndarray) -> np.ndarray:
        runs.append(len(batch))
        gate.acquire(timeout=30)
        return run(batch)

    monkeypatch.setattr(batcher.runtime, "run", held_run)

    def depth() -> float:
        return samples(bg.server.metrics.render().decode(), "serve_queue_depth", "tiny")

    def wait_for(condition) -> None:
        until = time.monotonic() + 10
        while not condition() and time.monotonic() < until:
            time.sleep(0.01)
        assert condition()

    one, five = np.zeros((1, 3, 8, 8), np.float32), np.zeros((5, 3, 8, 8), np.float32)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
            infer = channel.unary_unary(INFER)
            first = infer.future(infer_payload("tiny", one), timeout=60)
            wait_for(lambda: len(runs) == 1)
            later = [infer.future(infer_payload("tiny", five), timeout=60) for _ in range(2)]
            wait_for(lambda: depth() == 2)
            gate.release()  # the first ends; 5 + 5 rows exceed the max batch of 8
            wait_for(lambda: len(runs) == 2)
            assert depth() == 1  # the second five-row request still waits
            for _ in range(2):
                gate.release()
            assert [f.exception(timeout=30) for f in (first, *later)] == [None] * 3
    finally:
        for _ in range(3):
            gate.release()
    assert depth() == 0
    assert len(runs) == 3  # one request per batch: the held one ran alone
