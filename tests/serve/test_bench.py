"""python -m serve.bench against real servers: a spawned one and one already running."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from serve import bench, benchreport
from serve.background import BackgroundServer
from serve.benchenv import InProcess, SpawnedServer, measure_in_process, scrape
from serve.loadgen import Load, Outcome, channel, infer_requests, model_input, run_load
from tests.serve.conftest import free_port, make_classifier, make_reshape_model
from tests.serve.pki import make_pki

ROOT = Path(__file__).resolve().parents[2]
# --plot needs the bench extra (matplotlib), which `make test` installs; `.[test]` alone has not.
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib (the bench extra) is not installed",
)

BRIEF = ["--seconds", "1", "--warmup", "0.3", "--baseline-batches", "1,4",
         "--baseline-seconds", "0.2"]  # fmt: skip


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _check_row(row: dict) -> None:
    assert row["requests"] > 0
    assert row["throughput"] > 0
    assert row["errors"] == {}
    assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert row["ratio_best"] > 0 and row["ratio_single"] > 0
    assert row["mean_batch"] is not None and row["mean_batch"] >= 1


@needs_matplotlib
def test_spawn_json_report_with_comparison_and_plot(classifier_path: Path, tmp_path: Path) -> None:
    plot = tmp_path / "bench.png"
    done = _bench(
        "--spawn", str(classifier_path), "-c", "1", "8", "--rate", "40", *BRIEF,
        "--server-arg=--device=cpu", "--compare=--max-batch-size=1",
        "--json", "--plot", str(plot),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == classifier_path.stem
    base = report["in_process"]
    assert set(base["throughput"]) == {"1", "4"}
    assert base["best_batch"] in (1, 4)
    # Measured before and after the load; the faster of the two per batch size is kept.
    before, after = base["best_throughput_runs"]
    assert base["best_throughput"] >= max(before, after) - 1e-9
    rows = report["rows"]
    assert [(r["server"], r["load"]) for r in rows] == [
        ("--device=cpu", "c=1"),
        ("--device=cpu", "c=8"),
        ("--device=cpu", "rate=40/s"),
        ("--device=cpu --max-batch-size=1", "c=1"),
        ("--device=cpu --max-batch-size=1", "c=8"),
        ("--device=cpu --max-batch-size=1", "rate=40/s"),
    ]
    for row in rows:
        _check_row(row)
    # A server that may only run one row per batch reports exactly that.
    assert all(r["mean_batch"] == 1.0 for r in rows[3:])
    servers = report["servers"]
    assert [s["exit_code"] for s in servers] == [0, 0]
    assert all(s["rss_start_mb"] > 0 and s["rss_end_mb"] > 0 for s in servers)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spawn_unary_and_stream_apis_run_every_setting(classifier_path: Path) -> None:
    done = _bench(
        "--spawn", str(classifier_path), "--api", "unary", "stream", "-c", "1", "4",
        "--rate", "40", *BRIEF, "--server-arg=--device=cpu", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = report["rows"]
    assert [r["load"] for r in rows] == [
        "c=1", "c=4", "rate=40/s", "stream:c=1", "stream:c=4", "stream:rate=40/s",
    ]  # fmt: skip
    for row in rows:
        _check_row(row)
    # Every stream was half-closed and ended OK, and the server then stopped cleanly.
    assert [s["exit_code"] for s in report["servers"]] == [0]


def test_running_server_table_and_server_side_counts(
    start_server: Callable[..., BackgroundServer],
    classifier_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(metrics_port=free_port())
    assert server.server is not None
    metrics = server.server.metrics
    url = f"http://127.0.0.1:{metrics.http_port}/metrics"
    target = f"127.0.0.1:{server.port}"
    argv = [target, "--model", "tiny", "--model-file", str(classifier_path),
            "--metrics-url", url, "-c", "4", "--images", "3", *BRIEF]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "in-process ONNX Runtime" in out
    (line,) = [x for x in out.splitlines() if x.startswith("server ") and "c=4" in x]
    fields = line.split()
    assert fields[1] == "c=4×3"
    calls = int(fields[-4])
    assert calls > 0
    answered = 0.0
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "serve_requests_total" and sample.labels["outcome"] == "success":
                answered += sample.value
    # The window's calls, plus warm-up and the answer check, all reached the server.
    assert answered > calls


def test_usage_and_unreachable_server(tmp_path: Path) -> None:
    done = _bench("--seconds", "1")
    assert done.returncode == 2
    assert "HOST:PORT or --spawn" in done.stderr
    done = _bench("127.0.0.1:1", "--spawn", str(tmp_path / "missing.onnx"))
    assert done.returncode == 2
    done = _bench(f"127.0.0.1:{free_port()}", "--model", "m", "--timeout", "2")
    assert done.returncode == 1
    assert "check HOST:PORT" in done.stderr


def test_spawned_server_refusing_the_model_name(
    classifier_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--spawn", str(classifier_path), "--model", "nope", "-c", "1", *BRIEF]
    assert bench.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: the server spawned for {classifier_path} did not answer "
                          "(NOT_FOUND: "), err  # fmt: skip
    assert err.endswith("; check --model"), err


def test_baseline_keeps_the_faster_measurement_per_batch_size() -> None:
    slow = InProcess({1: 100.0, 4: 300.0}, {1: 0.01, 4: 0.0133}, {1: 1, 4: 0})
    fast = InProcess({1: 150.0, 4: 250.0}, {1: 0.0067, 4: 0.016}, {1: 0, 4: 1})
    best = slow.best_of(fast)
    assert best.throughput == {1: 150.0, 4: 300.0}
    assert best.latency == {1: 0.0067, 4: 0.0133}
    assert best.threads == {1: 0, 4: 0}
    assert best.best_batch == 4


def test_load_checks_and_percentiles() -> None:
    with pytest.raises(ValueError, match="concurrency >= 1"):
        Load(concurrency=0)
    with pytest.raises(ValueError, match="--rate > 0"):
        Load(rate=0)
    outcome = Outcome(
        Load(images=2), latencies=[0.004, 0.001, 0.003, 0.002], window=2.0, requests=4
    )
    assert outcome.percentile(50) == 0.002
    assert outcome.percentile(99) == 0.004
    assert outcome.throughput == 4.0
    assert Outcome(Load()).percentile(50) is None


def _junk(tmp_path: Path) -> Path:
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x02not an onnx model" * 8)
    return junk


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--timeout", "0"], "--timeout > 0"),
        (["--timeout", "-1"], "--timeout > 0"),
        (["--timeout", "nan"], "--timeout > 0"),
        (["--timeout", "1e10"], "at most 1e+09"),  # every call failed at once
        (["--warmup", "nan"], "--warmup >= 0"),
        (["--seconds", "inf"], "--seconds > 0"),
        (["--rate", "inf"], "--rate > 0"),
        (["--baseline-seconds", "nan"], "--baseline-seconds > 0"),
        (["--baseline-seconds", "0"], "--baseline-seconds > 0"),
        (["--baseline-threads", "-1"], "--baseline-threads >= 0"),
        (["--distinct", "0"], "--distinct >= 1"),
        (["--channels", "-1"], "--channels >= 1"),
        (["--metrics-url", "notaurl"], "expected --metrics-url http(s)://"),
        (["--metrics-url", "http://localhost:port/metrics"], "expected --metrics-url http(s)://"),
        (["--plot", "/nonexistent/x.png"], "existing directory"),
        (["--model-file", "{tmp}/nope.onnx"], "--model-file: expected an ONNX model file"),
        (["--model-file", "{junk}"], "--model-file: expected a model onnxruntime"),
    ],
)
def test_usage_errors_exit_2_before_any_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    flags = [f.format(tmp=tmp_path, junk=_junk(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as caught:
        bench.main([f"127.0.0.1:{free_port()}", "--model", "m", *flags])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_suffix_matplotlib_cannot_write_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit) as caught:
        bench.main([f"127.0.0.1:{free_port()}", "--model", "m", "--plot", str(tmp_path / "x.xyz")])
    assert caught.value.code == 2
    assert "suffix matplotlib writes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--images", "100000000"], "expected a request of at most 256 MiB"),
        (["--images", "300000", "--distinct", "100"], "lower --distinct or --images"),
        # A tiny request read "× 0.0 MiB".
        (["--distinct", "100000000"], "--distinct 100000000 × 768 B (1 images"),
        (["--model-file", "{junk}"], "--model-file: expected a model onnxruntime"),
    ],
)
def test_spawn_refuses_before_starting_anything(
    classifier_path: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    flags = [f.format(junk=_junk(tmp_path)) for f in flags]
    done = _bench("--spawn", str(classifier_path), *flags, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert "spawning" not in done.stderr and "in-process" not in done.stderr


def test_spawn_of_a_file_onnx_runtime_refuses_is_a_usage_error(tmp_path: Path) -> None:
    done = _bench("--spawn", str(_junk(tmp_path)), timeout=60)
    assert done.returncode == 2
    assert "--spawn: expected a model onnxruntime" in done.stderr
    assert "Traceback" not in done.stderr


def test_in_process_baseline_refusal_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        measure_in_process(tmp_path / "nope.onnx", (1,), 0.1)
    with pytest.raises(ValueError, match=r"InvalidProtobuf.*python -m export"):
        measure_in_process(_junk(tmp_path), (1,), 0.1)


@pytest.mark.parametrize("api", ["unary", "stream"])
def test_request_over_the_servers_message_limit(
    start_server: Callable[..., BackgroundServer], capsys: pytest.CaptureFixture[str], api: str
) -> None:
    server = start_server(max_message_bytes=1024)  # the tiny model's image: 3×8×8×4 = 768 B
    argv = [f"127.0.0.1:{server.port}", "--model", "tiny", "--api", api, "-c", "1",
            "--seconds", "0.2", "--warmup", "0", "--distinct", "1"]  # fmt: skip
    assert bench.main([*argv, "--images", "8"]) == 1
    err = capsys.readouterr().err
    assert "request of 8 images" in err and "exceeds the server's message limit" in err
    assert "lower --images" in err and "--max-message-bytes" in err
    # Known only from the server's metadata (no --model-file): refused before any payload.
    assert bench.main([*argv, "--images", "100000000"]) == 2
    assert "lower --images" in capsys.readouterr().err


@needs_matplotlib
def test_plot_write_failure_after_the_run_is_one_line(
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server()
    plot = tmp_path / "bench.png"
    plot.symlink_to(tmp_path / "gone" / "bench.png")  # passes the check, fails the write
    argv = [f"127.0.0.1:{server.port}", "--model", "tiny", "-c", "1", "--seconds", "0.2",
            "--warmup", "0", "--distinct", "1", "--plot", str(plot)]  # fmt: skip
    assert bench.main(argv) == 1
    captured = capsys.readouterr()
    assert "c=1" in captured.out  # the report itself is complete
    (line,) = [x for x in captured.err.splitlines() if x.startswith("error:")]
    assert "plot" in line or "matplotlib" in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compare=--instances='2"], "expected --compare 'FLAGS' in shell quoting"),
        (["--server-arg=--port=1"], "without --port, got '--port=1': the bench starts"),
        (["--server-arg=--po=1"], "without --port, got '--po=1'"),  # argparse takes prefixes
        (["--server-arg=--metrics-port", "--server-arg=0"], "without --metrics-port"),
        (["--server-arg=--host=0.0.0.0"], "without --host"),
        (["--compare=--max-batch-size=1 --port 5"], "without --port, got '--port'"),
        (["--server-arg=--tls-cert=c.pem"], "the bench connects in plaintext"),
        (["--server-arg=--auth-token-file=t"], "without --auth-token-file, got '--auth-token"),
    ],
)
def test_server_flags_the_bench_sets_or_cannot_follow_are_usage_errors(
    classifier_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as caught:
        bench.main(["--spawn", str(classifier_path), *flags])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "spawning" not in err


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what the installed onnxruntime loads
    onnx.save(model, str(path))
    return path


def _two_inputs(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["logits"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in "ab"],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    return _save(graph, path)


def _int64_input(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["logits"], to=TensorProto.FLOAT)],
        "int64",
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    return _save(graph, path)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_two_inputs, "expected a classifier with one input and one output, got 2 inputs"),
        (_int64_input, "expected a float32 input"),
    ],
)
@pytest.mark.parametrize("flag", ["--spawn", "--model-file"])
def test_a_model_the_server_would_refuse_is_a_usage_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    build: Callable[[Path], Path],
    message: str,
) -> None:
    model = build(tmp_path / "model.onnx")
    target = [] if flag == "--spawn" else [f"127.0.0.1:{free_port()}", "--model", "m"]
    with pytest.raises(SystemExit) as caught:
        bench.main([*target, flag, str(model), *BRIEF])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}: {message}" in err, err
    assert "in-process" not in err


def test_a_model_onnx_runtime_fails_to_run_in_process_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Loads, and the server's reader takes it, but it runs at batch size 1 only.
    model = make_reshape_model(tmp_path / "batch1.onnx", shape=[1, 48], declared_classes=48)
    argv = ["--spawn", str(model), "-c", "1", *BRIEF]  # baseline batch sizes 1 and 4
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "expected ONNX Runtime to run" in line and "batch sizes 1,4, got" in line
    assert "pass --baseline-batches" in line
    assert "spawning" not in err


@pytest.mark.parametrize(
    ("shape", "served"),
    [
        ({"size": 16}, "(input 3×8×8, 5 classes), got"),
        ({"classes": 7}, "(input 3×8×8, 5 classes), got"),
    ],
)
def test_a_model_file_of_another_model_than_the_served_one_is_a_usage_error(
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    shape: dict[str, int],
    served: str,
) -> None:
    server = start_server()
    other = make_classifier(tmp_path / "other.onnx", **shape)
    argv = [f"127.0.0.1:{server.port}", "--model", "tiny", "--model-file", str(other),
            "-c", "1", *BRIEF]  # fmt: skip
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "expected --model-file to be the model 'tiny' served at" in line
    assert served in line and str(other) in line and "pass the ONNX file" in line
    assert "in-process" not in err  # said before the baseline is measured


def test_a_spawned_server_that_never_answers_serving_is_reported_not_waited_on_silently(
    classifier_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = make_pki(tmp_path)  # a TLS server: the plaintext readiness probe never gets SERVING
    args = ["--device=cpu", f"--tls-cert={pki.server_cert}", f"--tls-key={pki.server_key}"]
    server = SpawnedServer(classifier_path, args, ready_timeout=4, progress_every=1.5)
    within = r"SERVING at 127\.0\.0\.1:\d+ within 4 s"
    with pytest.raises(RuntimeError, match=within) as caught, server:
        pass
    assert "check the log above and the --server-arg values" in str(caught.value)
    assert "waiting for the spawned server to be SERVING" in capsys.readouterr().err
    assert server.proc is not None and server.proc.poll() is not None  # stopped


def _connections_to(port: int) -> int:
    """Established TCP connections (from this machine) whose remote end is ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_each_channel_is_its_own_connection(
    start_server: Callable[..., BackgroundServer],
) -> None:
    server = start_server()

    async def measure() -> list[int]:
        channels = [channel(f"127.0.0.1:{server.port}") for _ in range(3)]
        try:
            name, shape, _ = await model_input(channels[0], "tiny", 10)
            requests = infer_requests("tiny", name, shape, 1, 1)
            seen: list[int] = []

            async def count(opening: bool) -> None:
                seen.append(_connections_to(server.port))

            # Every channel connected before the window opens: the warm-up's first calls alone
            # could leave one still connecting on a loaded machine. A shared pool connects once.
            for chan in channels:
                await asyncio.wait_for(chan.channel_ready(), 30)
            load = Load(concurrency=3, seconds=0.3, warmup=0.2)
            outcome = await run_load(channels, requests, load, count)
            assert outcome.errors == {}
            return seen
        finally:
            for chan in channels:
                await chan.close()

    # gRPC's global subchannel pool once put every channel on one connection.
    assert asyncio.run(measure()) == [3, 3]


