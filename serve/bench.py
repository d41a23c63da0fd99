"""``python -m serve.bench HOST:PORT --model NAME`` or ``python -m serve.bench --spawn MODEL.onnx``.

Closed-loop load at each ``--concurrency`` (and open-loop at each ``--rate``), with the
in-process ONNX Runtime throughput of the same model file measured in the same run, so every
served figure is also a ratio that holds on a noisy machine. See docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import os
import platform
import signal
import sys
import time

if __name__ == "__main__":
    # As the server and the probe do: gRPC's C core would print its own "Handshake failed"
    # line before ours. It reads GRPC_VERBOSITY once, when grpc is first imported (below).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from serve import benchreport
from serve.benchargs import BenchConfig, parse
from serve.benchenv import (
    InProcess,
    MetricsError,
    SpawnedServer,
    measure_in_process,
    read_metrics,
)
from serve.loadgen import (
    Outcome,
    channel,
    check_answer,
    check_payload,
    infer_requests,
    model_input,
    print_progress,
    run_load,
)


class UsageError(Exception):
    """A setting that cannot work, found once the server is asked; main exits 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the ``with SpawnedServer`` blocks stop their
    servers: Python's default for SIGTERM exits at once and left them running."""


class OnSigterm:
    """The SIGTERM handler: SIGTERM ends the run as Ctrl-C does, and ``received`` says which.

    Inside ``asyncio.run`` that is asyncio's own SIGINT handler, which cancels the running task
    so that every ``finally`` ends its gRPC calls. An exception raised wherever the loop was
    (inside one of grpc.aio's callbacks, say) could leave a call that nobody ends, and the run
    hung instead of stopping (once in CI, SIGTERM mid-run).
    """

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: object) -> None:
        self.received = True
        on_sigint = signal.getsignal(signal.SIGINT)
        if callable(on_sigint) and on_sigint is not signal.default_int_handler:
            on_sigint(signal.SIGINT, frame)  # asyncio.Runner's: cancels its main task
            return
        raise Terminated


async def _run_settings(
    config: BenchConfig,
    target: str,
    metrics_url: str | None,
    label: str,
    server: SpawnedServer | None,
) -> list[dict]:
    channels = [channel(target, config.credentials) for _ in range(config.channels)]
    try:
        timeout = config.loads[0].timeout
        input_name, shape = await _served_input(config, channels[0], target)
        try:
            for load in config.loads:
                check_payload(shape, load.images, config.distinct)
        except ValueError as e:
            raise UsageError(str(e)) from e
        rows = []
        scrape = (
            None
            if metrics_url is None
            else _Scraper(metrics_url, config.model, label, given=server is None)
        )
        for load in config.loads:
            requests = infer_requests(config.model, input_name, shape, load.images, config.distinct)
            name = f"{label} {load.label}"
            try:
                await check_answer(
                    channels[0], requests[0], load.images, timeout, load.stream, config.metadata
                )
            except grpc.aio.AioRpcError as e:
                if rows and not _too_large(e):
                    # The server answered earlier settings and fails this one's check call (it
                    # died or was stopped, mostly): the rows measured so far are kept, this one
                    # is its error.
                    sys.stderr.write(f"{name}: not run: its check call failed "
                                     f"({e.code().name}: {e.details()})\n")  # fmt: skip
                    failed = Outcome(load, errors=collections.Counter({e.code().name: 1}))
                    row = _row(label, failed, [], server.rss_mb() if server else None)
                    rows.append({**row, "client_cpu_ms_per_call": None,
                                 "server_cpu_ms_per_call": None})  # fmt: skip
                    continue
                if not _too_large(e):
                    raise
                size = len(requests[0])
                shown = f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"
                raise RuntimeError(
                    f"expected the server to accept a request of {load.images} images "
                    f"({shown}), got RESOURCE_EXHAUSTED: it exceeds the server's message "
                    f"limit ({e.details()}); lower --images, or raise the server's "
                    "--max-message-bytes (with --spawn: --server-arg=--max-message-bytes=N)"
                ) from e
            scraped: list[dict[str, float] | None] = []
            cpu: list[tuple[float, float | None]] = []

            async def on_window(opening: bool, scraped: list = scraped, cpu: list = cpu) -> None:
                if scrape is not None:
                    scraped.append(await scrape())
                cpu.append((time.process_time(), server.cpu_seconds() if server else None))

            progress = print_progress(name) if sys.stderr.isatty() else None
            outcome = await run_load(
                channels, requests, load, on_window, progress, config.metadata
            )
            sys.stderr.write(
                f"{chr(13) if progress else ''}{name}: {outcome.throughput:.0f} img/s, "
                f"{outcome.requests} calls, {sum(outcome.errors.values())} errors"
                + " " * 20 + "\n"
            )
            row = _row(label, outcome, scraped, server.rss_mb() if server else None)
            (client0, server0), (client1, server1) = cpu
            calls = max(outcome.requests, 1)
            row["client_cpu_ms_per_call"] = (client1 - client0) / calls * 1e3
            row["server_cpu_ms_per_call"] = (
                None if server0 is None or server1 is None else (server1 - server0) / calls * 1e3
            )
            rows.append(row)
        return rows
    finally:
        for chan in channels:
            await chan.close()


