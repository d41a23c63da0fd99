"""HTTP/2 connection management in serve/server.py: client keepalive pings are welcome, the
server's own keepalive closes dead clients' connections, and --max-connection-age makes
clients reconnect (and so re-balance) without failing calls. Real servers, real gRPC clients.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from serve.background import BackgroundServer
from serve.config import ServerConfig
from tests.serve.v2 import INFER, infer_payload, reply_logits

Start = Callable[..., BackgroundServer]
_X = np.zeros((1, 3, 8, 8), np.float32)

# A client that keeps one tritonclient ModelStreamInfer stream open and sends one request on
# it per line read from stdin, printing OK or the error: a process the tests can SIGSTOP.
_STREAM_CLIENT = r"""
import queue, sys
import numpy as np, tritonclient.grpc as tc
client = tc.InferenceServerClient(sys.argv[1])
answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put(error))
x = np.zeros((1, 3, 8, 8), np.float32)
inp = tc.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
for _ in sys.stdin:
    try:
        client.async_stream_infer("tiny", [inp])
        error = answers.get(timeout=10)
    except Exception as e:
        error = e
    print("OK" if error is None else f"FAILED {error}", flush=True)
client.stop_stream()
client.close()
"""


def _input() -> tc.InferInput:
    inp = tc.InferInput("input", list(_X.shape), "FP32")
    inp.set_data_from_numpy(_X)
    return inp


@contextlib.contextmanager
def _stream(
    target: str, keepalive: tc.KeepAliveOptions | None = None
) -> Iterator[Callable[[], object]]:
    """An open tritonclient stream; yields ``send()``, which sends one request and returns the
    callback's error: None when answered, else the error that ended the stream."""
    options = {} if keepalive is None else {"keepalive_options": keepalive}
    client = tc.InferenceServerClient(target, **options)
    answers: queue.Queue[object] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error))

    def send() -> object:
        # When the stream has ended, sending raises and the callback already has the error.
        with contextlib.suppress(tc.InferenceServerException):
            client.async_stream_infer("tiny", [_input()])
        return answers.get(timeout=10)

    try:
        yield send
    finally:
        client.stop_stream()
        client.close()


def _states(channel: grpc.Channel) -> list[grpc.ChannelConnectivity]:
    """The connectivity states ``channel`` goes through from now on."""
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append)
    return states


# --- client keepalive -----------------------------------------------------------------------


def test_client_keepalive_every_second_keeps_an_idle_stream_usable(start_server: Start) -> None:
    # gRPC's default policy answered the third ping within 5 minutes with GOAWAY
    # too_many_pings: the request sent after the idle spell failed with UNAVAILABLE.
    server = start_server()
    keepalive = tc.KeepAliveOptions(keepalive_time_ms=1000, keepalive_permit_without_calls=True)
    with _stream(f"127.0.0.1:{server.port}", keepalive) as send:
        assert send() is None
        time.sleep(4)  # the client pings about once a second meanwhile
        assert send() is None


def test_client_keepalive_without_calls_keeps_the_connection(start_server: Start) -> None:
    # Before: GOAWAY too_many_pings after about 3 s, and the channel fell back to IDLE.
    server = start_server()
    options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        infer = channel.unary_unary(INFER)
        infer(infer_payload("tiny", _X), timeout=10)
        states = _states(channel)
        time.sleep(4)
        assert states == [grpc.ChannelConnectivity.READY], states


# --- server keepalive -----------------------------------------------------------------------


@pytest.mark.parametrize(("keepalive_time", "after"), [(0.2, "FAILED"), (0, "OK")])
def test_server_keepalive_closes_a_stopped_clients_stream(
    start_server: Start, keepalive_time: float, after: str
) -> None:
    server = start_server(keepalive_time=keepalive_time)
    client = subprocess.Popen(
        [sys.executable, "-c", _STREAM_CLIENT, f"127.0.0.1:{server.port}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "OK"
        # A stopped process still has its kernel acknowledge TCP, as a client behind a dead
        # NAT mapping never does: only an unanswered HTTP/2 PING tells the server.
        client.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        client.send_signal(signal.SIGCONT)
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().startswith(after)
        client.stdin.close()
        assert client.wait(30) == 0
    finally:
        client.send_signal(signal.SIGCONT)
        if client.poll() is None:
            client.kill()
            client.wait(30)


# --- connection age -------------------------------------------------------------------------


def test_max_connection_age_reconnects_without_failing_calls(start_server: Start) -> None:
    server = start_server(max_connection_age=0.3)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = channel.unary_unary(INFER)
        infer(infer_payload("tiny", _X), timeout=10)
        states = _states(channel)
        calls = 0
        # Calls for 2 s, and on until the channel has reconnected twice (a loaded machine may
        # take longer); the 30 s bound only stops a server that never ends a connection.
        start = time.monotonic()
        while time.monotonic() < start + 30 and (
            time.monotonic() < start + 2 or states.count(grpc.ChannelConnectivity.READY) < 3
        ):
            _, logits = reply_logits(infer(infer_payload("tiny", _X), timeout=10))
            assert logits.shape == (1, 5)
            calls += 1
    connections = states.count(grpc.ChannelConnectivity.READY)
    assert connections >= 3, (calls, states)  # the first, and one at least every ~0.3 s after


@pytest.mark.parametrize("grace", [None, 1.0])
def test_max_connection_age_cuts_open_streams_only_after_a_grace(
    start_server: Start, grace: float | None
) -> None:
    # With a grace the stream is cut about 2 s after it opened: time for a loaded machine to
    # answer the first request before (with 0.3 s and 0.3 s it could be cut first); sends go
    # on until it is, 30 at most.
    age = 0.3 if grace is None else 1.0
    server = start_server(max_connection_age=age, max_connection_age_grace=grace)
    with _stream(f"127.0.0.1:{server.port}") as send:
        results = []
        for _ in range(5 if grace is None else 30):
            results.append(send())
            if results[-1] is not None:
                break
            time.sleep(0.4)
    if grace is None:  # the default: a stream outlives its connection's age
        assert results == [None] * 5, results
        return
    *answered, failed = results
    assert answered and answered == [None] * len(answered), results
    # UNAVAILABLE (message "max connection age"): clients open a new stream.
    assert isinstance(failed, tc.InferenceServerException), results
    assert failed.status() == "StatusCode.UNAVAILABLE", failed


# --- flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"keepalive_time": -1.0}, "--keepalive-time 0 (off) or between 0.1"),
        ({"keepalive_time": float("nan")}, "--keepalive-time"),
        ({"keepalive_time": 0.01}, "--keepalive-time"),
        ({"max_connection_age": float("inf")}, "--max-connection-age 0 (off)"),
        ({"max_connection_age_grace": 5.0}, "got the grace alone"),
        ({"max_connection_age": 60.0, "max_connection_age_grace": -1.0}, "-grace between 0"),
    ],
)
def test_connection_flags_are_checked(
    base_config: ServerConfig, fields: dict[str, float], fragment: str
) -> None:
    with pytest.raises(ValueError, match="expected") as raised:
        ServerConfig(models=base_config.models, **fields)  # type: ignore[arg-type]
    assert fragment in str(raised.value)


def test_connection_flag_errors_exit_2_with_one_line() -> None:
    args = ["x.onnx", "--port", "0", "--metrics-port", "0", "--max-connection-age-grace", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "--max-connection-age" in line and "Traceback" not in line, line