def _wait_for(check: Callable[[], object], what: str, limit: float = 60) -> object:
    until = time.monotonic() + limit
    while time.monotonic() < until:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"expected {what} within {limit} s")


def _spawned_children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _spawned_server_under_load(bench_run: subprocess.Popen[str], model: str) -> int:
    """The pid of the server ``bench_run`` spawned, once its metrics show batches run."""
    (server_pid,) = _wait_for(lambda: _spawned_children(bench_run.pid), "a spawned server")
    argv = Path(f"/proc/{server_pid}/cmdline").read_text().split("\0")
    metrics = f"http://127.0.0.1:{argv[argv.index('--metrics-port') + 1]}/metrics"
    _wait_for(lambda: (scrape(metrics, model) or {}).get("batches"), "load")
    return server_pid


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_stops_the_spawned_server_and_says_so(
    classifier_path: Path, signum: signal.Signals
) -> None:
    bench_run = subprocess.Popen(
        [sys.executable, "-m", "serve.bench", "--spawn", str(classifier_path), "-c", "2",
         "--seconds", "600", "--warmup", "0", "--baseline-batches", "1",
         "--baseline-seconds", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        # Ctrl-C reaches Python only where SIGINT is not ignored, as it may be under a runner.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    server_pid = None
    try:
        server_pid = _spawned_server_under_load(bench_run, classifier_path.stem)
        bench_run.send_signal(signum)
        _, err = bench_run.communicate(timeout=120)
    finally:
        if bench_run.poll() is None:
            bench_run.kill()
            if server_pid is not None:  # a bench that hung leaves its server: stop it too
                os.kill(server_pid, signal.SIGKILL)
    assert bench_run.returncode == 128 + signum, err
    assert f"error: stopped by {signum.name} before the report" in err
    assert "Traceback" not in err
    # SIGTERM once ended the bench at once and left its server running.
    assert not Path(f"/proc/{server_pid}").exists()


def test_a_sigterm_before_the_run_begins_is_one_line() -> None:
    # The bench checks its arguments and reads the model file before its try: a SIGTERM then
    # ended in a traceback (seen under load). The check is slowed down so the signal lands in it.
    script = (
        "import signal, sys, time\n"
        "from serve import bench\n"
        "parse = bench.parse\n"
        "def slow(argv):\n"
        "    print('parsing', flush=True)\n"
        "    time.sleep(30)\n"
        "    return parse(argv)\n"
        "bench.parse = slow\n"
        "on_sigterm = bench.OnSigterm()\n"
        "signal.signal(signal.SIGTERM, on_sigterm)\n"
        "sys.exit(bench.main(['127.0.0.1:1', '--model', 'm'], sigterm=on_sigterm))\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        assert run.stdout is not None and run.stdout.readline() == "parsing\n"
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines() == [
        "error: stopped by SIGTERM before the report was complete; nothing measured is printed"
    ]


def _token(tmp_path: Path) -> Path:
    token = tmp_path / "token"
    token.write_text("secret\n")
    return token


@pytest.mark.parametrize(
    ("secure", "hint"),
    [
        ("token", "pass --token-file with the server's token"),
        ("tls", "a TLS server needs --ca with the CA that signed its certificate"),
        ("mtls", "and --cert and --key if it requires client certificates"),
    ],
)
def test_a_server_the_bench_cannot_talk_to_says_why(
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    secure: str,
    hint: str,
) -> None:
    flags = []
    if secure == "token":
        server = start_server(auth_token_file=_token(tmp_path))
    else:
        pki = make_pki(tmp_path)
        client_ca = pki.ca if secure == "mtls" else None
        server = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key,
                              tls_client_ca=client_ca)  # fmt: skip
        if secure == "mtls":  # the right CA, but no client certificate
            flags = ["--ca", str(pki.ca)]
    argv = [f"127.0.0.1:{server.port}", "--model", "tiny", "-c", "1", "--seconds", "0.2",
            "--warmup", "0", "--timeout", "5", *flags]  # fmt: skip
    assert bench.main(argv) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "did not answer" in line and hint in line, line


def test_a_server_with_mutual_tls_and_a_token_is_benched_with_ca_cert_key_and_token(
    start_server: Callable[..., BackgroundServer],
    classifier_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pki, token = make_pki(tmp_path), _token(tmp_path)
    server = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key,
                          tls_client_ca=pki.ca, auth_token_file=token)  # fmt: skip
    argv = [f"127.0.0.1:{server.port}", "--model", "tiny", "--ca", str(pki.ca),
            "--cert", str(pki.client_cert), "--key", str(pki.client_key),
            "--token-file", str(token), "-c", "1", "2", "--rate", "20",
            "--api", "unary", "stream", "--seconds", "0.3", "--warmup", "0",
            "--timeout", "10", "--distinct", "1", "--json",
            # The model check and the baseline: ModelMetadata is asked before the load too.
            "--model-file", str(classifier_path), "--baseline-batches", "1",
            "--baseline-seconds", "0.1", "--baseline-threads", "1"]  # fmt: skip
    assert bench.main(argv) == 0, capsys.readouterr().err
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["load"] for r in rows] == [
        "c=1", "c=2", "rate=20/s", "stream:c=1", "stream:c=2", "stream:rate=20/s",
    ]  # fmt: skip
    for row in rows:
        assert row["requests"] > 0 and row["errors"] == {}, row
    # The token is what let those calls in: without it every call is refused.
    no_token = [a for a in argv if a not in ("--token-file", str(token))]
    assert bench.main(no_token) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("--cert", "client_cert", "--key", "client_key"), "expected --ca with --cert and --key"),
        (("--key", "client_key"), "expected --ca with --cert and --key"),
        (("--ca", "ca", "--cert", "client_cert"), "expected --cert and --key together"),
        (("--ca", "ca", "--cert", "client_cert", "--key", "server_key"),
         "got the key of another pair"),
        (("--ca", "client_key"), "expected PEM certificates (-----BEGIN CERTIFICATE-----) in --ca"),
        (("--ca", "missing"), "expected a readable PEM CA certificate file"),
        (("--token-file", "empty"), "expected a bearer token in"),
    ],
)
def test_bad_tls_or_token_flags_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: tuple[str, ...], message: str
) -> None:
    pki = make_pki(tmp_path)
    (tmp_path / "empty").write_text("\n")
    named = {"missing": tmp_path / "missing.pem", "empty": tmp_path / "empty"}
    flags = [str(getattr(pki, f, named.get(f, f))) for f in files]
    with pytest.raises(SystemExit) as caught:
        bench.main([f"127.0.0.1:{free_port()}", "--model", "tiny", *flags])
    assert caught.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert message in err[-1], err


