"""What every servicer shares: the loaded models, readiness, draining, in-flight requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc import aio

from serve.batcher import TRACE, Batcher, Trace
from serve.config import DEFAULT_MAX_MESSAGE_BYTES
from serve.errors import UNKNOWN_MODEL, ServeError, not_found, outcome, shown, unavailable
from serve.model_info import ModelInfo

if TYPE_CHECKING:
    from serve.metrics import Metrics

_log = logging.getLogger(__name__)
T = TypeVar("T")
VERSION = "1"
# gRPC cancels a handler when its deadline passes, and the client, whose deadline started a
# network hop earlier, often cancels first: a cancelled call with at most this much time left
# is taken to have run out of time (5 ms miscounted 2 of 32 local deadlines as cancels).
DEADLINE_SLACK_S = 0.05


def serves_version(version: str) -> bool:
    """True for the versions every model is served at: "" (latest) and any decimal spelling of
    1 ("1", "01"): Triton parses version strings as integers."""
    return version == "" or (
        version.isascii() and version.isdigit() and version.lstrip("0") == VERSION
    )


def cancelled_status(context: aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call that gRPC cancelled: DEADLINE_EXCEEDED when its deadline passed,
    else CANCELLED (the client went away)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


@dataclass(frozen=True)
class Model:
    """A loaded model: its interface and the batcher in front of its runtime."""

    info: ModelInfo
    batcher: Batcher


class ServingState:
    """Models by name, plus the server-wide flags and the in-flight request count."""

    def __init__(
        self,
        models: dict[str, Model],
        metrics: Metrics | None,
        max_image_pixels: int,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.models = models
        self.metrics = metrics
        self.max_image_pixels = max_image_pixels
        self.max_message_bytes = max_message_bytes  # gRPC's send limit for an answer
        self.ready = False
        self.loading: set[str] = set()  # the names being loaded before ready
        self._drain = asyncio.Event()
        self._in_flight = 0
        self._arrivals = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def model(self, name: str, version: str) -> Model:
        """The model ``name`` at ``version`` ("", "1" or "01"...); NOT_FOUND otherwise, UNAVAILABLE
        for a model in ``loading`` that is not loaded yet."""
        model = self.models.get(name)
        if model is None and not self.ready and name in self.loading:
            raise unavailable(
                f"model {shown(name)} is not loaded yet: the server is still loading models; "
                "retry when ServerReady"
            )
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise not_found(
                f"expected a model name among [{known}], got {shown(name)}; check the name"
            )
        if not serves_version(version):
            raise not_found(
                f"expected version '' or {VERSION!r} of model {name}, got {shown(version)}; "
                f"this server serves version {VERSION} only"
            )
        return model

    @property
    def draining(self) -> bool:
        """True once ``drain`` was called: new requests get UNAVAILABLE."""
        return self._drain.is_set()

    def drain(self) -> None:
        """Refuse new requests from now on; open streams end once their answers are out."""
        self._drain.set()

    async def wait_drain(self) -> None:
        """Return once ``drain`` has been called."""
        await self._drain.wait()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def begin(self) -> float:
        """Count one arriving inference request as in flight; returns its start time.

        Every ``begin`` is matched by one ``finish``.
        """
        self._in_flight += 1
        self._arrivals += 1
        self._idle.clear()
        return time.perf_counter()

    def check_open(self) -> None:
        """UNAVAILABLE while draining or before every model is loaded."""
        if self._drain.is_set():
            raise unavailable("the server is shutting down; retry on another replica")
        if not self.ready:
            raise unavailable("the server is still loading models; retry when ServerReady")

    @property
    def arrivals(self) -> int:
        """Inference requests arrived so far; the latest one's number."""
        return self._arrivals

    def finish(
        self, model_name: str, code: grpc.StatusCode, started: float, trace: Trace | None = None
    ) -> None:
        """Count a request that ``begin`` admitted as finished with ``code``."""
        self._count(model_name, code, started, trace)
        self._leave()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no inference request is in flight; False when ``timeout`` ran out."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def wait_quiet(self, quiet: float, timeout: float) -> bool:
        """Wait until nothing is in flight and no request arrived for ``quiet`` seconds.

        A call still inside gRPC's transport when the server stops is cancelled, not refused,
        so a drain keeps answering UNAVAILABLE until callers go quiet. False on ``timeout``.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while True:
            seen = self._arrivals
            if not await self.wait_idle(until - loop.time()):
                return False
            await asyncio.sleep(max(0.0, min(quiet, until - loop.time())))
            if self._arrivals == seen and self._idle.is_set():
                return True
            if loop.time() >= until:
                return False

    def deadline(self, context: aio.ServicerContext) -> float | None:
        """The client's deadline on the event loop's clock, or None without one."""
        remaining = context.time_remaining()
        return None if remaining is None else asyncio.get_running_loop().time() + remaining

    async def run(
        self,
        context: aio.ServicerContext,
        model_name: str,
        work: Callable[[], Awaitable[T]],
    ) -> T:
        """Run one inference request: refuse while not ready, map errors to statuses, count it.

        The request is counted before its status goes out, so a client that sees the answer
        also sees it in the metrics.
        """
        started = self.begin()
        trace = None
        if _log.isEnabledFor(logging.DEBUG):
            trace = Trace(id=self._arrivals)
            TRACE.set(trace)  # each gRPC call runs in its own task, so its own context
        try:
            error: ServeError | None = None
            try:
                self.check_open()
                result = await work()
            except ServeError as e:
                error = e
            except asyncio.CancelledError:
                self._count(model_name, cancelled_status(context), started, trace)
                raise
            except Exception as e:
                _log.exception("request to model %s failed", model_name)
                error = ServeError(
                    grpc.StatusCode.INTERNAL,
                    f"internal error ({type(e).__name__}: {e}); please report it",
                )
            code = grpc.StatusCode.OK if error is None else error.code
            self._count(model_name, code, started, trace)
            if error is not None:
                await context.abort(error.code, error.message)
            return result
        finally:
            self._leave()

    def _count(
        self, model_name: str, code: grpc.StatusCode, started: float, trace: Trace | None
    ) -> None:
        try:
            self._log_and_record(model_name, code, started, trace)
        except Exception:  # a bug in the bookkeeping must not cost a client its answer
            _log.exception("counting a request to model %s failed", model_name)

    def _log_and_record(
        self, model_name: str, code: grpc.StatusCode, started: float, trace: Trace | None
    ) -> None:
        seconds = time.perf_counter() - started
        if trace is not None:
            # The id is the request's arrival number: unique per process, in arrival order.
            _log.debug(
                "request id=%d model=%s status=%s rows=%d queue_s=%.6f compute_s=%.6f "
                "total_s=%.6f",
                trace.id,
                model_name,
                code.name,
                trace.rows,
                trace.queue_s,
                trace.compute_s,
                seconds,
            )
        self.record(model_name, code, seconds)

    def record(self, model_name: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one finished request in the metrics, under ``UNKNOWN_MODEL`` for names the
        server does not serve (a model still loading is known: its series exist already)."""
        if self.metrics is not None:
            known = model_name in self.models or model_name in self.loading
            self.metrics.request(model_name if known else UNKNOWN_MODEL, outcome(code), seconds)
