"""The `python -m serve` process's life: signals at start-up, hangups, and the metrics port's
addresses. Real processes and real signals; the tests of SIGTERM's drain are in test_drain.py."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serve import metrics as metrics_module
from serve.client import Client
from serve.config import ServerConfig
from serve.metrics import Metrics
from serve.server import Server
from tests.serve.conftest import free_port
from tests.serve.procs import ServeProcess
from tests.serve.test_main import _ipv6_loopback

ROOT = Path(__file__).parents[2]  # `-c` programs import serve from the working directory
IN_FLIGHT = 4
# A program that runs `python -m serve ARGS` and sends itself SIGNUM as it first imports
# asyncio: inside serve/__main__.py's imports, before the event loop exists, a moment no
# outside sender can hit reliably.
_SIGNAL_AT_IMPORT = """
import os, runpy, sys

signum = int(sys.argv[1])

class SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == "asyncio":
            sys.meta_path.remove(self)
            print("signalled at import", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signum)

sys.meta_path.insert(0, SignalAtImport())
sys.argv = ["serve", *sys.argv[2:]]
runpy.run_module("serve", run_name="__main__", alter_sys=True)
"""


def _args(port: int, model: Path, *more: str) -> list[str]:
    return [str(model), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
            "--device", "cpu", "--grace", "30", *more]  # fmt: skip


def _hangups_end_it() -> None:
    """In a child before its exec: SIGHUP's default action, as for a server started from a
    terminal. Under `nohup` or a runner that ignores hangups it would inherit SIG_IGN, and
    (rightly, see the nohup test below) serve on through the test's hangup."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _held(port: int, model: Path) -> list[str]:
    # Batches wait 3 s for company, so the requests sent are still in flight at the signal.
    return _args(port, model, "--max-queue-delay-us", "3000000")


@contextlib.contextmanager
def _in_flight(target: str) -> Iterator[list[Future[np.ndarray]]]:
    """IN_FLIGHT inference calls to ``target``, sent and (on loopback) queued on entry."""
    x = np.zeros((1, 3, 8, 8), np.float32)
    with Client(target, timeout=60) as client, ThreadPoolExecutor(IN_FLIGHT) as pool:
        calls = [pool.submit(client.infer, "tiny", x) for _ in range(IN_FLIGHT)]
        time.sleep(1.0)  # well inside the 3 s the batch waits
        assert not any(call.done() for call in calls), "answered before the signal"
        yield calls


def test_sighup_drains_the_requests_in_flight(classifier_path: Path, tmp_path: Path) -> None:
    # SIGHUP (the terminal closed, ssh dropped) killed the server at once: every call in
    # flight failed UNAVAILABLE. A hangup comes twice (the kernel and the shell each send
    # one): the second must not cut the drain short.
    port = free_port()
    held = _held(port, classifier_path)
    with ServeProcess(held, port, tmp_path / "log", preexec=_hangups_end_it) as server:
        assert server.proc is not None
        with _in_flight(server.target) as calls:
            server.proc.send_signal(signal.SIGHUP)
            server.proc.send_signal(signal.SIGHUP)
            answers = [call.result(60) for call in calls]
        assert server.wait(60) == 0, server.output()
    assert [a.shape for a in answers] == [(1, 5)] * IN_FLIGHT
    log = server.output()
    assert "SIGHUP received; shutting down" in log, log
    assert f"draining: {IN_FLIGHT} requests in flight" in log, log
    assert "Traceback" not in log


def test_closing_its_terminal_drains_the_requests_in_flight(classifier_path: Path) -> None:
    # The same through a real terminal: the server leads a session on a pseudo-terminal,
    # whose closing sends SIGHUP, and whose log lines fail to write (EIO) from then on.
    port = free_port()
    master, slave = pty.openpty()

    def lead_a_session_on_the_terminal() -> None:
        _hangups_end_it()
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", *_held(port, classifier_path)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=lead_a_session_on_the_terminal,
    )
    os.close(slave)
    try:
        log = b""
        while b"ready: serving" not in log:  # the pty buffer is small: read as it comes
            chunk = os.read(master, 65536)
            assert chunk, log.decode(errors="replace")
            log += chunk
        with _in_flight(f"127.0.0.1:{port}") as calls:
            os.close(master)
            master = -1
            answers = [call.result(60) for call in calls]
        assert proc.wait(60) == 0
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert [a.shape for a in answers] == [(1, 5)] * IN_FLIGHT


