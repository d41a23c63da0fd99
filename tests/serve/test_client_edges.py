"""serve/client.py, serve/client_cli.py and serve/health.py at the edges a long-running
application or a script meets: a server restarting under a shared Client, Ctrl-C, file names
that are not UTF-8, and "-" without a stdin to read."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serve.background import BackgroundServer
from serve.client import Client, ClientError
from serve.config import ServerConfig
from tests.serve.conftest import free_port

GOOD = np.zeros((1, 3, 8, 8), np.float32)


def _png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (90, 30, 200)).save(path, format="PNG")
    return path


def _answer_until(client: Client, deadline: float) -> list[str]:
    """Call ``infer`` every 0.2 s until one answers or ``deadline`` (monotonic) passes;
    the failures' messages, in order."""
    failures = []
    while time.monotonic() < deadline:
        try:
            client.infer("tiny", GOOD)
            return failures
        except ClientError as e:
            failures.append(f"{e.code.name}: {e}")
        time.sleep(0.2)
    raise AssertionError(f"no answer before the deadline; the last failures: {failures[-3:]}")


def test_a_call_while_the_server_is_down_says_to_retry(base_config: ServerConfig) -> None:
    """A restarting server refuses connections: the message only said to check the address,
    the server and TLS, never that a retry may be all it takes."""
    config = replace(base_config, port=free_port())
    with Client(f"127.0.0.1:{config.port}", timeout=5) as client:
        with BackgroundServer(config):
            assert client.infer("tiny", GOOD).shape == (1, 5)
        with pytest.raises(ClientError) as caught:
            client.infer("tiny", GOOD)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "cannot reach a ready server" in str(caught.value)
    assert "retry if it is restarting" in str(caught.value)


def test_a_client_reconnects_soon_after_its_server_restarts(base_config: ServerConfig) -> None:
    """gRPC's reconnect backoff grows 1.6x from 1 s up to 120 s: a Client of a long-running
    service tried to reconnect at 1, 2.6, 5.2, 9.3, 15.8, 26.3, 43.1 s (each step ±20 %) into
    an outage. 30 s down, every call failed UNAVAILABLE for some 13 s more with the server
    back; the outage sits between two of those attempts, so the old client fails here."""
    config = replace(base_config, port=free_port())
    with Client(f"127.0.0.1:{config.port}", timeout=5) as client:
        with BackgroundServer(config):
            assert client.infer("tiny", GOOD).shape == (1, 5)
        down = time.monotonic() + 30
        while time.monotonic() < down:  # traffic meanwhile, as a service's would be
            with pytest.raises(ClientError) as caught:
                client.infer("tiny", GOOD)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            time.sleep(0.2)
        with BackgroundServer(config):  # ready when it returns
            # Backoff now at most 2 s (+20 % jitter): two attempts at least in 6 s.
            failures = _answer_until(client, time.monotonic() + 6)
    assert all(f.startswith("UNAVAILABLE: ") for f in failures), failures


def test_cli_prints_a_file_name_that_is_not_utf8(
    shared_server: BackgroundServer, tmp_path: Path
) -> None:
    """Under a UTF-8 locale stdout is strict: printing the name (held with surrogates) was a
    UnicodeEncodeError traceback after the image had been classified."""
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 é, as on an old disk or a Windows share
    image = _png(tmp_path / name)
    done = subprocess.run(
        [sys.executable, "-m", "serve.client", f"127.0.0.1:{shared_server.port}",
         "--model", "tiny", str(image), "--top-k", "1"],
        capture_output=True, timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},  # what en_US.UTF-8 gives
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.splitlines()[0] == os.fsencode(image)  # the bytes, for a script to open
    assert b"label" in done.stdout.splitlines()[1]


@contextlib.contextmanager
def _silent_server() -> Iterator[tuple[str, socket.socket]]:
    """A port that accepts TCP but never speaks HTTP/2: a call waits there."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(60)
        yield f"127.0.0.1:{listener.getsockname()[1]}", listener


def _exec_after(setup: str, command: list[str]) -> list[str]:
    """``command`` run by a Python that first runs ``setup``: no ``preexec_fn``, which is not
    safe in a process with threads (gRPC's, here)."""
    return [sys.executable, "-c", f"import os, signal, sys; {setup}; os.execv(sys.argv[1], "
            "sys.argv[1:])", *command]  # fmt: skip


def _interrupted(command: list[str], listener: socket.socket) -> subprocess.CompletedProcess[str]:
    """Run ``command``, Ctrl-C it once it has connected to ``listener``, and wait for it."""
    # A shell's background job ignores SIGINT, and so would the child of one.
    command = _exec_after("signal.signal(signal.SIGINT, signal.SIG_DFL)", command)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        connection, _ = listener.accept()  # the call is waiting for the server now
        with connection:
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.mark.parametrize("command", ["serve.client", "serve.health"])
def test_ctrl_c_while_waiting_is_one_line(tmp_path: Path, command: str) -> None:
    """Ctrl-C during a call printed gRPC's KeyboardInterrupt traceback."""
    with _silent_server() as (target, listener):
        args = {
            "serve.client": ["--model", "tiny", str(_png(tmp_path / "a.png")), "--timeout", "60"],
            "serve.health": ["--timeout", "60"],
        }[command]
        done = _interrupted([sys.executable, "-m", command, target, *args], listener)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: interrupted")


def test_cli_dash_without_a_stdin_is_a_usage_error(
    shared_server: BackgroundServer, tmp_path: Path
) -> None:
    """With stdin closed ("<&-") sys.stdin is None: an AttributeError traceback. On a terminal
    the read waited for typed input without a word."""
    command = [sys.executable, "-m", "serve.client", f"127.0.0.1:{shared_server.port}",
               "--model", "tiny", str(_png(tmp_path / "a.png")), "-"]  # fmt: skip
    closed = subprocess.run(
        _exec_after("os.close(0)", command), capture_output=True, text=True, timeout=120
    )
    assert closed.returncode == 2, closed.stderr
    assert closed.stderr.startswith("error: expected an image on stdin for IMAGE '-', got no stdin")
    assert closed.stdout == ""  # checked before the first call
    terminal, other_end = pty.openpty()
    try:
        typed = subprocess.run(command, stdin=other_end, capture_output=True, text=True, timeout=60)
    finally:
        os.close(terminal)
        os.close(other_end)
    assert typed.returncode == 2, typed.stderr
    assert "got a terminal; pipe one in (... - < cat.png)" in typed.stderr


@pytest.mark.parametrize("count", [1, 60])
def test_cli_whose_reader_went_away_stops_quietly(
    shared_server: BackgroundServer, tmp_path: Path, count: int
) -> None:
    """`python -m serve.client ... | head -1`: a BrokenPipeError traceback (60 images fill
    stdout's buffer mid-run), or for a few lines Python's "Exception ignored" at exit."""
    image = _png(tmp_path / "a.png")
    reader, writer = os.pipe()
    os.close(reader)  # as head does once it has its lines
    try:
        done = subprocess.run(
            [sys.executable, "-m", "serve.client", f"127.0.0.1:{shared_server.port}",
             "--model", "tiny", *[str(image)] * count],
            stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert done.returncode == 141, done.stderr  # 128 + SIGPIPE, as a shell reports it
    assert done.stderr == ""
