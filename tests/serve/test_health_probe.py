"""serve/health.py: the probe CLI against a real gRPC health service, and a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serve.config import ServerConfig
from serve.health import ProbeConfig, main, probe
from tests.serve.conftest import free_port, server_held_loading
from tests.serve.pki import make_pki
from tests.serve.procs import ServeProcess
from tests.serve.v2 import INFER, infer_payload

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
    # The health servicer's NOT_FOUND carries no details: no empty "()" in their place.
    assert "()" not in err and "knows no such name" in err, err
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
        (["localhost:8001", "--timeout", "inf"], "expected --timeout > 0 seconds"),
        (["localhost:8001", "--timeout", "nan"], "expected --timeout > 0 seconds"),
        # gRPC takes a deadline past 2262 as passed: "did not answer within 1e+10s".
        (["localhost:8001", "--timeout", "1e10"], "at most 1e+09 (gRPC's deadlines end in 2262)"),
        (["localhost:8001", "--tls-cert", "c.pem"], "--tls-key"),
        (["localhost:8001", "--tls-server-name", "serve.internal"], "--tls-ca with --tls-server"),
        (["localhost:8001", "--tls-ca", "/nonexistent/ca.pem"], "--tls-ca"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"hello, not a certificate\n", "error: expected PEM certificates"), (b"", "empty file")],
)
def test_a_tls_ca_without_pem_certificates_is_one_usage_line(
    health_server: tuple[str, health.HealthServicer], tmp_path: Path, content: bytes, message: str
) -> None:
    target, _ = health_server
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    done = subprocess.run(
        [sys.executable, "-m", "serve.health", target, "--tls-ca", str(ca)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()  # no gRPC core log lines, no UNREACHABLE
    assert line.startswith("error: ") and message in line and str(ca) in line, line


def test_a_client_key_of_another_pair_is_one_usage_line(
    health_server: tuple[str, health.HealthServicer], tmp_path: Path
) -> None:
    """It used to reach gRPC, which logged native errors and reported the server unreachable."""
    target, _ = health_server
    pki = make_pki(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "serve.health", target, "--tls-ca", str(pki.ca),
         "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.server_key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert "got the key of another pair" in line and "--tls-key" in line, line


def test_a_tls_probe_of_a_plaintext_server_prints_one_line(
    health_server: tuple[str, health.HealthServicer], tmp_path: Path
) -> None:
    """gRPC's C core printed its own "Handshake failed" line at INFO before the probe's."""
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    pki = make_pki(tmp_path)
    # The probe's own default is under test: not one the environment sets.
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    done = subprocess.run(
        [sys.executable, "-m", "serve.health", target, "--tls-ca", str(pki.ca)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("UNREACHABLE: ") and "TLS flags" in line, line


def test_module_entry_point(health_server: tuple[str, health.HealthServicer]) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = subprocess.run(
        [sys.executable, "-m", "serve.health", target], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SERVING")


# --- the real server ------------------------------------------------------------------------


def test_probe_a_real_server_through_drain(classifier_path: Path, tmp_path: Path) -> None:
    port = free_port()
    args = [str(classifier_path), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--device", "cpu", "--grace", "20",
            # Holds the one request below in the queue, so the drain lasts seconds.
            "--max-queue-delay-us", "5000000"]
    with ServeProcess(args, port, tmp_path / "serve.log") as server:
        done = subprocess.run(
            [sys.executable, "-m", "serve.health", server.target, "--model", "tiny"],
            capture_output=True, text=True, timeout=60,
        )
        assert (done.returncode, done.stdout.strip()) == (
            0, f"SERVING: model 'tiny' at {server.target}"
        )
        code, message = probe(ProbeConfig(server.target, service="other"))
        assert code == 1 and message.startswith("UNKNOWN: model 'other'")
        assert "()" not in message and "check the model name" in message, message

        with grpc.insecure_channel(server.target) as channel:
            batch = np.zeros((1, 3, 8, 8), np.float32)
            pending = channel.unary_unary(INFER).future(infer_payload("tiny", batch), timeout=60)
            time.sleep(0.5)
            server.terminate()
            seen = []
            while not pending.done():
                seen.append(probe(ProbeConfig(server.target, timeout=5)))
                if seen[-1][0] != 0:
                    break
                time.sleep(0.02)
            assert seen and seen[-1] == (1, f"NOT_SERVING: server at {server.target}")
            assert not pending.done()
            assert pending.exception(timeout=60) is None
        assert server.wait(60) == 0
    code, message = probe(ProbeConfig(server.target, timeout=5))
    assert code == 1 and message.startswith("UNREACHABLE")


def test_a_model_still_loading_is_not_serving_by_name(
    base_config: ServerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Probed by name while loading, a model used to be unknown to health: NOT_FOUND, which
    # the probe words as "check the model name".
    with server_held_loading(base_config, monkeypatch) as (background, _):
        target = f"127.0.0.1:{background.config.port}"
        answer = (1, "")
        until = time.monotonic() + 30
        while "UNREACHABLE" in answer[1] or not answer[1]:
            assert time.monotonic() < until, answer
            answer = probe(ProbeConfig(target, service="tiny", timeout=2))
        assert answer == (1, f"NOT_SERVING: model 'tiny' at {target}")
