"""KServe v2 ``ModelStreamInfer``: ModelInfer requests on one open bidirectional stream.

Each request read from the stream is checked and queued at once (no task per request), so
requests a client pipelines on one stream, and requests on many streams, batch together. Each
answer is written when its batch finishes, so answers can come back in another order than the
requests: clients match them by ``id``. A request that fails gets a ``ModelStreamInferResponse``
whose ``error_message`` starts with the status name ("INVALID_ARGUMENT: ...") and whose
``infer_response`` carries the request's ``id`` and ``model_name`` (left out, and said so, only
when with them the answer would be above --max-message-bytes); the stream stays open.

At most ``WINDOW`` requests of one stream are held unanswered or answered but not yet written,
and answers of at most ``WINDOW_BYTES`` wait to be written: beyond either the server stops
reading the stream until the client reads answers, so HTTP/2 flow control holds a client that
sends without reading, instead of the server's memory (a client that never read grew the
server by ~1.5 KB per request, without bound; 1024 answers of many rows and classes each,
by gigabytes).

The stream ends with OK once the client has closed its side and every request is answered,
draining or not. When the server drains, requests still arriving are answered UNAVAILABLE, and
once the admitted ones are answered a stream the client has not closed ends with status
UNAVAILABLE, so the client reconnects elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

import grpc
import numpy as np
from grpc import aio

from protos import kserve_pb2 as pb
from serve.batcher import Pending, Trace
from serve.errors import ServeError
from serve.kserve_codec import decode_request, encode_response
from serve.state import Model, ServingState, cancelled_status
from serve.wire import Undecodable, require_parsed

_log = logging.getLogger(__name__)
_CLOSED = object()  # the client closed its side and every request was answered
_DRAINED = object()  # the server drains and every admitted request was answered
_BROKEN = object()  # reading the stream failed; the call cannot go on
WINDOW = 1024  # requests of one stream held unanswered or unwritten before reading pauses
WINDOW_BYTES = 64 * 1024 * 1024  # output bytes of a stream's answers waiting to be written


def _output_bytes(item: object) -> int:
    """About the bytes an outbox item holds (0 for the end marks): its outputs, and the id and
    model name it echoes, which a client may make as long as --max-message-bytes allows."""
    if isinstance(item, pb.ModelStreamInferResponse):
        answer = item.infer_response
        echoed = len(answer.id) + len(answer.model_name) + len(item.error_message)
        return sum(map(len, answer.raw_output_contents)) + echoed
    return 0


def _final(response: pb.ModelStreamInferResponse) -> pb.ModelStreamInferResponse:
    """Mark ``response`` as its request's last: Triton sets ``triton_final_response`` on every
    stream response, and tritonclient code (decoupled loops) reads until it is true."""
    response.infer_response.parameters["triton_final_response"].bool_param = True
    return response


def _error(
    request: pb.ModelInferRequest | Undecodable, error: ServeError, limit: int
) -> pb.ModelStreamInferResponse:
    """The error answer to ``request``, within gRPC's send limit of ``limit`` bytes."""
    message = f"{error.code.name}: {error.message}"
    answer = _final(
        pb.ModelStreamInferResponse(
            error_message=message,
            infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
        )
    )
    # gRPC refuses an answer above its limit by ending the stream, with every request on it:
    # a request within the limit whose id (or model name) nearly fills it had an error answer,
    # the echo plus the message, above it. UTF-8 takes at most 4 bytes a character; the
    # answer's other fields well under 64.
    text = len(message) + len(request.id) + len(request.model_name)
    if 4 * text + 64 <= limit or answer.ByteSize() <= limit:
        return answer
    message = (
        f"{message} (this request's id, {len(request.id)} characters, and model name are "
        f"left out: with them this answer would be above --max-message-bytes {limit}; "
        "send shorter ids)"
    )
    fitting = message.encode()[: limit - 64].decode(errors="ignore")
    return _final(pb.ModelStreamInferResponse(error_message=fitting))


def _internal(error: BaseException) -> ServeError:
    return ServeError(
        grpc.StatusCode.INTERNAL,
        f"internal error ({type(error).__name__}: {error}); please report it",
    )


