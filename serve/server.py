"""The gRPC server: owns models, batchers, health, reflection and metrics; starts and drains."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2

from serve import affinity, classify, kserve, reflection, security
from serve.batcher import Batcher
from serve.classify import ClassifierServicer
from serve.config import ServerConfig, listen_addresses
from serve.halfclose import OneRequest
from serve.metrics import Metrics
from serve.model_info import ModelInfo, read_model_info
from serve.repository import find_models
from serve.runtime import Runtime
from serve.state import Model, ServingState

_log = logging.getLogger(__name__)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Drain ends once no request arrived for this long (see ServingState.wait_quiet).
_QUIET_S = 0.2
_INFERENCE_METHODS = (
    f"/{kserve.SERVICE}/ModelInfer",
    f"/{kserve.SERVICE}/ModelStreamInfer",
    "/classifier.v1.Classifier/Classify",
)
# Client keepalive pings accepted as often as every 0.5 s, with or without calls. gRPC's
# default (one per 5 minutes, none without calls) answered the third earlier ping with GOAWAY
# "too_many_pings", which killed an open ModelStreamInfer stream of any client pinging every
# 10-60 s to keep a NAT or load balancer mapping alive. Faster pingers still get the GOAWAY.
# Not 1 s: C core clients asked for less ping every 1.001 s, a millisecond from a strike.
_MIN_CLIENT_PING_INTERVAL_MS = 500
_KEEPALIVE_TIMEOUT_S = 20.0  # gRPC's default; at most --keepalive-time
_FOREVER_MS = 2**31 - 1  # what gRPC reads as "never"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC channel arguments for keepalive and connection age (docs/serving.md, "Connections";
    the names are grpc core's ``GRPC_ARG_*`` values, which gRPC ignores when misspelt)."""
    options = [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _MIN_CLIENT_PING_INTERVAL_MS),
        # The server's own pings: without this, two unanswered by data and then one a minute.
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if config.keepalive_time:
        timeout = min(_KEEPALIVE_TIMEOUT_S, config.keepalive_time)
        options.append(("grpc.keepalive_time_ms", _ms(config.keepalive_time)))
        options.append(("grpc.keepalive_timeout_ms", _ms(timeout)))
        # What closes the connection in grpcio 1.85: keepalive_timeout_ms alone did not
        # (a stopped client's stream stayed open); this bounds every ping the server sends.
        options.append(("grpc.http2.ping_timeout_ms", _ms(timeout)))
    else:
        options.append(("grpc.keepalive_time_ms", _FOREVER_MS))
    if config.max_connection_age:
        options.append(("grpc.max_connection_age_ms", _ms(config.max_connection_age)))
        grace = config.max_connection_age_grace
        options.append(
            ("grpc.max_connection_age_grace_ms", _FOREVER_MS if grace is None else _ms(grace))
        )
    return options


def _open(info: ModelInfo, config: ServerConfig) -> Runtime:
    return Runtime(
        info,
        device=config.device,
        max_batch_size=config.max_batch_size,
        intra_op_threads=config.intra_op_threads,
    )


def _load(runtime: Runtime, stop: threading.Event) -> Runtime:
    """Warm ``runtime`` up (every batch bucket) and log it loaded."""
    info = runtime.info
    if not runtime.warm_up(stop):
        return runtime  # stopping: start() was cancelled and nobody reads this
    _log.info(
        "model %s loaded from %s: input %s %s, %d classes, buckets %s",
        info.name,
        info.path,
        info.input_name,
        [-1, *info.sample_shape],
        info.num_classes,
        list(runtime.buckets),
    )
    return runtime


