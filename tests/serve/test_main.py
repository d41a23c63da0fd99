"""serve/__main__.py: the real `python -m serve` process: start-up, repository, signals, errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc

from serve.benchenv import wait_serving
from serve.client import Client, ClientError
from serve.config import ServerConfig
from tests.serve.conftest import free_port, free_ports, make_reshape_model
from tests.serve.procs import ServeProcess


def _args(port: int, *more: str) -> list[str]:
    return [*more, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
            "--max-batch-size", "4", "--device", "cpu", "--grace", "10"]  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serves_then_exits_0_on_signal(
    classifier_path: Path, tmp_path: Path, signum: signal.Signals, reference: Callable
) -> None:
    port = free_port()
    with ServeProcess(_args(port, str(classifier_path)), port, tmp_path / "log") as proc:
        triton = tc.InferenceServerClient(proc.target)
        assert triton.is_server_ready() and triton.is_model_ready("tiny")
        x = np.random.default_rng(0).normal(size=(6, 3, 8, 8)).astype(np.float32)
        with Client(proc.target) as client:
            np.testing.assert_allclose(
                client.infer("tiny", x), reference(classifier_path, x), atol=1e-5
            )
        assert proc.proc is not None
        proc.proc.send_signal(signum)
        assert proc.wait(60) == 0
    log = proc.output()
    provider_lines = [line for line in log.splitlines() if "runs on" in line]
    assert len(provider_lines) == 1 and "CPUExecutionProvider" in provider_lines[0]
    for event in ("listening on", "loaded from", "ready: serving tiny", "draining", "stopped"):
        assert event in log, event
    assert "Traceback" not in log


def test_model_repository_serves_every_folder(
    make_classifier: Callable[..., Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "plain").mkdir(parents=True)
    (repo / "triton" / "1").mkdir(parents=True)
    make_classifier(repo / "plain" / "model.onnx", classes=3)
    make_classifier(
        repo / "triton" / "1" / "model.onnx", channels=1, size=6, classes=4, metadata={}
    )
    port = free_port()
    args = _args(port, "--model-repository", str(repo))
    with ServeProcess(args, port, tmp_path / "log") as proc:
        triton = tc.InferenceServerClient(proc.target)
        assert triton.is_model_ready("plain") and triton.is_model_ready("triton")
        meta = triton.get_model_metadata("triton")
        assert list(meta.inputs[0].shape) == [-1, 1, 6, 6]
        assert list(meta.outputs[0].shape) == [-1, 4]
        with Client(proc.target) as client:
            (top,) = client.classify_arrays("triton", np.zeros((1, 1, 6, 6), np.float32), top_k=4)
        assert sorted(p.label for p in top) == [f"class_{i}" for i in range(4)]  # no metadata
        proc.terminate()
        assert proc.wait(60) == 0


def test_a_bad_model_stops_the_server_before_any_model_is_warmed_up(
    make_classifier: Callable[..., Path], tmp_path: Path
) -> None:
    """The good model 'a' used to be loaded and warmed (minutes on a GPU) before 'b' was read."""
    repo = tmp_path / "repo"
    (repo / "a").mkdir(parents=True)
    (repo / "b").mkdir()
    make_classifier(repo / "a" / "model.onnx")
    (repo / "b" / "model.onnx").write_bytes(b"definitely not protobuf")
    done = _run(*_args(free_port(), "--model-repository", str(repo)))
    assert done.returncode == 2, done.stderr
    assert "expected a readable ONNX model at " + str(repo / "b") in done.stderr
    assert "model a loaded" not in done.stderr and "listening" not in done.stderr, done.stderr


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_usage_errors_are_one_clear_line(
    make_classifier: Callable[..., Path], tmp_path: Path
) -> None:
    port = str(free_port())
    null_dim = make_classifier(tmp_path / "null_dim.onnx", metadata={"input_shape": "[3, null, 8]"})
    cases = {
        "no model": ([], "MODEL.onnx or --model-repository"),
        "missing file": ([str(tmp_path / "nope.onnx")], "not a file"),
        "not onnx": ([str(tmp_path / "junk.onnx")], "expected a readable ONNX model"),
        "bad batch": (["x.onnx", "--max-batch-size", "0"], "--max-batch-size"),
        "empty repository": (["--model-repository", str(tmp_path / "empty")], "at least one model"),
        "bad metadata": ([str(null_dim)], "input_shape of " + str(null_dim)),  # was a TypeError
        # Path("") is the current folder: every subfolder of it was taken for a model.
        "empty repository path": (["--model-repository", ""], "expected a path, got an empty"),
        "empty model path": ([""], "expected a path, got an empty string"),
        # Read as given, not refused by argparse's case-sensitive choices.
        "upper-case level": ([str(tmp_path / "nope.onnx"), "--log-level", "DEBUG"], "not a file"),
        "upper-case device and format": (
            [str(tmp_path / "nope.onnx"), "--device", "CPU", "--log-format", "JSON"], "not a file"
        ),
    }
    (tmp_path / "junk.onnx").write_bytes(b"definitely not protobuf")
    (tmp_path / "empty").mkdir()
    for name, (args, fragment) in cases.items():
        done = _run(*args, "--port", port, "--metrics-port", "0")
        assert done.returncode == 2, (name, done.stderr)
        assert fragment in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr, name


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--grace", "nan"], "--grace"),
        # Accepted, then the shutdown after a clean drain crashed with a traceback, exit 1
        # (OverflowError from a thread join).
        (["--grace", "inf"], "--grace between 0 and"),
        (["--grace", "1e10"], "--grace between 0 and"),
        # argparse's own refusals were its usage block and a line of text, not JSON.
        (["--max-batch-size", "x"], "argument --max-batch-size: invalid int value"),
        (["--max-batch-size", "x", "--log-format=json"], "python -m serve --help"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_json_lines_with_log_format_json(
    flags: list[str], fragment: str
) -> None:
    done = _run("x.onnx", *flags, "--port", "0", "--metrics-port", "0", "--log-format", "json")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    entry = json.loads(line)  # a log collector parses it like every other line
    assert entry["level"] == "error" and fragment in entry["msg"], entry


def test_a_model_path_that_is_not_utf8_is_one_line_exit_2(
    make_classifier: Callable[..., Path], tmp_path: Path
) -> None:
    # ONNX Runtime's constructor refused the path with a TypeError traceback, exit 1. The
    # name is the bytes b"caf\xe9" (Latin-1), as Python reads them from the file system.
    latin1 = make_classifier(tmp_path / "caf\udce9.onnx")
    repo = tmp_path / "repo"
    (repo / "caf\udce9").mkdir(parents=True)
    make_classifier(repo / "caf\udce9" / "model.onnx")
    for args in ([str(latin1)], ["--model-repository", str(repo)]):
        done = _run(*_args(0, *args), "--log-format", "json")
        assert done.returncode == 2, done.stderr
        entry = json.loads(done.stderr.strip().splitlines()[-1])
        assert entry["msg"].startswith("expected a UTF-8 path, got "), entry
        assert "Traceback" not in done.stderr, done.stderr


def test_an_unexpected_error_is_one_json_line_with_its_traceback() -> None:
    # A bug (here one put in on purpose) was Python's bare traceback: some twenty lines that
    # are not JSON. A process of its own, as `python -m serve` runs.
    code = (
        "import sys\n"
        "import serve.__main__ as cli\n"
        "async def serve(config):\n"
        "    raise TypeError('a bug')\n"
        "cli.serve = serve\n"
        "sys.exit(cli.main(['x.onnx', '--log-format', 'json']))\n"
    )
    root = Path(__file__).parents[2]  # `-c` imports serve from the working directory
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "critical" and "a bug: please report it" in entry["msg"], entry
    assert entry["exc"].endswith("TypeError: a bug"), entry


def test_what_is_alive_once_serving_is_frozen_out_of_the_collector(
    classifier_path: Path,
) -> None:
    # Full collections re-scanned every module, the model and gRPC's objects: 15-45 ms of the
    # event loop every few seconds under unary load (p99.9 at c=16 ~19 against ~14 ms).
    code = (
        "import gc, sys\n"
        "import serve.__main__ as cli\n"
        "from serve.server import Server\n"
        "async def wait(self):\n"
        "    print('frozen', gc.get_freeze_count(), flush=True)\n"
        "Server.wait = wait\n"
        f"sys.exit(cli.main([{str(classifier_path)!r}, '--port', '0', '--metrics-port', '0']))\n"
    )
    root = Path(__file__).parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root
    )
    assert done.returncode == 0, done.stderr
    frozen = int(done.stdout.split()[-1])
    assert frozen > 10_000, done.stdout


def test_the_fatal_line_shows_under_log_level_critical(tmp_path: Path) -> None:
    # It was logged at error level and filtered out: exit 2 with nothing on stderr.
    done = _run(str(tmp_path / "nope.onnx"), "--port", "0", "--metrics-port", "0",
                "--log-level", "critical")  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert " CRITICAL serve: " in line and "nope.onnx' (not a file)" in line, line


def test_a_grace_at_its_limit_still_shuts_down_cleanly(
    classifier_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    args = [*_args(port, str(classifier_path)), "--grace", "2147483"]
    with ServeProcess(args, port, tmp_path / "log") as proc:
        proc.terminate()
        assert proc.wait(60) == 0, proc.output()
    assert "stopped" in proc.output() and "Traceback" not in proc.output()


def test_more_intra_op_threads_than_cpus_is_warned_about(tmp_path: Path) -> None:
    # ONNX Runtime started them all silently: 100 threads on 2 CPUs ran a batch 1.7x slower.
    args = [str(tmp_path / "nope.onnx"), "--port", "0", "--metrics-port", "0",
            "--intra-op-threads", "2"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )
    assert done.returncode == 2, done.stderr
    warning, error = done.stderr.strip().splitlines()
    assert " WARNING serve: --intra-op-threads 2 is more than the 1 CPU this process" in warning
    assert "pass at most 1, or 0 for one per core" in warning
    assert "not a file" in error


def test_a_busy_port_is_reported(classifier_path: Path, tmp_path: Path) -> None:
    port = free_port()
    with ServeProcess(_args(port, str(classifier_path)), port, tmp_path / "log"):
        done = _run(*_args(port, str(classifier_path)))
    assert done.returncode == 1
    assert "--port" in done.stderr and "Traceback" not in done.stderr


def test_a_busy_metrics_port_stops_the_server_before_any_warm_up(classifier_path: Path) -> None:
    # It used to be bound after every model was loaded and warmed (minutes on a GPU).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = str(taken.getsockname()[1])
        done = _run(*_args(free_port(), str(classifier_path)), "--metrics-port", metrics_port)
    assert done.returncode == 1, done.stderr
    assert "pass another --metrics-port" in done.stderr and "Traceback" not in done.stderr
    assert "loaded from" not in done.stderr, done.stderr


@pytest.mark.parametrize("pixels", [-5, 0])
def test_max_image_pixels_must_be_positive(classifier_path: Path, pixels: int) -> None:
    with pytest.raises(ValueError, match="--max-image-pixels"):
        ServerConfig(models=(classifier_path,), max_image_pixels=pixels)


def test_models_onnx_runtime_refuses_exit_2_with_one_line(
    classifier_path: Path, tmp_path: Path
) -> None:
    model = onnx.load(str(classifier_path))
    model.ir_version = 99  # saved by a newer onnx than this onnxruntime reads
    too_new = tmp_path / "too_new.onnx"
    onnx.save(model, str(too_new))
    batch_1 = make_reshape_model(tmp_path / "batch_1.onnx", shape=[1, 48], declared_classes=48)
    cases = {too_new: "ir_version", batch_1: "--max-batch-size 1"}
    for path, fragment in cases.items():
        # Port 0: the server binds before it loads, and a refused port would exit 1.
        done = _run(*_args(0, str(path)))
        assert done.returncode == 2, (path.name, done.stderr)
        assert fragment in done.stderr and str(path) in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        # The server never served: no drain report before the error.
        assert "draining" not in done.stderr and "stopped" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].split()[1] == "ERROR", done.stderr


def test_a_model_refused_at_warm_up_logs_only_json_lines(tmp_path: Path) -> None:
    # ONNX Runtime logged the failed run itself, in colour, between the JSON lines.
    batch_1 = make_reshape_model(tmp_path / "batch_1.onnx", shape=[1, 48], declared_classes=48)
    done = _run(*_args(0, str(batch_1)), "--log-format", "json")
    assert done.returncode == 2, done.stderr
    entries = [json.loads(line) for line in done.stderr.strip().splitlines()]
    assert entries[-1]["level"] == "error" and "--max-batch-size 1" in entries[-1]["msg"]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        # The metrics endpoint used to fail on the port gRPC had just taken: "unavailable
        # (Address already in use)", exit 1, as if another process held it.
        (["--port", "{port}", "--metrics-port", "{port}"], "--metrics-port other than --port"),
        # gRPC's C core printed its own line before ours, breaking the JSON lines, then exit 1.
        (["--host", ""], "expected --host to name an address"),
    ],
)
def test_address_mistakes_are_one_json_line_exit_2(
    classifier_path: Path, flags: list[str], fragment: str
) -> None:
    port = str(free_port())
    flags = [flag.format(port=port) for flag in flags]
    done = _run(str(classifier_path), *flags, "--log-format", "json")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert fragment in json.loads(line)["msg"], line


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_bracketed_ipv6_host_serves_grpc_and_metrics(classifier_path: Path, tmp_path: Path) -> None:
    # `--host [::1]` bound gRPC, then the metrics endpoint could not resolve it and exit 1.
    port, metrics_port = free_ports(2)
    args = [str(classifier_path), "--host", "[::1]", "--port", str(port),
            "--metrics-port", str(metrics_port), "--device", "cpu"]  # fmt: skip
    with ServeProcess(args, port, tmp_path / "log", ready_line="ready: serving") as proc:
        with urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics", timeout=30) as r:
            assert b"serve_model_ready" in r.read()
        proc.terminate()
        assert proc.wait(60) == 0, proc.output()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_while_draining_exits_at_once(
    classifier_path: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C twice: the second one used to be ignored until --grace ran out."""
    port = free_port()
    # Batches wait 10 s for company: the calls queued before the first signal hold the drain.
    # Calls arriving alone held it only while they kept coming 0.2 s apart, which a loaded
    # machine could miss: the server then exited 0 before the second signal.
    args = [*_args(port, str(classifier_path)), "--grace", "60", "--max-queue-delay-us", "10000000"]
    with ServeProcess(args, port, tmp_path / "log") as proc:
        assert proc.proc is not None
        running = proc.proc

        def hammer() -> None:  # a drain lasts while calls are in flight or keep arriving
            with Client(proc.target, timeout=120) as client:
                while running.poll() is None:
                    with contextlib.suppress(ClientError):
                        client.infer("tiny", np.zeros((1, 3, 8, 8), np.float32))

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # on loopback the first calls are queued within milliseconds
        running.send_signal(signum)
        while "draining" not in proc.output():
            assert running.poll() is None, proc.output()
            threading.Event().wait(0.05)
        running.send_signal(signum)
        code = proc.wait(120)
        for thread in threads:
            thread.join(30)
    assert code == 128 + signum, proc.output()
    assert f"{signum.name} received again; exiting at once" in proc.output()


