"""What the benchmark measures beside the load: in-process ONNX Runtime, a spawned server, and
the server's Prometheus metrics."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serve import affinity

if TYPE_CHECKING:
    from serve.model_info import ModelInfo


@dataclass(frozen=True)
class InProcess:
    """In-process ONNX Runtime by batch size: images/s, seconds per batch, and the intra-op
    thread count (0: the server's default, ``affinity.thread_plan``) that gave the best
    throughput at that size."""

    throughput: dict[int, float]
    latency: dict[int, float]
    threads: dict[int, int]

    @property
    def best_batch(self) -> int:
        return max(self.throughput, key=self.throughput.__getitem__)

    @property
    def best(self) -> float:
        return self.throughput[self.best_batch]

    @property
    def single(self) -> float:
        """Images/s at batch 1 (0 when batch 1 was not measured)."""
        return self.throughput.get(1, 0.0)

    def best_of(self, other: InProcess) -> InProcess:
        """Per batch size, the faster of this measurement and ``other``."""
        throughput, latency, threads = dict(self.throughput), dict(self.latency), dict(self.threads)
        for batch, value in other.throughput.items():
            if value > throughput.get(batch, 0.0):
                throughput[batch] = value
                latency[batch] = other.latency[batch]
                threads[batch] = other.threads[batch]
        return InProcess(throughput, latency, threads)


class ModelFileError(ValueError):
    """The model file cannot serve as the baseline: missing, refused by ONNX Runtime, or not a
    classifier the server would serve (two inputs, int64 input, no fixed sample shape, ...)."""


def _session(path: Path, options: Any = None, providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session of ``path``; ModelFileError when ORT refuses the file."""
    import onnxruntime as ort

    from serve.runtime import open_session

    if not path.is_file():
        raise ModelFileError(
            f"expected an ONNX model file, got {str(path)!r} (no such file); check the path"
        )
    try:
        return open_session(
            path, options or ort.SessionOptions(), providers or ["CPUExecutionProvider"]
        )
    except ValueError as e:  # refused the model, said in one line with what to do
        raise ModelFileError(str(e)) from e


def _model_info(path: Path) -> ModelInfo:
    """What the server reads from ``path`` (the same reader); ModelFileError when it would
    refuse to serve it."""
    from serve.model_info import read_model_info

    try:
        return read_model_info(path.stem, path)
    except ValueError as e:  # says what is wrong with the model and what to do
        raise ModelFileError(str(e)) from e


def _providers(device: str) -> tuple[list[str], list[str]]:
    """The providers for the baseline on ``device``, and the CUDA libraries that did not load
    (named by the provider check of measure_in_process when CUDA is not created)."""
    if device != "cuda":
        return ["CPUExecutionProvider"], []
    from serve.runtime import preload_cuda_libraries

    return ["CUDAExecutionProvider", "CPUExecutionProvider"], preload_cuda_libraries()


def check_model_file(path: Path, device: str = "cpu") -> ModelInfo:
    """What the server reads from the ONNX file at ``path`` (input name, sample shape, class
    count), after loading it once as the baseline on ``device`` will; ModelFileError saying
    what to do when it cannot serve as one."""
    _session(path, providers=_providers(device)[0])
    return _model_info(path)


def measure_in_process(
    path: Path,
    batches: tuple[int, ...],
    seconds: float,
    threads: tuple[int, ...] = (0,),
    device: str = "cpu",
) -> InProcess:
    """Run the model file on the CPU provider at each batch size for about ``seconds`` with
    each intra-op thread count, keeping the best per batch size: the ratios are then to the
    best this machine does without a server in the way."""
    import onnxruntime as ort

    throughput: dict[int, float] = {}
    latency: dict[int, float] = {}
    best_threads: dict[int, int] = {}
    rng = np.random.default_rng(0)
    info: ModelInfo | None = None
    for count in threads:
        options = ort.SessionOptions()
        # A failing run comes back as an exception that serve/bench.py says in one line; ORT's
        # log would print it a second time. With CUDA the log says why a provider failed.
        options.log_severity_level = 4 if device == "cpu" else 3
        # 0 is what the server does by default: ORT's count, capped to what this process may use.
        (affinity.thread_plan() if count == 0 else affinity.ThreadPlan(count)).apply(options)
        providers, missing = _providers(device)
        session = _session(path, options, providers)
        if session.get_providers()[0] != providers[0]:
            from serve.runtime import cuda_unusable

            raise RuntimeError(
                f"expected {providers[0]} for the in-process baseline, got "
                f"{session.get_providers()} ({cuda_unusable(missing)}); check the GPU set-up or "
                "pass --baseline-device cpu"
            )
        info = info or _model_info(path)  # read after ONNX Runtime has loaded the file
        for batch in batches:
            x = rng.random((batch, *info.sample_shape), dtype=np.float32)
            session.run(None, {info.input_name: x})
            runs = 0
            started = time.perf_counter()
            while True:
                session.run(None, {info.input_name: x})
                runs += 1
                elapsed = time.perf_counter() - started
                if elapsed >= seconds and runs >= 3:
                    break
            if runs * batch / elapsed > throughput.get(batch, 0.0):
                throughput[batch] = runs * batch / elapsed
                latency[batch] = elapsed / runs
                best_threads[batch] = count
    return InProcess(throughput, latency, best_threads)


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: each is held until all are picked, since two ports taken
    one after the other (a gRPC and a metrics port) can be the same one."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket())
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def wait_serving(proc: subprocess.Popen[bytes], target: str, timeout: float) -> bool:
    """Probe gRPC health at ``target`` until SERVING (True), or until ``proc`` exits or
    ``timeout`` seconds pass (False)."""
    from serve.health import ProbeConfig, probe

    until = time.monotonic() + timeout
    while time.monotonic() < until and proc.poll() is None:
        if probe(ProbeConfig(target, timeout=2))[0] == 0:
            return True
        time.sleep(0.1)
    return False


class SpawnedServer:
    """``python -m serve MODEL --host 127.0.0.1`` on free ports, as a separate process (its own
    GIL). ``with SpawnedServer(model, args) as s:`` waits for SERVING and stops it after."""

    def __init__(
        self,
        model: Path,
        args: list[str],
        ready_timeout: float = 300,
        progress_every: float = 30,
    ) -> None:
        self.model = model
        self.args = args
        self.port, self.metrics_port = free_ports(2)
        self.ready_timeout = ready_timeout
        self.progress_every = progress_every
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        command = [
            sys.executable, "-m", "serve", str(self.model), "--host", "127.0.0.1",
            "--port", str(self.port), "--metrics-port", str(self.metrics_port), *self.args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=self._log, env=env)
        waited = 0.0
        while waited < self.ready_timeout and self.proc.poll() is None:
            # In steps, so a slow start says so on stderr instead of waiting in silence.
            step = min(self.progress_every, self.ready_timeout - waited)
            if wait_serving(self.proc, self.target, step):
                return
            waited += step
            if self.proc.poll() is None and waited < self.ready_timeout:
                sys.stderr.write(
                    f"waiting for the spawned server to be SERVING at {self.target}: "
                    f"{waited:.0f} of {self.ready_timeout:g} s ...\n"
                )
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"expected the spawned server to start, got exit code {self.proc.returncode}:"
                f"\n{self.output()}\ncheck the model file and --server-arg values"
            )
        self.stop()
        raise RuntimeError(
            f"expected the spawned server to be SERVING at {self.target} within "
            f"{self.ready_timeout:g} s, got no SERVING answer; its log ends:\n{self.output()}\n"
            "check the log above and the --server-arg values"
        )

    def rss_mb(self) -> float | None:
        """The server's resident memory in MiB (Linux /proc), None where unreadable."""
        if self.proc is None:
            return None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return None

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time the server has used (Linux /proc), None where unreadable."""
        if self.proc is None:
            return None
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> int | None:
        """SIGTERM, wait for the drain, kill if it hangs; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)

    def __enter__(self) -> SpawnedServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            self._log.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self._log.close()


