"""Misbehaving and hostile clients against a real server: each gets a clear status or a closed
connection, the server keeps nothing of them, and other clients' calls still succeed."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from serve.background import BackgroundServer
from tests.serve.v2 import INFER, infer_payload, reply_logits

_X = np.zeros((1, 3, 8, 8), np.float32)
_WATCH = "/grpc.health.v1.Health/Watch"
# The unary methods of each service: the KServe inference and metadata methods, our Classify,
# and the health check (exempt from auth, so reachable by anyone).
_UNARY = (
    INFER,
    "/inference.GRPCInferenceService/ServerLive",
    "/classifier.v1.Classifier/Classify",
    "/grpc.health.v1.Health/Check",
)


def _infer_ok(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = channel.unary_unary(INFER)(infer_payload("tiny", _X, "fine"), timeout=30)
    assert reply_logits(reply)[0] == "fine"


def _refusal(port: int, send: Callable[[grpc.Channel], object]) -> grpc.RpcError:
    """The error of ``send(channel)``, which must fail."""
    with (
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        send(channel)
    return caught.value


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
    return head + payload


def _headers(path: str) -> bytes:
    """An HPACK block of literal fields (no indexing, no Huffman): short names and values."""
    fields = [
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ]  # fmt: skip
    block = b""
    for name, value in fields:
        block += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return block


class _Peer:
    """The client side of a raw HTTP/2 connection that answers the server's SETTINGS and PINGs
    (unanswered, the server hangs up after 20 s: serve/server.py's ping timeout)."""

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.buffer = b""
        self.ended: set[int] = set()  # streams the server ended (HEADERS with END_STREAM)

    def pump(self, wait: float) -> None:
        """Read and answer what arrives within ``wait`` seconds."""
        self.raw.settimeout(wait)
        try:
            chunk = self.raw.recv(65536)
        except TimeoutError:
            return
        assert chunk, "the server closed the connection"
        self.buffer += chunk
        while len(self.buffer) >= 9 + int.from_bytes(self.buffer[:3], "big"):
            length, kind, flags = (
                int.from_bytes(self.buffer[:3], "big"),
                self.buffer[3],
                self.buffer[4],
            )
            stream = int.from_bytes(self.buffer[5:9], "big")
            payload = self.buffer[9 : 9 + length]
            self.buffer = self.buffer[9 + length :]
            if kind == 4 and not flags & 0x1:
                self.raw.sendall(_frame(4, 0x1, 0))
            elif kind == 6 and not flags & 0x1:
                self.raw.sendall(_frame(6, 0x1, 0, payload))
            elif kind == 1 and flags & 0x1:
                self.ended.add(stream)


def _tasks(server: BackgroundServer) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return server.call(count)


@pytest.mark.parametrize("method", _UNARY)
def test_a_unary_call_closed_without_its_message_is_answered_invalid_argument(
    shared_server: BackgroundServer, method: str
) -> None:
    # grpcio's asyncio server never answered such a call: the client waited for its deadline.
    error = _refusal(shared_server.port, lambda c: c.stream_unary(method)(iter(()), timeout=20))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "got the call closed without one" in error.details()
    _infer_ok(shared_server.port)


def test_a_health_watch_closed_without_its_message_is_answered_invalid_argument(
    shared_server: BackgroundServer,
) -> None:
    error = _refusal(
        shared_server.port, lambda c: list(c.stream_stream(_WATCH)(iter(()), timeout=20))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_calls_closed_without_a_message_leave_nothing_behind(
    shared_server: BackgroundServer,
) -> None:
    # Each such call held an asyncio task and ~4 KB until its connection closed, which a raw
    # client that answers pings never does (and made shutdown wait the whole --grace).
    before = _tasks(shared_server)
    with socket.create_connection(("127.0.0.1", shared_server.port)) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0))  # preface, SETTINGS
        for i in range(50):
            raw.sendall(_frame(1, 0x5, 1 + 2 * i, _headers(_UNARY[i % len(_UNARY)])))
        # Then one whole call: once it is answered, the server has taken the 50 before it.
        message = infer_payload("tiny", _X)
        raw.sendall(
            _frame(1, 0x4, 101, _headers(INFER))
            + _frame(0, 0x1, 101, b"\0" + struct.pack(">I", len(message)) + message)
        )
        peer = _Peer(raw)
        deadline = time.monotonic() + 30
        while 101 not in peer.ended and time.monotonic() < deadline:
            peer.pump(0.1)
        assert 101 in peer.ended
        deadline = time.monotonic() + 20
        while _tasks(shared_server) > before and time.monotonic() < deadline:
            peer.pump(0.1)
        assert _tasks(shared_server) <= before  # the connection still open
    _infer_ok(shared_server.port)


def test_a_gzip_request_inflating_above_max_message_bytes_is_refused(
    start_server: Callable[..., BackgroundServer],
) -> None:
    server = start_server(max_message_bytes=1 << 20)
    bomb = bytes(8 << 20)  # gzip: 8 KB on the wire
    gzip = grpc.Compression.Gzip
    error = _refusal(
        server.port, lambda c: c.unary_unary(INFER)(bomb, timeout=30, compression=gzip)
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _infer_ok(server.port)


@pytest.mark.parametrize(
    "metadata",
    [[("x-big", "a" * 100_000)], [(f"x-{i}", "v") for i in range(5000)]],
    ids=["one-huge-value", "thousands-of-entries"],
)
def test_enormous_metadata_is_refused_and_harms_no_one(
    shared_server: BackgroundServer, metadata: list[tuple[str, str]]
) -> None:
    payload = infer_payload("tiny", _X)
    error = _refusal(
        shared_server.port,
        lambda c: c.unary_unary(INFER)(payload, metadata=metadata, timeout=30),
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _infer_ok(shared_server.port)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(500),  # a TLS ClientHello
        os.urandom(100_000),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(50_000),
    ],
    ids=["http1", "tls-hello", "random", "preface-then-random"],
)
def test_bytes_that_are_not_http2_close_that_connection_only(
    shared_server: BackgroundServer, data: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", shared_server.port)) as raw:
        raw.settimeout(30)
        # The server may close while the bytes are still being sent.
        try:
            raw.sendall(data)
            while raw.recv(65536):
                pass
        except ConnectionResetError:
            pass
    _infer_ok(shared_server.port)