def test_a_server_started_under_nohup_keeps_ignoring_sighup(
    classifier_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    server = ServeProcess(_args(port, classifier_path), port, tmp_path / "log")
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` does; inherited
    try:
        server.start()
    finally:
        signal.signal(signal.SIGHUP, previous)
    try:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        with Client(server.target, timeout=30) as client:  # still serving
            assert client.infer("tiny", np.zeros((1, 3, 8, 8), np.float32)).shape == (1, 5)
        # Had the hangup been taken, SIGTERM would be a second signal: exit 143 at once.
        server.terminate()
        assert server.wait(60) == 0, server.output()
    finally:
        server.kill()
    log = server.output()
    assert "SIGTERM received; shutting down" in log, log
    assert "SIGHUP" not in log, log


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_start_up_imports_stops_in_one_line(
    classifier_path: Path, signum: signal.Signals
) -> None:
    # Before the event loop's handlers were in place (some 50 ms of imports), Ctrl-C printed
    # a KeyboardInterrupt traceback and SIGTERM killed the process without a word.
    program = [sys.executable, "-c", _SIGNAL_AT_IMPORT, str(int(signum))]
    done = subprocess.run(
        [*program, *_args(free_port(), classifier_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert "signalled at import" in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert f"{signum.name}: signal received while loading models; stopping" in done.stderr
    assert "Traceback" not in done.stderr and "loaded from" not in done.stderr, done.stderr


def _new_pid_namespace() -> list[str] | None:
    """A command prefix that runs its command as PID 1 of a new PID namespace, or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--pid", "--fork", "--kill-child"]
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if done.returncode == 0 and done.stdout.strip() == "1" else None


def test_sigterm_to_a_pid_1_server_during_start_up_is_not_lost(
    classifier_path: Path, tmp_path: Path
) -> None:
    # Python as a container's PID 1 (no tini): the kernel drops a signal whose action is the
    # default, so a SIGTERM before the handlers were in place was lost; the server went on to
    # serve and the pod waited out its grace period for the SIGKILL.
    prefix = _new_pid_namespace()
    if prefix is None:
        pytest.skip("cannot start a process in a new PID namespace (unshare, root)")
    log = tmp_path / "log"
    with log.open("wb") as err:
        program = [sys.executable, "-c", _SIGNAL_AT_IMPORT, str(int(signal.SIGTERM))]
        proc = subprocess.Popen(
            [*prefix, *program, *_args(free_port(), classifier_path)],
            stdout=err,
            stderr=err,
            cwd=ROOT,
        )
    try:
        while proc.poll() is None and "ready: serving" not in log.read_text():
            time.sleep(0.05)
        assert "ready: serving" not in log.read_text(), "the SIGTERM was lost"
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    output = log.read_text()
    assert "signalled at import" in output, output
    assert "SIGTERM: signal received while loading models; stopping" in output, output


def _resolving(monkeypatch: pytest.MonkeyPatch, name: str, *addresses: str) -> None:
    """Make ``name`` resolve to ``addresses`` (as a hosts file listing them would)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> list:
        if host != name:
            return real(host, port, *args, **kwargs)  # type: ignore[arg-type]
        return [
            info
            for address in addresses
            for info in real(address, port, *args, **kwargs)  # type: ignore[arg-type]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read()


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_the_metrics_port_binds_every_address_of_its_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # `--host localhost` where localhost is 127.0.0.1 and ::1: gRPC listened on both, the
    # metrics port on the first alone, so a scrape of [::1] was refused.
    _resolving(monkeypatch, "dual.test", "127.0.0.1", "::1")
    port = free_port()
    metrics = Metrics()
    metrics.serve_http("dual.test", port)
    try:
        assert metrics.http_port == port
        for url in (f"http://127.0.0.1:{port}/metrics", f"http://[::1]:{port}/metrics"):
            assert b"serve_requests_total" in _scrape(url), url
    finally:
        metrics.close()
    with pytest.raises(OSError):  # closed: every address
        _scrape(f"http://[::1]:{port}/metrics")


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_localhost_metrics_listen_on_both_loopbacks_as_grpc_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gRPC binds 127.0.0.1 and ::1 for `--host localhost` whatever the hosts file says; the
    # metrics port followed the resolver, which here (and on many hosts) gives 127.0.0.1 alone.
    _resolving(monkeypatch, "localhost", "127.0.0.1")
    port = free_port()
    metrics = Metrics()
    metrics.serve_http("localhost", port)
    try:
        for url in (f"http://127.0.0.1:{port}/metrics", f"http://[::1]:{port}/metrics"):
            assert b"serve_requests_total" in _scrape(url), url
    finally:
        metrics.close()


def test_the_metrics_port_skips_an_address_the_machine_lacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: its bind fails as ::1's does where IPv6
    # is switched off. The other address serves; only when none can is it an error.
    _resolving(monkeypatch, "partly.test", "192.0.2.1", "127.0.0.1")
    _resolving(monkeypatch, "absent.test", "192.0.2.1")
    port = free_port()
    metrics = Metrics()
    metrics.serve_http("partly.test", port)
    try:
        assert b"serve_requests_total" in _scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        metrics.close()
    with pytest.raises(OSError, match=r"absent\.test:\d+ unavailable .*--metrics-port or --host"):
        Metrics().serve_http("absent.test", port)


def test_a_metrics_port_taken_on_one_address_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Skipping is for absent addresses only: a port in use on one of them leaves none bound.
    _resolving(monkeypatch, "taken.test", "127.0.0.2", "127.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = Metrics()
        with pytest.raises(OSError, match="pass another --metrics-port"):
            metrics.serve_http("taken.test", port)
    with pytest.raises(OSError):  # 127.0.0.2's server was closed with the failure
        _scrape(f"http://127.0.0.2:{port}/metrics")


def test_the_metrics_port_binds_without_reverse_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    # HTTPServer asked reverse DNS for each address's name (socket.getfqdn), which nothing
    # reads: where the resolver does not answer, start-up waited out its timeouts.
    def getfqdn(name: str = "") -> str:
        raise AssertionError(f"reverse DNS lookup of {name!r} at bind")

    monkeypatch.setattr(socket, "getfqdn", getfqdn)
    port = free_port()
    metrics = Metrics()
    metrics.serve_http("127.0.0.1", port)
    try:
        assert metrics.http_port == port
        assert b"serve_requests_total" in _scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        metrics.close()


def _threads_back_to(count: int) -> None:
    """Wait until the process runs ``count`` threads again (a connection's thread ended)."""
    deadline = time.monotonic() + 30
    while threading.active_count() > count:
        assert time.monotonic() < deadline, threading.enumerate()
        time.sleep(0.01)


def test_an_idle_metrics_connection_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each connection that sent nothing held a thread for ever (200 idle, 200 threads).
    monkeypatch.setattr(metrics_module, "_IDLE_S", 0.5, raising=False)
    port = free_port()
    metrics = Metrics()
    metrics.serve_http("127.0.0.1", port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as idle:
            idle.sendall(b"GET /metr")  # and no more
            assert idle.recv(1024) == b""  # closed by the server, not timed out here
        assert b"serve_requests_total" in _scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        metrics.close()


def test_a_reset_metrics_connection_prints_no_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # socketserver printed a traceback on stderr for a client that reset its connection
    # mid-request: lines outside --log-format json, for any port scanner to cause.
    port = free_port()
    metrics = Metrics()
    metrics.serve_http("127.0.0.1", port)
    try:
        threads = threading.active_count()
        reset = socket.create_connection(("127.0.0.1", port))
        reset.sendall(b"GET /metr")
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()  # with SO_LINGER 0: a reset, not a FIN
        _threads_back_to(threads)
        assert b"serve_requests_total" in _scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        metrics.close()
    assert "Traceback" not in capsys.readouterr().err


def test_a_start_cancelled_anywhere_stops_without_an_error(
    base_config: ServerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # A signal cancels start() wherever it is; cancelled inside gRPC's own start, the stop
    # that followed failed in gRPC's shutdown (InvalidStateError, an ERROR and a traceback).
    async def cancelled_after(turns: int) -> bool:
        server = Server(base_config)
        starting = asyncio.create_task(server.start())
        for _ in range(turns):
            await asyncio.sleep(0)
        finished = starting.done()
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await server.stop(0)
        return finished

    caplog.set_level(logging.WARNING)
    # Until start() finishes before the cancel: about 30-200 turns here, more where its
    # threads (model loading) get less of a loaded machine than the turning loop does.
    for turns in range(10_000):
        if asyncio.run(cancelled_after(turns)):
            break
    assert 5 < turns < 9_999
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
