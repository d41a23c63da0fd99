"""The server's configuration: one frozen dataclass, checked once where it is built."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_KEEPALIVE_S = 60.0
# gRPC takes connection times as int32 milliseconds; --grace is capped there too, since an
# infinite one overflowed the thread joins of the shutdown after a clean drain.
MAX_CONNECTION_SECONDS = (2**31 - 1) // 1000
# gRPC counts a deadline in int64 nanoseconds since 1970 and takes one past 2262 as already
# passed: a client timeout of 1e10 s failed every call at once with DEADLINE_EXCEEDED.
MAX_DEADLINE_S = 1e9  # about 31 years


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``python -m serve`` accepts; see ``docs/serving.md`` for each field.

    Raises ValueError on construction when a value is out of range, with a message that names
    the flag to fix.
    """

    models: tuple[Path, ...] = ()
    model_repository: Path | None = None
    host: str = "0.0.0.0"
    port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    instances: int = 1
    grace: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    device: str = "auto"
    intra_op_threads: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    max_image_pixels: int = 40_000_000
    keepalive_time: float = DEFAULT_KEEPALIVE_S
    max_connection_age: float = 0.0
    max_connection_age_grace: float | None = None

    def __post_init__(self) -> None:
        if not self.models and self.model_repository is None:
            raise ValueError(
                "expected at least one MODEL.onnx or --model-repository DIR, got neither; "
                "pass the model to serve"
            )
        if self.models and self.model_repository is not None:
            raise ValueError(
                "expected MODEL.onnx files or --model-repository, got both; pass one of them"
            )
        _check_range("--port", self.port, 0, 65535)
        _check_range("--metrics-port", self.metrics_port, 0, 65535)
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(
                f"expected --metrics-port other than --port, got {self.port} for both; pass "
                "another --metrics-port (default 8002), or 0 to disable metrics"
            )
        if self.host.startswith("[") and self.host.endswith("]"):
            # `--host [::1]`, as the address is written with a port: gRPC took it, the metrics
            # endpoint could not resolve it.
            object.__setattr__(self, "host", self.host[1:-1])
        if not self.host:
            raise ValueError("expected --host to name an address, got ''; pass e.g. 0.0.0.0")
        _check_range("--max-batch-size", self.max_batch_size, 1, 4096)
        _check_range("--max-queue-delay-us", self.max_queue_delay_us, 0, 10_000_000)
        _check_range("--max-queue-size", self.max_queue_size, 1, 10_000_000)
        _check_range("--instances", self.instances, 1, 64)
        _check_range("--intra-op-threads", self.intra_op_threads, 0, 1024)
        _check_range("--max-message-bytes", self.max_message_bytes, 1024, 2**31 - 1)
        _check_range("--max-image-pixels", self.max_image_pixels, 1, 2**31 - 1)
        _check_seconds("--grace", self.grace, 0, example=30)
        _check_seconds("--keepalive-time", self.keepalive_time, 0.1, off=0, example=60)
        _check_seconds("--max-connection-age", self.max_connection_age, 0.1, off=0, example=600)
        if self.max_connection_age_grace is not None:
            if not self.max_connection_age:
                raise ValueError(
                    "expected --max-connection-age with --max-connection-age-grace, got the "
                    "grace alone; pass --max-connection-age SECONDS too"
                )
            _check_seconds("--max-connection-age-grace", self.max_connection_age_grace, 0, 60)
        if self.device not in DEVICES:
            raise ValueError(
                f"expected --device in {', '.join(DEVICES)}, got {self.device!r}; pick one"
            )

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6


def _check_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(
            f"expected {flag} between {low} and {high}, got {value}; pass a value in range"
        )


def _check_seconds(
    flag: str, value: float, low: float, example: float, off: float | None = None
) -> None:
    if value == off or low <= value <= MAX_CONNECTION_SECONDS:  # NaN fails both
        return
    allowed = f"between {low:g} and {MAX_CONNECTION_SECONDS} seconds"
    if off is not None:
        allowed = f"{off:g} (off) or {allowed}"
    raise ValueError(f"expected {flag} {allowed}, got {value}; pass e.g. {example:g}")


def listen_addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
    """The distinct (family, address) pairs a server listening on ``host:port`` binds, as gRPC
    binds them: every address ``host`` resolves to, in the resolver's order, and for
    ``localhost`` both loopbacks whatever the hosts file says (many list only 127.0.0.1).
    Raises OSError (socket.gaierror) for a name that does not resolve."""
    if host.lower() == "localhost":
        return [(socket.AF_INET6, ("::1", port, 0, 0)), (socket.AF_INET, ("127.0.0.1", port))]
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys((family, address) for family, *_, address in found))
