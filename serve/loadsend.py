"""How the load generator sends one request: a unary ModelInfer call, or a message on a
ModelStreamInfer stream (serve/loadgen.py decides when and what; this module only sends)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from grpc import aio

from protos import kserve_pb2

if TYPE_CHECKING:
    from serve.loadgen import Load, Outcome

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


Send = Callable[[int, bytes], Awaitable["str | None"]]
# Sent with every call: ``(("authorization", "Bearer TOKEN"),)``, or None. Built once, since
# a call that built its own would cost the generator CPU the server should get.
Metadata = tuple[tuple[str, str], ...] | None


def unary_sender(channels: list[aio.Channel], load: Load, metadata: Metadata = None) -> Send:
    """Call ``index`` as one unary ModelInfer; errors raise grpc.RpcError."""
    calls = [c.unary_unary(INFER) for c in channels]

    async def send(index: int, request: bytes) -> str | None:
        await calls[index % len(calls)](request, timeout=load.timeout, metadata=metadata)
        return None

    return send


def stream_error(answer: bytes) -> str | None:
    """The status name of a ModelStreamInferResponse that reports an error, else None.

    Fields are serialized in field order, so a set ``error_message`` (field 1, tag 0x0a) comes
    first: answers that start otherwise are not parsed at all.
    """
    if answer[:1] != b"\n":
        return None
    message = kserve_pb2.ModelStreamInferResponse.FromString(answer).error_message
    return message.split(":", 1)[0] or "UNKNOWN"


def with_id(request: bytes, ident: str) -> bytes:
    """``request`` (a serialized ModelInferRequest without an id) with ``id`` set to ``ident``.

    Appending a field to serialized protobuf sets it, so no request is re-serialized.
    """
    return request + kserve_pb2.ModelInferRequest(id=ident).SerializeToString()


class StreamSender:
    """Sends over ModelStreamInfer streams opened on first use.

    Closed loop: one stream per concurrent caller, one request in flight on each. Open loop:
    one stream per channel with any number in flight, answers matched by request id.
    """

    def __init__(
        self, channels: list[aio.Channel], load: Load, outcome: Outcome, metadata: Metadata = None
    ) -> None:
        self._open = [c.stream_stream(STREAM_INFER) for c in channels]
        self._metadata = metadata
        self._load = load
        self._outcome = outcome
        self._streams: dict[int, aio.StreamStreamCall] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._readers: list[asyncio.Task[None]] = []
        # Open loop: per stream, the calls waiting for their answer by request id; an answer
        # is bytes, or the status name that ended the stream before it came.
        self._waiting: dict[aio.StreamStreamCall, dict[str, asyncio.Future[bytes | str]]] = {}

    def _stream(self, slot: int) -> aio.StreamStreamCall:
        call = self._streams.get(slot)
        if call is None:
            # A stream outlives many requests, so its deadline covers the whole setting.
            timeout = self._load.warmup + self._load.seconds + 2 * self._load.timeout
            call = self._streams[slot] = self._open[slot % len(self._open)](
                timeout=timeout, metadata=self._metadata
            )
            if self._load.rate is not None:
                self._locks[slot] = asyncio.Lock()
                self._waiting[call] = {}
                self._readers.append(asyncio.create_task(self._read(slot, call)))
        return call

    async def __call__(self, index: int, request: bytes) -> str | None:
        closed_loop = self._load.rate is None
        slot = index % (self._load.concurrency if closed_loop else len(self._open))
        call = self._stream(slot)
        try:
            if closed_loop:
                await call.write(request)
                answer = await call.read()
            else:
                answer = await self._send_tagged(slot, call, str(index), request)
        except grpc.RpcError:
            self._forget(slot, call)  # the stream is over: the next call opens another
            raise
        except asyncio.InvalidStateError:
            # A write to a stream that has already ended (the server died, say) raises this
            # instead of an RpcError: the call failed with the stream's status.
            self._forget(slot, call)
            return await _ended(call)
        if answer is None:
            return grpc.StatusCode.DEADLINE_EXCEEDED.name
        if answer is aio.EOF:
            self._forget(slot, call)
            return "STREAM_ENDED"
        if isinstance(answer, str):  # the stream ended with this status before answering
            self._forget(slot, call)
            return answer
        return stream_error(answer)

    def _forget(self, slot: int, call: aio.StreamStreamCall) -> None:
        if self._streams.get(slot) is call:
            del self._streams[slot]

    async def _send_tagged(
        self, slot: int, call: aio.StreamStreamCall, ident: str, request: bytes
    ) -> bytes | str | None:
        waiting = self._waiting[call]
        waiter = waiting[ident] = asyncio.get_running_loop().create_future()
        try:
            async with self._locks[slot]:  # one write at a time per stream
                await call.write(with_id(request, ident))
            return await asyncio.wait_for(waiter, self._load.timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            waiting.pop(ident, None)

    async def _read(self, slot: int, call: aio.StreamStreamCall) -> None:
        """Hand each answer on ``call`` to its waiting call; when the stream ends, every call
        still waiting on it fails at once with its status, not after its own deadline."""
        waiting = self._waiting[call]
        try:
            while (answer := await call.read()) is not aio.EOF:
                ident = kserve_pb2.ModelStreamInferResponse.FromString(answer).infer_response.id
                waiter = waiting.get(ident)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
            ended = "STREAM_ENDED" if await call.code() == grpc.StatusCode.OK else None
        except grpc.RpcError:
            ended = None
        self._forget(slot, call)
        ended = ended or await _ended(call)
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_result(ended)  # each call counts it

    async def close(self) -> None:
        """Half-close every stream and wait for the server to end it (status OK)."""
        for call in list(self._streams.values()):  # a reader may forget its stream meanwhile
            try:
                await call.done_writing()
                if self._load.rate is None:
                    while await call.read() is not aio.EOF:
                        pass
            except grpc.RpcError:
                pass  # counted from its code below
            code = await call.code()
            if code != grpc.StatusCode.OK:
                self._outcome.errors[code.name] += 1
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def _ended(call: aio.StreamStreamCall) -> str:
    """The status name an ended stream finished with."""
    return (await call.code()).name
