"""Request errors that carry their gRPC status, and the metrics outcome of each status."""

from __future__ import annotations

import grpc


class ServeError(Exception):
    """A request failed for a reason the client can act on; ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServeError:
    """INVALID_ARGUMENT: the request itself is wrong."""
    return ServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServeError:
    """NOT_FOUND: unknown model or version."""
    return ServeError(grpc.StatusCode.NOT_FOUND, message)


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


def outcome(code: grpc.StatusCode) -> str:
    """The metrics outcome label for a finished request's status."""
    return _OUTCOMES.get(code, "internal")