def _bind_refusal(host: str, port: int) -> OSError | None:
    """Why no address of ``host`` can listen on ``port``; None when one can (port 0: any port,
    so only the address is tested).

    gRPC finds out too, but prints a line of its own first, outside --log-format json."""
    try:
        found = listen_addresses(host, port)
    except OSError as e:  # an unresolvable name
        return e
    refusal: OSError | None = None
    for family, address in found:
        try:  # a family the kernel lacks (IPv6 switched off) refuses only its own addresses
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
        except OSError as e:
            if refusal is None or refusal.errno == errno.EAFNOSUPPORT:  # say the telling one
                refusal = e
        else:
            return None
    return refusal


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Server:
    """One serving process: ``await start()`` (returns the bound port), ``await stop()``.

    Use as ``async with Server(config) as server:``; ``stop`` drains: health turns NOT_SERVING,
    new requests get UNAVAILABLE, in-flight requests get up to ``grace`` seconds to finish.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.state = ServingState(
            {}, self.metrics, config.max_image_pixels, config.max_message_bytes
        )
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: aio.Server | None = None
        self._stopping = threading.Event()  # set by ``stop``; ends a warm-up in progress
        self._closing_watches = asyncio.Event()  # ends health Watch streams (``stop``)
        self._loop_cpus: frozenset[int] | None = None  # the loop thread's CPUs before start
        # Image decoding: one thread per usable CPU (decoding is CPU work; Pillow releases the
        # GIL), within the cgroup quota; the executor's default of CPUs + 4 only adds images
        # held in memory at once, up to ~250 MB each at the default --max-image-pixels. The
        # threads are pinned to the CPUs the loop had before ``_pin_loop``: they would
        # inherit the pinned loop's, which creates them later.
        cpus = affinity.current_cpus()
        self._decoder = ThreadPoolExecutor(
            max_workers=affinity.worker_count(cpus, os.cpu_count(), affinity.cgroup_cpu_quota()),
            thread_name_prefix="decode",
            initializer=affinity.pin_current_thread,
            initargs=(cpus,),
        )

    @property
    def models(self) -> dict[str, Model]:
        return self.state.models

    async def start(self) -> int:
        """Bind, start answering (not ready), load and warm every model, then turn ready.

        To stop while loading, cancel it and call ``stop``: the model being warmed up stops
        after its current bucket (creating an ONNX Runtime session cannot be interrupted)."""
        paths = find_models(self.config)
        # Every file is checked before any model is warmed up: a bad one late in a repository
        # would otherwise stop the server only after the others' warm-up (minutes on a GPU).
        infos = [
            await asyncio.to_thread(read_model_info, name, path) for name, path in paths.items()
        ]
        self.state.loading = set(paths)
        # Set before the port opens: the stock servicer starts with '' SERVING.
        await self.health.set("", _NOT_SERVING)
        for name in paths:  # known while loading: a probe by name hears NOT_SERVING, not NOT_FOUND
            await self.health.set(name, _NOT_SERVING)
            self.metrics.model_ready(name, False)  # and a scrape reads 0, not nothing
        self._server = self._build()
        self.port = self._bind(self._server)
        # Not cancelled half-way: a stop signal that cancelled start() inside gRPC's own start
        # broke its later shutdown (InvalidStateError, logged with a traceback).
        grpc_start = asyncio.ensure_future(self._server.start())
        try:
            await asyncio.shield(grpc_start)
        except asyncio.CancelledError:
            await grpc_start
            raise
        # Before loading, so a taken metrics port stops the server before any warm-up.
        self.metrics.serve_http(self.config.host, self.config.metrics_port)
        _log.info("listening on %s", _address(self.config.host, self.port))
        # Every session before any warm-up: a model ONNX Runtime refuses (an opset or operator
        # it lacks) stops the server before the others' warm-up (minutes on a GPU), not after.
        opened = [await asyncio.to_thread(_open, info, self.config) for info in infos]
        for runtime in opened:
            runtime = await asyncio.to_thread(_load, runtime, self._stopping)
            batcher = Batcher(
                runtime,
                max_queue_size=self.config.max_queue_size,
                max_queue_delay_s=self.config.max_queue_delay_s,
                instances=self.config.instances,
                metrics=self.metrics,
            )
            batcher.start()
            self.state.models[runtime.info.name] = Model(runtime.info, batcher)
        self._pin_loop()
        self.state.ready = True
        for name in self.state.models:
            await self.health.set(name, _SERVING)
            self.metrics.model_ready(name, True)
        await self.health.set("", _SERVING)
        _log.info("ready: serving %s on port %d", ", ".join(self.state.models), self.port)
        return self.port

    def _pin_loop(self) -> None:
        """Run the event loop on the CPUs the instance threads run on, off ONNX Runtime's pool
        threads' cores (serve/affinity.py); ``stop`` undoes it."""
        shared = {model.batcher.runtime.caller_cpus for model in self.state.models.values()}
        if len(shared) == 1 and None not in shared:
            cpus = shared.pop()
            self._loop_cpus = affinity.current_cpus()
            affinity.pin_current_thread(cpus)
            _log.info("event loop pinned to CPUs %s with the instance threads", sorted(cpus))

    def _build(self) -> aio.Server:
        limit = self.config.max_message_bytes
        interceptor = security.auth_interceptor(
            self.config.auth_token_file, on_reject=self._count_unauthenticated
        )
        # OneRequest first, so it also wraps the auth interceptor's refusals (serve/halfclose.py).
        interceptors: list[aio.ServerInterceptor] = [OneRequest(self._count_missing)]
        if interceptor is not None:
            interceptors.append(interceptor)
        server = aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Two servers on one port would silently split the traffic.
                ("grpc.so_reuseport", 0),
                *_connection_options(self.config),
            ],
        )
        server.add_generic_rpc_handlers((kserve.handler(kserve.KServeServicer(self.state)),))
        classifier = ClassifierServicer(self.state, self._decoder)
        server.add_generic_rpc_handlers((classify.handler(classifier),))
        health = reflection.health_handler(self.health, self._closing_watches, self._health_names)
        server.add_generic_rpc_handlers((health,))
        server.add_generic_rpc_handlers(reflection.handlers())
        return server

    def _health_names(self) -> list[str]:
        """What health List reports: the server ('') and every model, loaded or loading."""
        return ["", *sorted(self.state.loading | set(self.state.models))]

    def _count_unauthenticated(self, method: str, request: object) -> None:
        """Count refused inference calls under their model, as `state.run` counts the rest."""
        if method not in _INFERENCE_METHODS:
            return
        name = getattr(request, "model_name", None) or getattr(request, "model", None) or ""
        self.state.record(name, grpc.StatusCode.UNAUTHENTICATED, 0.0)

    def _count_missing(self, method: str) -> None:
        """Count inference calls that came without their message (serve/halfclose.py)."""
        if method in _INFERENCE_METHODS:
            self.state.record("", grpc.StatusCode.INVALID_ARGUMENT, 0.0)

    def _bind(self, server: aio.Server) -> int:
        address = _address(self.config.host, self.config.port)
        refusal = _bind_refusal(self.config.host, self.config.port)
        if refusal is not None:
            raise OSError(
                f"expected to bind gRPC on {address}, got {refusal.strerror or refusal}; pass "
                "another --port or --host"
            ) from refusal
        credentials = security.server_credentials(
            self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca
        )
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as e:
            port = 0
            cause: Exception | None = e
        else:
            cause = None
        if not port:
            raise OSError(
                f"expected to bind gRPC on {address}, got it refused (in use or not a local "
                "address); pass another --port or --host"
            ) from cause
        return port

    async def wait(self) -> None:
        """Wait until the gRPC server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; safe to call more than once and after a failed ``start``."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        grace = self.config.grace if grace is None else grace
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        self.state.drain()
        await self.health.enter_graceful_shutdown()
        for name in self.state.models:
            self.metrics.model_ready(name, False)
        # After a failed start there is nothing to drain: those lines would only precede the
        # error that says what went wrong.
        level = logging.INFO if self.state.ready else logging.DEBUG
        in_flight = self.state.in_flight
        _log.log(level, "draining: %d requests in flight, grace %g s", in_flight, grace)
        if not await self.state.wait_quiet(_QUIET_S, grace):
            _log.warning(
                "grace period over with %d requests in flight; cancelling them",
                self.state.in_flight,
            )
        # Watchers have had the quiet period to read NOT_SERVING; their streams end now.
        self._closing_watches.set()
        try:
            if self._server is not None:
                await self._server.stop(max(0.0, until - loop.time()))
            for model in self.state.models.values():
                await model.batcher.close(max(0.0, until - loop.time()))
            self.metrics.close()
        finally:
            # The loop thread outlives the server (tests, embedding apps): give it back its
            # CPUs and end the decoder threads even when a step above failed.
            self._decoder.shutdown(wait=False, cancel_futures=True)
            affinity.pin_current_thread(self._loop_cpus)
        _log.log(level, "stopped")

    async def __aenter__(self) -> Server:
        try:
            await self.start()
        except BaseException:
            await self.stop(0)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