class MetricsError(Exception):
    """The server's metrics could not be read; the message says why."""


def read_metrics(url: str, model: str, timeout: float = 5.0) -> dict[str, float]:
    """The server's ``serve_batch_size`` _sum/_count and ``serve_compute_duration_seconds``
    _sum for ``model`` from a /metrics URL; MetricsError saying why when they cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as e:  # before OSError: it is one
        raise MetricsError(f"HTTP {e.code} {e.reason}") from e
    except OSError as e:
        raise MetricsError(f"no answer ({getattr(e, 'reason', None) or e})") from e
    except UnicodeDecodeError as e:  # it answered, but not with Prometheus's UTF-8 text
        raise MetricsError(f"an answer that is not UTF-8 text ({e.reason})") from e
    except http.client.HTTPException as e:  # the gRPC port, say: BadStatusLine, a traceback
        raise MetricsError(f"an answer that is not HTTP ({type(e).__name__})") from e
    wanted = {
        "serve_batch_size_sum": "rows",
        "serve_batch_size_count": "batches",
        "serve_compute_duration_seconds_sum": "compute_s",
    }
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted and sample.labels.get("model") == model:
                    values[wanted[sample.name]] = sample.value
    except ValueError as e:  # not Prometheus text: some other HTTP service on that port
        raise MetricsError(f"an answer that is not Prometheus text ({e})") from e
    if len(values) != len(wanted):
        raise MetricsError(f"no serve_batch_size series of model {model!r}")
    return values


def scrape(url: str, model: str, timeout: float = 5.0) -> dict[str, float] | None:
    """``read_metrics``, or None when they cannot be read."""
    try:
        return read_metrics(url, model, timeout)
    except MetricsError:
        return None