@pytest.mark.parametrize(
    "files", [("--ca", "ca"), ("--token-file", "ca"), ("--ca", "ca", "--cert", "client_cert")]
)
def test_tls_and_token_flags_with_spawn_are_usage_errors(
    classifier_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    files: tuple[str, ...],
) -> None:
    pki = make_pki(tmp_path)
    flags = [str(getattr(pki, f, f)) for f in files]
    with pytest.raises(SystemExit) as caught:
        bench.main(["--spawn", str(classifier_path), *flags])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    given = "/".join(f for f in files if f.startswith("--"))
    assert f"expected {given} with HOST:PORT, got --spawn" in err, err
    assert "spawning" not in err


def load_on_spawned(model: Path, load: Load, on_window: Callable[[int, bool], None]) -> Outcome:
    """``load`` against a server spawned on ``model``; ``on_window(pid, opening)`` runs on the
    event loop as the measured window opens and closes (to stop, resume or kill the server).
    A stopped server is resumed at the end."""
    with SpawnedServer(model, ["--device=cpu"]) as server:
        assert server.proc is not None
        pid = server.proc.pid

        async def measure() -> Outcome:
            channels = [channel(server.target)]
            try:
                name, shape, _ = await model_input(channels[0], model.stem, 10)
                requests = infer_requests(model.stem, name, shape, 1, 1)

                async def act(opening: bool) -> None:
                    on_window(pid, opening)

                return await run_load(channels, requests, load, act)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                for chan in channels:
                    await chan.close()

        return asyncio.run(measure())


