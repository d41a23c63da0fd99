"""Request errors that carry their gRPC status, and the metrics outcome of each status."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import Message

# A unary call's status message travels in a trailer, and gRPC turns trailers above 8 KiB
# (sometimes) or 16 KiB (always) into RESOURCE_EXHAUSTED; a non-ASCII character takes up to 12
# bytes once percent-encoded. Values taken from a request are shown cut (``shown``) and every
# message is capped here, so a client's 20 000-character model name still gets NOT_FOUND and a
# message it can read.
MAX_SHOWN_CHARS = 80
MAX_MESSAGE_CHARS = 600


def shown(value: object) -> str:
    """``repr(value)`` for a message, cut to about ``MAX_SHOWN_CHARS`` characters."""
    text = repr(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return f"{text[:MAX_SHOWN_CHARS]}... ({len(text)} characters)"


class ServeError(Exception):
    """A request failed for a reason the client can act on; ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... (cut)"
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServeError:
    """INVALID_ARGUMENT: the request itself is wrong."""
    return ServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServeError:
    """NOT_FOUND: unknown model or version."""
    return ServeError(grpc.StatusCode.NOT_FOUND, message)


def check_answer_size(
    answer: Message, bound: int, limit: int, fix: Callable[[], str]
) -> None:
    """RESOURCE_EXHAUSTED unless ``answer`` fits gRPC's send limit, ``limit`` bytes (with 64 to
    spare for a stream's wrapper). Above its limit gRPC fails the whole call instead, ending a
    stream with every other request on it; ``bound``, a cheap upper bound of the answer's
    size, spares the exact count (which serializes) for the answers that fit easily, and
    ``fix()`` words what to do only for one that does not."""
    if bound + 64 <= limit:
        return
    size = answer.ByteSize() + 64
    if size > limit:
        raise ServeError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"expected an answer within the server's --max-message-bytes {limit}, got "
            f"{size} bytes; {fix()}, or raise --max-message-bytes",
        )


def unavailable(message: str) -> ServeError:
    """UNAVAILABLE: the server is not ready or is draining; retry elsewhere or later."""
    return ServeError(grpc.StatusCode.UNAVAILABLE, message)


# The metrics' outcome label of each status a request can end with; any other is "internal".
_OUTCOMES = {
    grpc.StatusCode.OK: "success",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.CANCELLED: "cancelled",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
}


OUTCOMES = (*_OUTCOMES.values(), "internal")
# The model label of requests naming no served model: made-up names add no metric series.
UNKNOWN_MODEL = "_unknown"


def outcome(code: grpc.StatusCode) -> str:
    """The metrics outcome label for a finished request's status."""
    return _OUTCOMES.get(code, "internal")
