"""python -m serve.bench where a published figure could go wrong: the server's metrics URL, a
server dying under an open-loop stream, p50 over in-process at --images N, --plot's checks."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from serve import bench, benchreport
from serve.background import BackgroundServer
from serve.benchenv import InProcess
from serve.loadgen import Load
from tests.serve.conftest import free_port
from tests.serve.test_bench import load_on_spawned

BRIEF = ["-c", "2", "--seconds", "0.4", "--warmup", "0.2"]


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1:{metrics}/metrics/", "got HTTP 404 Not Found"),  # only /metrics
        ("http://127.0.0.1:{grpc}/metrics", "got an answer that is not HTTP"),  # once a traceback
        ("http://127.0.0.1:{metrics}/metrics?x=1", None),
    ],
)
def test_a_metrics_url_the_bench_cannot_read_is_said_once_with_the_fix(
    start_server: Callable[..., BackgroundServer],
    capsys: pytest.CaptureFixture[str],
    url: str,
    said: str | None,
) -> None:
    server = start_server(metrics_port=free_port())
    assert server.server is not None
    url = url.format(metrics=server.server.metrics.http_port, grpc=server.port)
    argv = [f"127.0.0.1:{server.port}", "--model", "tiny", "--metrics-url", url,
            "--rate", "50", *BRIEF, "--json"]  # fmt: skip
    assert bench.main(argv) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["rows"]
    if said is None:
        assert "warning" not in err, err
        assert all(row["mean_batch"] is not None for row in rows)
        return
    # The batch and busy columns were once left empty without a word.
    assert all(row["mean_batch"] is None and row["compute_busy"] is None for row in rows)
    assert err.count("warning: [server] no batch and busy figures") == 1, err
    assert said in err and "pass --metrics-url http://HOST:PORT/metrics" in err, err


def test_metrics_that_stop_answering_mid_run_blame_the_server_not_the_url(
    start_server: Callable[..., BackgroundServer], capsys: pytest.CaptureFixture[str]
) -> None:
    # A --metrics-url read once already is right: when it stops answering (the server died
    # mid-run), the warning once told the user to fix the URL they had given correctly.
    server = start_server(metrics_port=free_port())
    assert server.server is not None
    url = f"http://127.0.0.1:{server.server.metrics.http_port}/metrics"
    scrape = bench._Scraper(url, "tiny", "server", given=True)
    assert asyncio.run(scrape()) is not None
    server.stop(grace=0)
    assert asyncio.run(scrape()) is None
    assert asyncio.run(scrape()) is None
    err = capsys.readouterr().err
    assert err.count("no batch and busy figures") == 1, err
    assert "the server may have exited" in err and "pass --metrics-url" not in err, err


def test_an_open_loop_stream_whose_server_dies_fails_each_waiting_call_with_its_status(
    classifier_path: Path,
) -> None:
    load = Load(rate=100, seconds=1, warmup=0.2, timeout=20, stream=True)

    def kill_in_window(pid: int, opening: bool) -> None:
        if opening:
            asyncio.get_running_loop().call_later(0.3, os.kill, pid, signal.SIGKILL)

    outcome = load_on_spawned(classifier_path, load, kill_in_window)
    # Calls written to the ended stream once raised out of the load generator uncounted (a
    # traceback each), and those waiting on it waited out --timeout as DEADLINE_EXCEEDED.
    # A write that loses the race with the connection's end fails in gRPC's own client as
    # INTERNAL "Internal error from Core" (its aio write path), not as UNAVAILABLE.
    assert "UNAVAILABLE" in outcome.errors, outcome.errors
    assert set(outcome.errors) <= {"UNAVAILABLE", "INTERNAL"}, outcome.errors
    unanswered = outcome.sent - len(outcome.latencies)
    failed = outcome.errors["UNAVAILABLE"] + outcome.errors["INTERNAL"]
    assert unanswered > 0 and failed >= unanswered, (outcome.sent, outcome.errors)


def _row(images: int, p50_ms: float) -> dict:
    return {"server": "s", "load": "c=1", "images_per_request": images, "throughput": 100.0,
            "p50_ms": p50_ms}  # fmt: skip


def test_p50_over_in_process_subtracts_the_latency_of_one_calls_images() -> None:
    in_process = InProcess({1: 1000.0, 4: 2000.0}, {1: 0.001, 4: 0.002}, {1: 0, 4: 0})
    rows = [_row(1, 5.0), _row(4, 5.0), _row(3, 5.0)]
    machine = {"cpus": 2, "platform": "p", "python": "3", "date": "d"}
    benchreport.report(model="m", model_file=None, target=None, in_process=in_process,
                       servers=[], rows=rows, machine=machine)  # fmt: skip
    # A call of 4 images is compared with ONNX Runtime on a batch of 4, not of 1: the
    # difference between the two once showed as serving overhead.
    assert [row["p50_over_single_ms"] for row in rows] == [pytest.approx(4.0),
                                                           pytest.approx(3.0), None]  # fmt: skip
    # Throughput ratios stay per image.
    assert [row["ratio_best"] for row in rows] == [0.05] * 3


def test_plot_without_matplotlib_is_a_usage_error_before_any_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec

    def without_matplotlib(name: str, *args: object) -> object:
        return None if name == "matplotlib" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_matplotlib)
    # No server at that port: only a check before the load can answer 2.
    with pytest.raises(SystemExit) as caught:
        bench.main([f"127.0.0.1:{free_port()}", "--model", "m", "--plot",
                    str(tmp_path / "bench.png")])  # fmt: skip
    assert caught.value.code == 2
    assert "expected matplotlib for --plot" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("--compare=--max-batch-size=0", "expected --max-batch-size between 1 and 4096"),
        ("--compare=--max-bach-size=1", "unrecognized arguments: --max-bach-size=1"),
        ("--server-arg=--instances=x", "invalid int value: 'x'"),
    ],
)
def test_server_flags_the_server_would_refuse_are_a_usage_error_before_any_load(
    classifier_path: Path, capsys: pytest.CaptureFixture[str], flag: str, said: str
) -> None:
    # Found once only when that server was spawned: after every earlier server's settings had
    # run, whose figures were then lost with the run.
    with pytest.raises(SystemExit) as caught:
        bench.main(["--spawn", str(classifier_path), flag])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "flags that `python -m serve` takes" in err and said in err, err
    assert "spawning" not in err
