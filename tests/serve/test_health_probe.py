"""serve/health.py: the probe CLI against a real gRPC health service, and a real server."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serve.health import ProbeConfig, main, probe

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_serving_not_serving_and_unknown(
    health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("digits", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main([target]) == 0
    assert capsys.readouterr().out.strip() == f"SERVING: server at {target}"
    assert main([target, "--model", "digits"]) == 1
    assert capsys.readouterr().err.strip() == f"NOT_SERVING: model 'digits' at {target}"
    assert main([target, "--model", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("UNKNOWN: model 'nope'") and "check the model name" in err
    assert len(err.strip().splitlines()) == 1
    servicer.enter_graceful_shutdown()
    assert main([target]) == 1
    assert capsys.readouterr().err.startswith("NOT_SERVING")


def test_unreachable_is_not_serving() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, message = probe(ProbeConfig(f"127.0.0.1:{port}", timeout=5))
    assert code == 1
    assert message.startswith("UNREACHABLE") and "check the address" in message


def test_a_silent_server_times_out() -> None:
    with socket.socket() as s:  # accepts TCP but never speaks HTTP/2
        s.bind(("127.0.0.1", 0))
        s.listen()
        code, message = probe(ProbeConfig(f"127.0.0.1:{s.getsockname()[1]}", timeout=0.5))
    assert code == 1
    assert message.startswith("UNREACHABLE")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["localhost"], "expected HOST:PORT"),
        (["localhost:99999"], "expected HOST:PORT"),
        (["localhost:8001", "--timeout", "0"], "--timeout"),
        (["localhost:8001", "--tls-cert", "c.pem"], "--tls-key"),
        (["localhost:8001", "--tls-ca", "/nonexistent/ca.pem"], "--tls-ca"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_module_entry_point(health_server: tuple[str, health.HealthServicer]) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = subprocess.run(
        [sys.executable, "-m", "serve.health", target], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SERVING")