def test_closed_stdio_is_not_reused_for_sockets(classifier_path: Path) -> None:
    # With fd 2 closed, the event loop's wake-up socket took it, so ONNX Runtime's and gRPC's
    # native log lines would have been written into it.
    def close_stdio() -> None:
        for fd in (0, 1, 2):
            os.close(fd)

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", *_args(port, str(classifier_path))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=close_stdio,
    )
    try:
        assert wait_serving(proc, f"127.0.0.1:{port}", 120)
        targets = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in (0, 1, 2)]
        assert targets == [os.devnull] * 3, targets
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_taken_port_or_unknown_host_is_one_line_in_the_log_format(
    classifier_path: Path, log_format: str
) -> None:
    # gRPC's C core printed its own "E1123 ... add_port.cc ... Failed to add port" line first:
    # two messages, one of them not JSON.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (_args(port, str(classifier_path)), "Address already in use"),
            ([str(classifier_path), "--host", "no-such-host.invalid", "--port", str(port),
              "--metrics-port", "0", "--device", "cpu"], "no-such-host.invalid"),
            # 192.0.2.1 (TEST-NET-1) is on no interface; with --port 0 the check was skipped.
            ([str(classifier_path), "--host", "192.0.2.1", "--port", "0",
              "--metrics-port", "0", "--device", "cpu"], "Cannot assign requested address"),
        ]  # fmt: skip
        for args, said in cases:
            done = _run(*args, "--log-format", log_format)
            assert done.returncode == 1, done.stderr
            (line,) = done.stderr.strip().splitlines()
            if log_format == "json":
                line = json.loads(line)["msg"]
            assert "expected to bind gRPC on " in line and said in line, line
            assert line.endswith("pass another --port or --host"), line


