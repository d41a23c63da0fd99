"""serve/client.py: the targets a Client accepts, and a Client used after close()."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from serve.background import BackgroundServer
from serve.bench import main as bench_main
from serve.client import Client, ClientError
from serve.client_cli import main as client_main
from serve.health import main as health_main
from serve.targets import check_target

GOOD = np.zeros((1, 3, 8, 8), np.float32)

# gRPC connects each of these to port 443 (or cannot resolve it), where the server is on 8001.
NO_PORT = [
    ("localhost", "'localhost' without a port; pass e.g. localhost:8001"),
    ("127.0.0.1", "without a port; pass e.g. 127.0.0.1:8001"),
    ("[::1]", "without a port; pass e.g. [::1]:8001"),
    ("::1", "an IPv6 address without brackets; pass e.g. [::1]:8001"),
    ("::1:8001", "an IPv6 address without brackets; pass e.g. [::1]:8001"),
    ("dns:///localhost", "expected dns:///HOST:PORT, got 'dns:///localhost'; pass the port"),
    ("dns://8.8.8.8/localhost", "expected dns:///HOST:PORT"),
    ("unix:", "'unix:' without a path; pass e.g. unix:/run/serve.sock"),
    # Taken for resolver URIs: "errors resolving", exit 1 instead of a usage error.
    ("http://localhost", "a URL: gRPC targets take no scheme; pass e.g. localhost:8001"),
    ("HTTPS://triton.example.com", "a URL: gRPC targets take no scheme"),
    ("grpc://localhost:8001", "a URL: gRPC targets take no scheme"),
    ("http://127.0.0.1:18431/v2", "a URL: gRPC targets take no scheme; pass e.g. 127.0.0.1:18431"),
    ("http://[::1]", "a URL: gRPC targets take no scheme; pass e.g. localhost:8001"),
]


@pytest.mark.parametrize(("target", "message"), NO_PORT)
def test_a_target_without_a_port_is_refused(target: str, message: str) -> None:
    """Client("localhost") connected to port 443: every call failed UNAVAILABLE, and
    wait_ready said "got no answer", where the command line refuses the same target."""
    with pytest.raises(ValueError, match="expected ") as caught:
        Client(target)
    assert message in str(caught.value)


@pytest.mark.parametrize(("target", "message"), NO_PORT)
def test_the_command_line_refuses_what_the_library_refuses(
    target: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with tempfile.NamedTemporaryFile(suffix=".png") as image, pytest.raises(SystemExit) as done:
        client_main([target, "--model", "m", image.name])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("target", "message"), NO_PORT)
def test_the_health_probe_and_the_bench_refuse_them_too(
    target: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # One check (serve/targets.py) for the library and every command line: "::1" once passed
    # the probe's and the bench's check and connected to port 443.
    assert health_main([target]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        bench_main([target, "--model", "m"])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "target",
    ["localhost:8001", "[::1]:8001", "dns:///localhost:8001", "dns://8.8.8.8/host:1",
     "dns:localhost:8001", "unix:/tmp/serve.sock", "unix-abstract:serve", "ipv4:127.0.0.1:8001",
     "ipv6:[::1]:8001", "xds:///classifier"],
)  # fmt: skip
def test_targets_with_a_port_or_of_other_forms_are_accepted(target: str) -> None:
    check_target(target)
    Client(target).close()  # no connection is made until a call


def test_a_client_answers_through_dns_and_ipv4_uris(shared_server: BackgroundServer) -> None:
    port = shared_server.port  # bound to 127.0.0.1
    for target in (f"dns:///127.0.0.1:{port}", f"ipv4:127.0.0.1:{port}"):
        with Client(target) as client:
            assert client.infer("tiny", GOOD).shape == (1, 5)


def test_a_closed_client_says_so(shared_server: BackgroundServer) -> None:
    """Every call raised gRPC's ValueError "Cannot invoke RPC on closed channel!", which did not
    say that the Client was closed, nor to make a new one."""
    target = f"127.0.0.1:{shared_server.port}"
    with Client(target) as client:
        assert client.infer("tiny", GOOD).shape == (1, 5)
    calls = {
        "infer": lambda: client.infer("tiny", GOOD),
        "classify": lambda: client.classify("tiny", [GOOD[0]]),
        "model_metadata": lambda: client.model_metadata("tiny"),
        "wait_ready": lambda: client.wait_ready(timeout=1),
        "infer_stream": lambda: next(client.infer_stream("tiny", [GOOD])),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as caught:
            call()
        assert str(caught.value) == (
            f"expected an open Client, got one of {target} that was closed (close() or the end "
            f"of its with block); create a new Client('{target}')"
        ), name
    client.close()  # again: nothing to do


def test_closing_a_client_under_a_call_says_so(shared_server: BackgroundServer) -> None:
    """A stream open on another thread ended in "CANCELLED: Stream removed (Channel closed!)"."""
    started = threading.Event()

    def slow() -> Iterator[np.ndarray]:
        while True:
            started.set()
            yield GOOD
            time.sleep(0.05)

    client = Client(f"127.0.0.1:{shared_server.port}")
    failed: list[BaseException] = []

    def stream() -> None:
        try:
            for _ in client.infer_stream("tiny", slow(), window=1):
                pass
        except ClientError as e:
            failed.append(e)

    worker = threading.Thread(target=stream)
    worker.start()
    assert started.wait(30)
    client.close()
    worker.join(30)
    (error,) = failed
    assert isinstance(error, ClientError)
    assert error.code == grpc.StatusCode.CANCELLED
    assert "was closed while this call was in flight" in str(error)


@pytest.mark.parametrize("size", [2**31, 0, -2, 1.5, "64MB"])
def test_max_message_bytes_beyond_grpcs_range_is_refused(
    shared_server: BackgroundServer, size: object
) -> None:
    """2**31 raised OverflowError from gRPC's C core; 0 failed every call RESOURCE_EXHAUSTED
    "raise the limit"; a float or a str was dropped without a word (the 4 MiB default)."""
    with pytest.raises(ValueError, match=r"expected max_message_bytes in 1\.\.2147483647"):
        Client(f"127.0.0.1:{shared_server.port}", max_message_bytes=size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [2**31 - 1, -1])
def test_max_message_bytes_at_grpcs_limits_works(
    shared_server: BackgroundServer, size: int
) -> None:
    with Client(f"127.0.0.1:{shared_server.port}", max_message_bytes=size) as client:
        assert client.infer("tiny", GOOD).shape == (1, 5)


@pytest.mark.parametrize("window", ["8", 2.5, None])
def test_a_window_of_another_type_is_named(
    shared_server: BackgroundServer, window: object
) -> None:
    """A str ended in "'<' not supported between instances of 'str' and 'int'"; 2.5 was
    taken as is."""
    client = Client(f"127.0.0.1:{shared_server.port}")
    with client, pytest.raises(TypeError, match="expected window as an int, got"):
        next(client.infer_stream("tiny", [GOOD], window=window))  # type: ignore[arg-type]
