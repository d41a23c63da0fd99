"""Request deserializers that never raise: bytes that do not parse become ``Undecodable``.

gRPC answers UNKNOWN (and logs a traceback) when a deserializer raises; with these, the method
handler sees the failure and answers INVALID_ARGUMENT like any other bad request. The
inference methods check for it where they parse; ``checked`` does it in front of the other
unary methods (KServe metadata, health), ``checked_stream`` in front of reflection's stream.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from grpc import aio

from serve.errors import ServeError, invalid

M = TypeVar("M", bound=Message)
T = TypeVar("T")


class Undecodable:
    """Bytes that did not parse as the method's request message.

    Its model fields are empty, so it names no model: metrics count it as ``_unknown``.
    """

    model_name = ""
    model_version = ""
    model = ""
    version = ""
    id = ""

    def __init__(self, message: str, wire_name: str, error: str) -> None:
        self.message = message
        self.wire_name = wire_name
        self.error = error


# protobuf's DecodeError opens with the message's full name in our own descriptor pool: for
# the KServe messages a private package (kserve.v2, DESIGN.md) that no client's .proto has.
_PARSE_ERROR_PREFIX = re.compile(r"^Error parsing message(?: with type '[^']*')?:?\s*")


def deserializer(
    message_type: type[M], wire_name: str | None = None
) -> Callable[[bytes], M | Undecodable]:
    """A request deserializer for ``message_type`` that returns ``Undecodable`` on failure;
    ``wire_name`` is the message's full name as clients know it (default: its own)."""
    name = message_type.DESCRIPTOR.name
    full_name = wire_name or message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> M | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            reason = _PARSE_ERROR_PREFIX.sub("", str(e)) or "not a protobuf encoding"
            return Undecodable(name, full_name, reason[:1].lower() + reason[1:])

    return parse


def require_parsed(request: M | Undecodable) -> M:
    """``request`` itself, or INVALID_ARGUMENT when its bytes did not parse."""
    if isinstance(request, Undecodable):
        raise invalid(
            f"expected a serialized {request.message}, got bytes that do not parse "
            f"({request.error}); check that the client builds {request.wire_name} from the "
            f"service's .proto (`grpcurl describe {request.wire_name}` shows it)"
        )
    return request


def checked(
    behavior: Callable[[Any, aio.ServicerContext], Awaitable[T]],
) -> Callable[[Any, aio.ServicerContext], Awaitable[T]]:
    """A servicer method taking one request, given it parsed, with any ServeError it meets
    (bytes that do not parse: INVALID_ARGUMENT; an unknown model: NOT_FOUND) answered as that
    status."""

    @functools.wraps(behavior)
    async def run(request: object, context: aio.ServicerContext) -> T:
        try:
            return await behavior(require_parsed(request), context)  # type: ignore[arg-type]
        except ServeError as e:
            await context.abort(e.code, e.message)
            raise

    return run


def checked_stream(
    behavior: Callable[[AsyncIterator[Any], aio.ServicerContext], AsyncIterator[Any]],
) -> Callable[[AsyncIterator[Any], aio.ServicerContext], AsyncIterator[Any]]:
    """A servicer method taking a request stream (an async generator of answers) whose call
    ends with INVALID_ARGUMENT at the first message that did not parse."""

    @functools.wraps(behavior)
    async def run(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                try:
                    yield require_parsed(request)
                except ServeError as e:
                    await context.abort(e.code, e.message)

        async for answer in behavior(parsed(), context):
            yield answer

    return run
