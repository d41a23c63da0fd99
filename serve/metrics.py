"""Prometheus metrics for the server, on a registry of their own, served over HTTP."""

from __future__ import annotations

import errno
import functools
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import TCPServer, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from serve.config import listen_addresses
from serve.errors import OUTCOMES, UNKNOWN_MODEL
from serve.statistics import Tally

_log = logging.getLogger(__name__)

# Latencies from a tenth of a millisecond to tens of seconds (a stuck queue): an idle queue's
# wait and a small model's batch take well under half a millisecond, and with 0.5 ms as the
# first bound every such observation fell in one bucket (histogram_quantile read 0.25 ms and
# 0.5 ms as p50 and p99 whatever the truth).
_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
)
# Powers of two, the bucket sizes the batcher pads to.
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Outcomes of requests refused before they reached a served model version (a wrong version, a
# missing token, a server not taking requests): Triton's ModelStatistics leave them out of the
# model's ``fail``, as its ``nv_inference_request_failure`` reasons do (rejected, canceled,
# backend, timeout, other). Prometheus still counts them under the model's name.
_REFUSED = frozenset({"not_found", "unauthenticated", "unavailable"})
_PATH = "/metrics"
_NOT_FOUND = f"404 Not Found: this port serves Prometheus metrics at {_PATH} only\n".encode()

_ALLOW = "OPTIONS, GET, HEAD"

_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# A bind that fails with these concerns that one address (an IPv6 one where the kernel has IPv6
# off): the others still serve, as gRPC does. A taken port is no such case.
_ADDRESS_ABSENT = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})
# A connection that sends no request within this many seconds is closed. Without it each idle
# or stalled one (a scraper gone without closing, a slow client) held a thread for ever: 200
# idle connections, 200 threads. Prometheus's scrape timeout defaults to 10 s.
_IDLE_S = 30.0


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        self.timeout = _IDLE_S  # set on the connection's socket by setup
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: a scrape every few seconds


