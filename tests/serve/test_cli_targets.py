"""The one HOST:PORT check (serve.targets.check_target) of the client, health and bench CLIs."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serve import bench, client
from serve import health as health_cli
from serve.targets import check_target

BAD_TARGETS = [
    ("127.0.0.1:99999", "whose port is outside 1..65535; pass e.g. 127.0.0.1:8001"),
    ("127.0.0.1:0", "whose port is outside 1..65535"),
    ("127.0.0.1", "'127.0.0.1' without a port; pass e.g. 127.0.0.1:8001"),
    ("localhost:", "without a port; pass e.g. localhost:8001"),
    ("[::1]", "without a port; pass e.g. [::1]:8001"),
    (":8001", "without a host"),
    ("localhost:http", "whose port is not a number"),
    ("localhost:²", "whose port is not a number"),  # str.isdigit, but not int()'s
    ("", "got an empty target"),
]


def _client(target: str) -> int:
    with tempfile.NamedTemporaryFile(suffix=".png") as image:
        return client.main([target, "--model", "m", image.name])


def _health(target: str) -> int:
    return health_cli.main([target])


def _bench(target: str) -> int:
    return bench.main([target, "--model", "m"])


CLIS = {"client": _client, "health": _health, "bench": _bench}


@pytest.mark.parametrize(("target", "message"), BAD_TARGETS)
@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_refuses_a_target_without_a_usable_port(
    cli: str, target: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run: Callable[[str], int] = CLIS[cli]
    try:
        code = run(target)
    except SystemExit as e:  # argparse's parser.error
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "expected HOST:PORT, got " in line and message in line, line


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:8001", "localhost:1", "localhost:65535", "[::1]:8001", "unix:/tmp/serve.sock",
     "dns:///localhost:8001"],
)  # fmt: skip
def test_valid_targets_pass(target: str) -> None:
    check_target(target)


def test_health_probes_a_unix_socket() -> None:
    with tempfile.TemporaryDirectory(prefix="sock", dir="/tmp") as folder:
        target = f"unix:{Path(folder) / 'health.sock'}"
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(target)
        server.start()
        try:
            assert health_cli.main([target]) == 0
        finally:
            server.stop(None)
