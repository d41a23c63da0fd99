"""Unary methods served as one-message streams, so a call closed without its request message
is answered INVALID_ARGUMENT instead of never.

grpcio's asyncio server returns from a unary call that brought no message without sending a
status (``_handle_unary_unary_rpc``: "cancelled immediately after start"), and then waits for
the call to end, which it does only when the connection closes: each such call (HTTP/2
HEADERS with END_STREAM, no DATA) held ~4 KB and an asyncio task for as long as a client that
answers pings kept its connection (20 000 calls: +75 MB), its client never got an answer, and a
shutdown waited its whole ``--grace`` for it. Read as a stream, the missing message is an
``EOF`` the method can answer.

A second request message on a unary call is not read: the method answers the first (Java's
gRPC server refuses it). Finding it takes one more read per call, ~60 us more server CPU (+10 %
on a tiny model), and only a client speaking raw HTTP/2 or misusing a streaming stub
can send one.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import grpc
from grpc import aio

# Called with the method of each call answered INVALID_ARGUMENT for coming without its
# message, once that status went out: e.g. to count it in the metrics.
Missing = Callable[[str], None]


class OneRequest(aio.ServerInterceptor):
    """Serve every async unary-request method as a request stream holding exactly one message.

    Put it first among the interceptors: it then wraps the handlers the others return (the
    UNAUTHENTICATED ones included), which still get the parsed request.
    """

    def __init__(self, on_missing: Missing | None = None) -> None:
        self._on_missing = on_missing

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.response_streaming:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):
                return grpc.stream_stream_rpc_method_handler(
                    _generator(behavior, method, self._on_missing), **serializers
                )
            wrap = grpc.stream_stream_rpc_method_handler
        else:
            behavior = handler.unary_unary
            wrap = grpc.stream_unary_rpc_method_handler
        if not inspect.iscoroutinefunction(behavior):
            return handler  # a sync handler runs on grpc's thread pool: left as it is
        return wrap(_coroutine(behavior, method, self._on_missing), **serializers)


async def _read_one(
    context: aio.ServicerContext, method: str, on_missing: Missing | None
) -> object:
    request = await context.read()
    if request is not aio.EOF:
        return request
    try:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"expected one request message for {method}, got the call closed without one; "
            "send the request message (a unary call carries exactly one)",
        )
    except aio.AbortError:
        # Counted once answered: a call gRPC itself ended (a request above
        # --max-message-bytes, a deadline passed) also reads as no message, and its client
        # got another status.
        if on_missing is not None:
            on_missing(method)
        raise


def _coroutine(behavior: Callable, method: str, on_missing: Missing | None) -> Callable:
    async def serve(requests: object, context: aio.ServicerContext) -> object:
        try:
            return await behavior(await _read_one(context, method, on_missing), context)
        except aio.InternalError as e:
            # No status can be sent on a call gRPC already ended (a request above
            # --max-message-bytes, a deadline passed, a client gone), and grpc.aio logged that
            # failed send as an error with its traceback unless it had seen the call end first
            # (a race: a few in every thousand such calls, with or without their message).
            raise asyncio.CancelledError from e
        except aio.AbortError as e:
            # grpc.aio keeps the latest call's state, this exception in it, until another call
            # comes: with its traceback went the frames that held the request, so a refused
            # 30 MB request stayed in memory on an idle server.
            # A bare `raise` would put the traceback back on Python 3.10 (3.11 raises what
            # __traceback__ holds).
            e.__context__ = None
            raise e.with_traceback(None) from None

    return serve


def _generator(behavior: Callable, method: str, on_missing: Missing | None) -> Callable:
    async def serve(requests: object, context: aio.ServicerContext) -> object:
        try:
            async for answer in behavior(await _read_one(context, method, on_missing), context):
                yield answer
        except aio.InternalError as e:
            raise asyncio.CancelledError from e

    return serve
