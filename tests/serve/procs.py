"""`python -m serve` as a subprocess, for the tests where signals and exit codes matter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from serve.benchenv import wait_serving


class ServeProcess:
    """``with ServeProcess([...args]) as p:`` runs the server, waits until SERVING, kills after.

    stderr goes to a file (``p.log``), so a chatty server never blocks on a full pipe.
    """

    def __init__(
        self,
        args: list[str],
        port: int,
        log: Path,
        ready_timeout: float = 120,
        cpus: set[int] | None = None,
    ) -> None:
        self.args = args
        self.port = port
        self.log = log
        self.ready_timeout = ready_timeout
        self.cpus = cpus  # the CPU affinity it starts with, as under `taskset`
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serve", *self.args],
                stdout=err,
                stderr=err,
                env=env,
                preexec_fn=None if self.cpus is None else self._pin,
            )
        if wait_serving(self.proc, self.target, self.ready_timeout):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
        self.kill()
        raise RuntimeError(f"server not SERVING within {self.ready_timeout} s:\n{self.output()}")

    def _pin(self) -> None:
        assert self.cpus is not None
        os.sched_setaffinity(0, self.cpus)

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