class _Scraper:
    """Reads one server's metrics for the batch and busy columns; the first time they cannot
    be read, a line on stderr says why: the columns were once left empty without a word (a
    --metrics-url with a trailing slash, which the metrics port answers with 404)."""

    def __init__(self, url: str, model: str, label: str, given: bool) -> None:
        self.url, self.model, self.label = url, model, label
        self.given = given  # the URL is --metrics-url's (or its default), not a spawned server's
        self.answered = False  # read at least once: a later failure is the server's, not the URL's
        self.said = False

    async def __call__(self) -> dict[str, float] | None:
        try:
            found = await asyncio.to_thread(read_metrics, self.url, self.model)
        except MetricsError as e:
            if not self.said:
                fix = (
                    "pass --metrics-url http://HOST:PORT/metrics with the server's --metrics-port"
                    if self.given and not self.answered
                    else "the server may have exited"
                )
                sys.stderr.write(
                    f"warning: [{self.label}] no batch and busy figures: expected the server's "
                    f"Prometheus metrics at {self.url}, got {e}; {fix}\n"
                )
                self.said = True
            return None
        self.answered = True
        return found


async def _served_input(
    config: BenchConfig, chan: grpc.aio.Channel, target: str
) -> tuple[str, tuple[int, ...]]:
    """The served model's input name and sample shape; UsageError when ``--model-file`` is
    another model, whose in-process figures would make every ratio meaningless."""
    timeout = config.loads[0].timeout
    input_name, shape, classes = await model_input(chan, config.model, timeout, config.metadata)
    info = config.model_file_info
    if info is not None and (
        shape != info.sample_shape or classes not in (None, info.num_classes)
    ):
        served = "×".join(map(str, shape)) + (f", {classes} classes" if classes else "")
        raise UsageError(
            f"expected --model-file to be the model {config.model!r} served at {target} "
            f"(input {served}), got {config.model_file} (input "
            f"{'×'.join(map(str, info.sample_shape))}, {info.num_classes} classes); pass the "
            "ONNX file that server serves to --model-file, or leave --model-file out"
        )
    return input_name, shape


async def _check_served_model(config: BenchConfig, target: str) -> None:
    chan = channel(target, config.credentials)
    try:
        await _served_input(config, chan, target)
    finally:
        await chan.close()