def test_an_open_loop_the_server_falls_behind_counts_every_due_call(
    classifier_path: Path,
) -> None:
    load = Load(rate=50, seconds=1, warmup=0.2, timeout=60)

    def freeze_in_window(pid: int, opening: bool) -> None:
        # The server answers nothing while the window is open: a backlog of every call due
        # in it, answered once the window has closed.
        os.kill(pid, signal.SIGSTOP if opening else signal.SIGCONT)

    outcome = load_on_spawned(classifier_path, load, freeze_in_window)
    assert outcome.errors == {}
    # At most a warm-up call answered just as the window opened is counted in it.
    assert outcome.requests <= 1 and outcome.sent > 0
    # Those answers once went uncounted: no latency at all, and nothing said about them.
    assert outcome.late == outcome.sent == len(outcome.latencies)
    assert outcome.percentile(99) is not None and outcome.fell_behind
    row = bench._row("server", outcome, [], None)
    assert (row["sent"], row["late"], row["requests"]) == (outcome.sent, outcome.sent, 0)
    machine = {"cpus": 2, "platform": "p", "python": "3", "date": "d"}
    report = benchreport.report(
        model="tiny", model_file=None, target=None, in_process=None, servers=[], rows=[row],
        machine=machine,
    )  # fmt: skip
    assert f"server rate=50/s: fell behind the rate: {outcome.sent} calls were due" in (
        benchreport.table(report)
    )


def test_a_spawned_server_dying_mid_run_keeps_the_report_and_names_the_status(
    classifier_path: Path,
) -> None:
    bench_run = subprocess.Popen(
        [sys.executable, "-m", "serve.bench", "--spawn", str(classifier_path), "-c", "1", "2",
         "--seconds", "3", "--warmup", "0", "--baseline-batches", "1",
         "--baseline-seconds", "0.1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        server_pid = _spawned_server_under_load(bench_run, classifier_path.stem)
        os.kill(server_pid, signal.SIGKILL)
        out, err = bench_run.communicate(timeout=120)
    finally:
        if bench_run.poll() is None:
            bench_run.kill()
    assert bench_run.returncode == 1, err
    # The report once was lost, replaced by one line blaming HOST:PORT and --model.
    report = json.loads(out)
    assert [r["load"] for r in report["rows"]] == ["c=1", "c=2"]
    last = report["rows"][1]
    assert last["errors"] == {"UNAVAILABLE": 1} and last["requests"] == 0
    assert report["servers"][0]["exit_code"] == -signal.SIGKILL
    assert "default c=2: not run: its check call failed (UNAVAILABLE" in err
    assert "Traceback" not in err