class Stream:
    """One open ``ModelStreamInfer`` call; ``await Stream(state, context).serve()``."""

    def __init__(self, state: ServingState, context: aio.ServicerContext) -> None:
        self.state = state
        self.context = context
        self._outbox: asyncio.Queue[object] = asyncio.Queue()
        self._admitted: set[asyncio.Future[np.ndarray]] = set()
        self._closed = False
        self._ending = False
        self._deadline = state.deadline(context)
        self._debug = _log.isEnabledFor(logging.DEBUG)
        self._room = asyncio.Event()  # set whenever the stream holds less than its windows
        self._room.set()
        self._unwritten = 0  # output bytes in the outbox

    async def serve(self) -> None:
        """Read, answer, and end the call as the module docstring says."""
        reader = asyncio.create_task(self._read())
        watcher = asyncio.create_task(self._watch_drain())
        try:
            while True:
                item = await self._outbox.get()
                if item in (_CLOSED, _DRAINED, _BROKEN):
                    self._ending = True  # the reader's read now fails: that is no error
                if item is _CLOSED:
                    return
                if item is _DRAINED:
                    await self.context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        "the server is shutting down; open a new stream on another replica",
                    )
                if item is _BROKEN:
                    await self.context.abort(
                        grpc.StatusCode.INTERNAL,
                        "reading the stream failed on the server (logged); open a new stream",
                    )
                await self.context.write(item)
                self._unwritten -= _output_bytes(item)
                if not self._room.is_set() and not self._full():
                    self._room.set()
        finally:
            for task in (reader, watcher):
                task.cancel()
            for future in list(self._admitted):
                future.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, watcher, return_exceptions=True)

    async def _read(self) -> None:
        try:
            while True:
                while self._full():
                    self._room.clear()
                    await self._room.wait()
                request = await self.context.read()
                if request is aio.EOF:
                    break
                self._start(request)
        except Exception:
            if not self._ending:
                _log.exception("reading a ModelStreamInfer stream failed")
                self._outbox.put_nowait(_BROKEN)
            return
        self._closed = True
        self._maybe_end()

    def _full(self) -> bool:
        held = len(self._admitted) + self._outbox.qsize()
        return held >= WINDOW or self._unwritten >= WINDOW_BYTES

    async def _watch_drain(self) -> None:
        await self.state.wait_drain()
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self._admitted:
            return
        # Closed first: a client that sends no more and has every answer ends OK even while
        # the server drains; UNAVAILABLE made tritonclient's callback, and Client.infer_stream,
        # report an error after every request had succeeded.
        if self._closed:
            self._outbox.put_nowait(_CLOSED)
        elif self.state.draining:
            self._outbox.put_nowait(_DRAINED)

    def _start(self, request: pb.ModelInferRequest | Undecodable) -> None:
        state = self.state
        started = state.begin()
        trace = Trace(id=state.arrivals) if self._debug else None
        try:
            state.check_open()
            request = require_parsed(request)
            model = state.model(request.model_name, request.model_version)
            rows, k = decode_request(model, request)
            future, pieces = model.batcher.submit(rows, self._deadline)
        except Exception as e:
            if not isinstance(e, ServeError):
                _log.exception("stream request to model %s failed", request.model_name)
                e = _internal(e)
            state.finish(request.model_name, e.code, started, trace)
            self._post(_error(request, e, state.max_message_bytes))
            return
        self._admitted.add(future)
        future.add_done_callback(
            functools.partial(self._answer, request, model, k, started, pieces, trace)
        )

    def _answer(
        self,
        request: pb.ModelInferRequest,
        model: Model,
        k: int | None,
        started: float,
        pieces: list[Pending],
        trace: Trace | None,
        future: asyncio.Future[np.ndarray],
    ) -> None:
        self._admitted.discard(future)
        if trace is not None:
            trace.add(pieces)
        if future.cancelled():
            # The stream is gone (client cancelled, or its deadline passed): nobody to answer.
            model.batcher.withdraw(future, pieces)
            code = cancelled_status(self.context)
            self.state.finish(request.model_name, code, started, trace)
            return
        error = future.exception()
        if error is not None:
            model.batcher.withdraw(future, pieces)  # the pieces of a split request still queued
        else:
            model.batcher.served(pieces)
            try:
                answer = _final(
                    pb.ModelStreamInferResponse(
                        infer_response=encode_response(
                            model, request, future.result(), k, self.state.max_message_bytes
                        )
                    )
                )
            except Exception as e:
                error = e
        if error is not None:
            if not isinstance(error, ServeError):
                _log.error("stream request to model %s failed", model.info.name, exc_info=error)
                error = _internal(error)
            answer = _error(request, error, self.state.max_message_bytes)
        code = grpc.StatusCode.OK if error is None else error.code
        self.state.finish(request.model_name, code, started, trace)
        self._post(answer)
        self._maybe_end()

    def _post(self, answer: pb.ModelStreamInferResponse) -> None:
        """Queue ``answer`` for the writer, counted in the byte window until it is written."""
        self._unwritten += _output_bytes(answer)
        self._outbox.put_nowait(answer)