def _too_large(error: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed on a gRPC message-size limit (not on a full queue)."""
    details = error.details() or ""
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details


def _row(label: str, outcome: Outcome, scraped: list, rss_mb: float | None) -> dict:
    load = outcome.load
    mean_batch = busy = None
    if len(scraped) == 2 and None not in scraped:
        before, after = scraped
        batches = after["batches"] - before["batches"]
        mean_batch = (after["rows"] - before["rows"]) / batches if batches else None
        # Share of the window an instance spent in ONNX Runtime: near 1 (per instance) means
        # compute-bound, well below means the server's own overhead is the limit.
        busy = (after["compute_s"] - before["compute_s"]) / outcome.window
    ms = {q: outcome.percentile(q) for q in (50, 90, 99)}
    return {
        "server": label,
        "load": load.label,
        "concurrency": None if load.rate is not None else load.concurrency,
        "rate": load.rate,
        "images_per_request": load.images,
        "seconds": round(outcome.window, 3),
        "requests": outcome.requests,
        "sent": outcome.sent,
        "late": outcome.late,
        "fell_behind": outcome.fell_behind,
        "throughput": outcome.throughput,
        "p50_ms": None if ms[50] is None else ms[50] * 1e3,
        "p90_ms": None if ms[90] is None else ms[90] * 1e3,
        "p99_ms": None if ms[99] is None else ms[99] * 1e3,
        "errors": dict(outcome.errors),
        "mean_batch": mean_batch,
        "compute_busy": busy,
        "server_rss_mb": rss_mb,
    }


def _servers(config: BenchConfig) -> list[tuple[str, tuple[str, ...]]]:
    base = " ".join(config.server_args) or "default"
    out = [(base, config.server_args)]
    for extra in config.compare:
        out.append((" ".join((*config.server_args, *extra)), (*config.server_args, *extra)))
    return out


def _baseline(config: BenchConfig, when: str) -> InProcess:
    from serve.runtime import ORT_ERRORS, ort_reason

    sys.stderr.write(f"in-process ONNX Runtime on {config.model_file} ({when} the load) ...\n")
    try:
        return measure_in_process(
            config.model_file,
            config.baseline_batches,
            config.baseline_seconds,
            config.baseline_threads,
            config.baseline_device,
        )
    except ORT_ERRORS as e:  # none of them a RuntimeError: caught here, not as a traceback
        sizes = ",".join(map(str, config.baseline_batches))
        device = " or --baseline-device cpu" if config.baseline_device == "cuda" else ""
        raise UsageError(
            f"expected ONNX Runtime to run {config.model_file} in-process at batch sizes "
            f"{sizes}, got {type(e).__name__}: {ort_reason(e)}; pass --baseline-batches with "
            f"sizes the model runs{device}, or a model exported with a symbolic batch axis"
        ) from e


def run(config: BenchConfig) -> dict:
    """Measure in-process ONNX Runtime, then every server setting; returns the report."""
    in_process: InProcess | None = None
    if config.spawn is None and config.model_file is not None:
        # Asked before the baseline, which takes a while: a --model-file of another model, or
        # a server that does not answer, is then said at once.
        asyncio.run(_check_served_model(config, config.target or ""))
    if config.model_file is not None:
        in_process = _baseline(config, "before")
    servers: list[dict] = []
    rows: list[dict] = []
    if config.spawn is None:
        target = config.target or ""
        rows += asyncio.run(_run_settings(config, target, config.metrics_url, "server", None))
    else:
        for label, args in _servers(config):
            sys.stderr.write(f"spawning python -m serve {config.spawn} {' '.join(args)}\n")
            with SpawnedServer(config.spawn, list(args)) as server:
                before = server.rss_mb()
                rows += asyncio.run(
                    _run_settings(config, server.target, server.metrics_url, label, server)
                )
                after = server.rss_mb()
                code = server.stop()
            servers.append({"label": label, "args": list(args), "rss_start_mb": before,
                            "rss_end_mb": after, "exit_code": code})  # fmt: skip
    measured: list[float] = []
    if in_process is not None:
        # Measured again after the load, keeping the faster per batch size: on a shared VM
        # the machine's speed drifts over a run, and a baseline taken in a slow spell would
        # flatter every ratio.
        again = _baseline(config, "after")
        measured = [in_process.best, again.best]
        in_process = in_process.best_of(again)
    return benchreport.report(
        model=config.model,
        model_file=str(config.model_file) if config.model_file else None,
        target=config.target,
        in_process=in_process,
        baseline_runs=measured,
        servers=servers,
        rows=rows,
        machine={
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
        },
    )


# What to do when the server refuses the first call, by its status.
_HINTS = {
    grpc.StatusCode.NOT_FOUND: "check --model",
    grpc.StatusCode.UNAVAILABLE: "check HOST:PORT and that `python -m serve` is running there "
    "(a TLS server needs --ca with the CA that signed its certificate, and --cert and --key "
    "if it requires client certificates)",
    grpc.StatusCode.UNAUTHENTICATED: "pass --token-file with the server's token (the contents "
    "of its --auth-token-file)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "check HOST:PORT, or raise --timeout",
}


def main(argv: list[str] | None = None, sigterm: OnSigterm | None = None) -> int:
    try:
        config, args = parse(argv)  # reads the model file: a signal may come meanwhile
        result = run(config)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM; any spawned server is stopped by now
        by_sigterm = isinstance(e, Terminated) or (sigterm is not None and sigterm.received)
        signum = signal.SIGTERM if by_sigterm else signal.SIGINT
        print(f"error: stopped by {signum.name} before the report was complete; nothing "
              "measured is printed", file=sys.stderr)  # fmt: skip
        return 128 + signum
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as e:  # the server is unreachable or refused the first call
        where = (
            f"the server at {config.target}"
            if config.target
            else f"the server spawned for {config.spawn}"
        )
        hint = _HINTS.get(e.code(), "check the server's log")
        if config.spawn is not None and e.code() == grpc.StatusCode.UNAVAILABLE:
            hint = f"it may have exited: run `python -m serve {config.spawn}` to see its log"
        print(f"error: {where} did not answer ({e.code().name}: {e.details()}); {hint}",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(benchreport.table(result))
    if args.plot is not None:
        try:
            benchreport.plot(result, args.plot)
        except OSError as e:
            print(
                f"error: expected to write the plot to {str(args.plot)!r}, got "
                f"{e.strerror or e}; check the path (the report above is complete)",
                file=sys.stderr,
            )
            return 1
        except RuntimeError as e:  # matplotlib missing
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 1 if any(row["errors"] for row in result["rows"]) else 0


if __name__ == "__main__":
    on_sigterm = OnSigterm()
    signal.signal(signal.SIGTERM, on_sigterm)
    sys.exit(main(sigterm=on_sigterm))
