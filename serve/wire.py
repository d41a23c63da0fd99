"""Request deserializers that never raise: bytes that do not parse become ``Undecodable``.

gRPC answers UNKNOWN (and logs a traceback) when a deserializer raises; with these, the method
handler sees the failure and answers INVALID_ARGUMENT like any other bad request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from serve.errors import invalid

M = TypeVar("M", bound=Message)


class Undecodable:
    """Bytes that did not parse as the method's request message.

    Its model fields are empty, so it names no model: metrics count it as ``_unknown``.
    """

    model_name = ""
    model_version = ""
    model = ""
    version = ""
    id = ""

    def __init__(self, message: str, error: str) -> None:
        self.message = message
        self.error = error


def deserializer(message_type: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A request deserializer for ``message_type`` that returns ``Undecodable`` on failure."""
    name = message_type.DESCRIPTOR.name

    def parse(data: bytes) -> M | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Undecodable(name, str(e))

    return parse


def require_parsed(request: M | Undecodable) -> M:
    """``request`` itself, or INVALID_ARGUMENT when its bytes did not parse."""
    if isinstance(request, Undecodable):
        raise invalid(
            f"expected a serialized {request.message}, got bytes that do not parse "
            f"({request.error}); build the message from the service's .proto"
        )
    return request
