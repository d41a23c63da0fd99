"""serve/halfclose.py against a real server: unary calls that gRPC itself ended before their
message was read are left to gRPC, as before the interceptor, without an error in the log."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import pytest

from serve.background import BackgroundServer
from tests.serve.v2 import INFER


def test_requests_above_max_message_bytes_log_no_error(
    start_server: Callable[..., BackgroundServer], caplog: pytest.LogCaptureFixture
) -> None:
    # gRPC refuses such a request itself (RESOURCE_EXHAUSTED) and hands the method no message:
    # the interceptor's INVALID_ARGUMENT could then not be sent, and grpc.aio logged an
    # "ExecuteBatchError raised in core" error with a traceback for a few in every thousand.
    server = start_server(max_message_bytes=1 << 16)
    payload = bytes(1 << 17)
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = channel.unary_unary(INFER)
        calls = [
            infer.future(payload, timeout=60, compression=grpc.Compression.Gzip if i % 2 else None)
            for i in range(2000)
        ]
        codes = set()
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call.result()
            codes.add(caught.value.code())
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    server.stop(5)  # every call's task has ended, and logged what it would
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