def test_onnx_runtime_telemetry_stays_off(
    classifier_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # onnxruntime 1.31 sends Microsoft telemetry by default and wrote a device id and a
    # database under ~/.cache/Microsoft; with no writable home (a container) it printed a
    # non-JSON warning line into the log.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    port = free_port()
    with ServeProcess(_args(port, str(classifier_path)), port, tmp_path / "log") as proc:
        proc.terminate()
        assert proc.wait(60) == 0, proc.output()
    assert list(home.rglob("*")) == []


def test_a_host_whose_ipv6_address_the_kernel_lacks_still_binds_on_ipv4(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With IPv6 switched off (ipv6.disable=1), creating the probe socket for a name's ::1
    # raised "Address family not supported" out of the bind check: gRPC would have bound
    # 127.0.0.1 and served. (Not `localhost`, whose two loopbacks are fixed, as gRPC's are.)
    import errno

    from serve import server as server_module

    port = free_port()
    real_socket = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args)

    def both(*args: object, **kwargs: object) -> list[tuple]:
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(server_module.socket, "socket", no_ipv6)
    monkeypatch.setattr(server_module.socket, "getaddrinfo", both)
    assert server_module._bind_refusal("dual.test", port) is None
    monkeypatch.setattr(server_module.socket, "getaddrinfo", lambda *a, **k: both()[:1])
    refusal = server_module._bind_refusal("dual.test", port)
    assert refusal is not None and refusal.errno == errno.EAFNOSUPPORT
    # With IPv4 taken too, the message names that, not the family the kernel lacks (tried
    # last here, it was the error reported).
    monkeypatch.setattr(server_module.socket, "getaddrinfo", lambda *a, **k: both()[::-1])
    with real_socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        refusal = server_module._bind_refusal("dual.test", port)
    assert refusal is not None and refusal.errno == errno.EADDRINUSE