class _HTTPServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, for the one address family it listens on."""

    daemon_threads = True

    def __init__(self, family: socket.AddressFamily, address: tuple[Any, ...]) -> None:
        self.address_family = family
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's looks the address up in reverse DNS (socket.getfqdn) for SERVER_NAME,
        # which nothing here reads: on a host whose resolver does not answer, start-up waited
        # out its timeouts once per address.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver printed a traceback on stderr when a client reset its connection or
        # timed out mid-request: lines of their own, outside --log-format json.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            _log.debug("metrics connection from %s ended: %s", client_address, error)
        else:
            _log.error("metrics request from %s failed, a bug", client_address, exc_info=True)


def _allowing_head(
    start_response: Callable[..., Any], status: str, headers: list[tuple[str, str]], *rest: Any
) -> Any:
    # prometheus_client's OPTIONS and 405 answers list the methods it takes itself (Allow:
    # OPTIONS,GET): HEAD, answered here, must be among them.
    headers = [(k, _ALLOW if k.lower() == "allow" else v) for k, v in headers]
    return start_response(status, headers, *rest)


def _metrics_only(app: _WSGIApp) -> _WSGIApp:
    """prometheus_client's WSGI ``app``, at ``/metrics`` only and answering HEAD too.

    Its default answered every path with the metrics, so an HTTP probe pointed at this port
    by mistake (Triton's ``/v2/health/ready`` lives on an HTTP port this server has not)
    passed while the models loaded and while the server drained; HEAD (``curl -I``, uptime
    checks) got 405, though HTTP asks every server to answer HEAD where it answers GET."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        head = environ["REQUEST_METHOD"] == "HEAD"
        if environ.get("PATH_INFO") != _PATH:
            length = str(len(_NOT_FOUND))
            start_response(
                "404 Not Found",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", length)],
            )
            return [] if head else [_NOT_FOUND]
        if not head:
            return app(environ, functools.partial(_allowing_head, start_response))
        answered: list[tuple[str, list[tuple[str, str]]]] = []
        body = b"".join(
            app({**environ, "REQUEST_METHOD": "GET"}, lambda *a: answered.append(a[:2]))
        )
        status, headers = answered[0]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return []

    return serve


class _Registry(CollectorRegistry):
    """A registry without prometheus_client's ``*_created`` timestamp series, one beside
    every counter and histogram child: they doubled the series scraped, and nothing (our
    queries, Triton's dashboards) reads them. prometheus_client's own switch is process-wide."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """The server's metrics: one instance per server, each with its own registry.

    Names (all labelled by ``model``):
    ``serve_requests_total{outcome}`` (counter), ``serve_request_duration_seconds``,
    ``serve_queue_duration_seconds``, ``serve_compute_duration_seconds``,
    ``serve_batch_size`` (histogram of real rows per executed batch),
    ``serve_queue_depth`` and ``serve_model_ready`` (gauges). Requests naming no served
    model are counted under ``UNKNOWN_MODEL``, whose series exist at zero from the start.
    """

    def __init__(self) -> None:
        self.registry = _Registry(auto_describe=True)
        self._requests = Counter(
            "serve_requests",
            "Finished inference requests by model and outcome.",
            ("model", "outcome"),
            registry=self.registry,
        )
        self._request_seconds = Histogram(
            "serve_request_duration_seconds",
            "Time from receiving an inference request to answering it.",
            ("model",),
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._queue_seconds = Histogram(
            "serve_queue_duration_seconds",
            "Time a request waited between being queued and its batch starting.",
            ("model",),
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._compute_seconds = Histogram(
            "serve_compute_duration_seconds",
            "Time ONNX Runtime spent on one batch.",
            ("model",),
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._batch_rows = Histogram(
            "serve_batch_size",
            "Real (unpadded) rows per executed batch; mean batch size is _sum / _count.",
            ("model",),
            buckets=_ROWS_BUCKETS,
            registry=self.registry,
        )
        self._queue_depth = Gauge(
            "serve_queue_depth",
            "Requests waiting in the model's queue.",
            ("model",),
            registry=self.registry,
        )
        self._model_ready = Gauge(
            "serve_model_ready",
            "1 when the model is loaded, warmed up and accepting requests, else 0.",
            ("model",),
            registry=self.registry,
        )
        # One HTTP server per address the host resolves to, each with its thread.
        self._http: list[tuple[WSGIServer, threading.Thread]] = []
        # Labelled children by label values: ``labels()`` builds and locks on every call,
        # and the hot path calls these several times per request.
        self._children: dict[tuple[int | str, ...], Any] = {}
        # Triton's ModelStatistics totals, per served model (``model_ready`` adds them).
        self._tallies: dict[str, Tally] = {}
        # Requests to unknown models can come before any model is ready (while loading).
        self._zero_requests(UNKNOWN_MODEL)

    def _child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, model: str, outcome: str, seconds: float) -> None:
        """Count one finished inference request and observe its latency."""
        if outcome not in OUTCOMES:
            raise ValueError(f"expected an outcome in {OUTCOMES}, got {outcome!r}; use one of them")
        self._child(self._requests, model, outcome).inc()
        self._child(self._request_seconds, model).observe(seconds)
        tally = self._tallies.get(model)
        if tally is not None:
            if outcome == "success":
                tally.request(True, seconds)
            elif outcome not in _REFUSED:
                tally.request(False, seconds)

    def queued(self, model: str, seconds: float) -> None:
        """Observe how long one request (or piece of one) waited from enqueue to its batch."""
        self._child(self._queue_seconds, model).observe(seconds)

    def batch(self, model: str, rows: int, seconds: float, collate_s: float = 0.0) -> None:
        """Observe one executed batch: its real rows, its compute and collate times."""
        self._child(self._batch_rows, model).observe(rows)
        self._child(self._compute_seconds, model).observe(seconds)
        tally = self._tallies.get(model)
        if tally is not None:
            tally.batch(rows, collate_s, seconds)

    def served(self, model: str, queue_s: float, collate_s: float, compute_s: float) -> None:
        """Add one answered request's queue and compute times to the ModelStatistics totals."""
        tally = self._tallies.get(model)
        if tally is not None:
            tally.served(queue_s, collate_s, compute_s)

    def statistics(self, model: str) -> Tally | None:
        """The ModelStatistics totals of ``model``, None for a name never loaded."""
        return self._tallies.get(model)

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        """Report ``depth()``, the requests waiting in the model's queue, at each scrape.

        Read when scraped, the gauge is never stale: set by each of its writers (a submit, an
        instance taking a batch), it could be left at 1 over an empty queue until the next
        request, and it cost a lock per request."""
        self._queue_depth.labels(model).set_function(depth)

    def model_ready(self, model: str, ready: bool) -> None:
        """Set whether the model accepts requests; also makes its series appear at zero."""
        self._model_ready.labels(model).set(1 if ready else 0)
        self._tallies.setdefault(model, Tally())
        self._zero_requests(model)
        self._queue_seconds.labels(model)
        self._compute_seconds.labels(model)
        self._batch_rows.labels(model)
        self._queue_depth.labels(model)

    def _zero_requests(self, model: str) -> None:
        # Zero-valued series from the start: rate() and increase() miss the first increase of
        # a series that is born at 1.
        for outcome in OUTCOMES:
            self._requests.labels(model, outcome)
        self._request_seconds.labels(model)

    def serve_http(self, host: str, port: int) -> None:
        """Serve ``/metrics`` over HTTP on ``host:port`` in daemon threads, on every address
        ``host`` resolves to (``localhost``: 127.0.0.1 and ::1, as gRPC binds); port 0
        disables it."""
        if port == 0:
            return
        if self._http:
            raise RuntimeError("expected serve_http to be called once, got a second call")
        app = _metrics_only(make_wsgi_app(self.registry))
        refusal: OSError | None = None
        try:
            # prometheus_client's start_http_server bound the first address alone: with
            # `--host localhost` gRPC answered on ::1 and the metrics port did not.
            for family, address in listen_addresses(host, port):
                try:
                    server = _HTTPServer(family, address)
                except OSError as e:
                    if e.errno not in _ADDRESS_ABSENT:
                        raise
                    refusal = refusal or e
                    continue
                server.set_app(app)
                thread = threading.Thread(
                    target=server.serve_forever, name="metrics-http", daemon=True
                )
                thread.start()
                self._http.append((server, thread))
            if not self._http:
                raise refusal or OSError(errno.EADDRNOTAVAIL, "no address to bind")
        except OSError as e:
            self.close()
            raise OSError(
                f"expected a free metrics port, got {host}:{port} unavailable "
                f"({e.strerror or e}); pass another --metrics-port or --host, or 0 to disable "
                "metrics"
            ) from e

    @property
    def http_port(self) -> int | None:
        """The port ``/metrics`` is served on, or None when not serving."""
        return self._http[0][0].server_port if self._http else None

    def render(self) -> bytes:
        """The current metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Stop the HTTP endpoint, if started; safe to call more than once."""
        while self._http:
            server, thread = self._http.pop()
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

