"""`python -m serve` as a subprocess, for the tests where signals and exit codes matter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from serve.benchenv import wait_serving


class ServeProcess:
    """``with ServeProcess([...args]) as p:`` runs the server, waits until SERVING (or, with
    ``ready_line``, until that text is in its log: a TLS server, one still loading), kills after.

    stderr goes to a file (``p.log``), so a chatty server never blocks on a full pipe.
    ``unset`` names environment variables the server starts without; ``preexec`` runs in the
    child before the server starts (e.g. to set a signal's disposition).
    """

    def __init__(
        self,
        args: list[str],
        port: int,
        log: Path,
        ready_timeout: float = 120,
        cpus: set[int] | None = None,
        ready_line: str | None = None,
        unset: tuple[str, ...] = (),
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.args = args
        self.port = port
        self.log = log
        self.ready_timeout = ready_timeout
        self.cpus = cpus  # the CPU affinity it starts with, as under `taskset`
        self.ready_line = ready_line
        self.unset = unset
        self.preexec = preexec
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServeProcess:
        env = {k: v for k, v in os.environ.items() if k not in self.unset}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serve", *self.args],
                stdout=err,
                stderr=err,
                env=env,
                # None where nothing is to be done: Popen then needs no fork of this
                # multi-threaded process running Python code before the exec.
                preexec_fn=None if self.cpus is None and self.preexec is None else self._preexec,
            )
        if self._ready():
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
        self.kill()
        awaited = "SERVING" if self.ready_line is None else repr(self.ready_line)
        raise RuntimeError(f"server not {awaited} within {self.ready_timeout} s:\n{self.output()}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.ready_line is None:
            return wait_serving(self.proc, self.target, self.ready_timeout)
        deadline = time.monotonic() + self.ready_timeout
        while self.ready_line not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _preexec(self) -> None:
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus)
        if self.preexec is not None:
            self.preexec()

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def probe_until_serving(
    proc: subprocess.Popen, probe: list[str], cwd: Path | str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the health probe command ``probe`` (`python -m serve.health ...`, as the image's
    HEALTHCHECK does) until it passes, ``proc`` exits or ``timeout`` seconds pass; its last
    run."""
    until = time.monotonic() + timeout
    while True:
        done = subprocess.run(probe, cwd=cwd, capture_output=True, text=True, timeout=60)
        if done.returncode == 0 or proc.poll() is not None or time.monotonic() > until:
            return done
        time.sleep(0.2)
