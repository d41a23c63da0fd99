"""``python -m serve MODEL.onnx [MODEL.onnx ...]`` or ``python -m serve --model-repository DIR``."""

from __future__ import annotations

import signal

# The signals that stop the server. SIGHUP (the terminal closed, an ssh session dropped) killed
# it at once, ending the calls in flight; it drains now, unless the server was started ignoring
# it (`nohup`), as such a server must keep doing.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT) + (
    () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
)
if __name__ == "__main__":
    # Held pending by the kernel until serve() has the event loop's handlers in place, before
    # the imports below (some 50 ms): Ctrl-C meanwhile printed a KeyboardInterrupt traceback,
    # and a SIGTERM to Python as a container's PID 1, which the kernel drops while its action
    # is the default, was lost, leaving the pod to its SIGKILL a grace period later.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

from serve import affinity, logs  # noqa: E402
from serve.cli_help import DefaultsFormatter  # noqa: E402
from serve.config import (  # noqa: E402
    DEFAULT_KEEPALIVE_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEVICES,
    ServerConfig,
)

_log = logging.getLogger("serve")


class _Parser(argparse.ArgumentParser):
    """argparse, except that with ``json_errors`` a mistake is one JSON log line: its usage
    block is not JSON, and a log collector reading ``--log-format json`` would mangle it."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        logs.configure("error", "json")
        _log.error("%s; see `%s --help`", message, self.prog)
        sys.exit(2)


def _path(text: str) -> Path:
    # Path("") is the current folder: `--model-repository ""` (an unset variable in a
    # manifest) served every subfolder of wherever the server started, or failed naming one.
    if not text:
        raise argparse.ArgumentTypeError(
            "expected a path, got an empty string (an unset variable?); pass the file or folder"
        )
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m serve``."""
    p = _Parser(
        prog="python -m serve",
        formatter_class=DefaultsFormatter,
        description="Serve ONNX image classifiers over gRPC (KServe v2 / Triton protocol, "
        "classifier.v1.Classifier, health, reflection) with dynamic batching.",
    )
    p.add_argument("models", nargs="*", type=_path, metavar="MODEL.onnx", help="models to serve")
    p.add_argument("--model-repository", type=_path, metavar="DIR",
                   help="folder with one subfolder per model: NAME/model.onnx or NAME/1/model.onnx")
    p.add_argument("--host", default="0.0.0.0", help="address both ports bind")
    p.add_argument("--port", type=int, default=8001, help="gRPC port; 0 picks a free one")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics; 0 = off")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="rows a batch may hold; larger requests are split")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="how long a batch may wait for more requests; 0 = no waiting")
    p.add_argument("--max-queue-size", type=int, default=1024,
                   help="queued requests per model before RESOURCE_EXHAUSTED")
    p.add_argument("--instances", type=int, default=1, help="batches run concurrently per model")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds to drain on SIGTERM/SIGINT/SIGHUP")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest request or answer message")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="larger encoded images are refused before decoding")
    p.add_argument("--keepalive-time", type=float, default=DEFAULT_KEEPALIVE_S, metavar="S",
                   help="ping every connection after S idle seconds and close it when the "
                   "client does not answer; 0 = off")
    p.add_argument("--max-connection-age", type=float, default=0.0, metavar="S",
                   help="ask clients to reconnect after about S seconds (re-balances them "
                   "across replicas); 0 = never")
    p.add_argument("--max-connection-age-grace", type=float, metavar="S",
                   help="then close the connection S seconds later, ending the calls still "
                   "on it (open streams); unset: wait for them")
    p.add_argument("--device", choices=DEVICES, default="auto", type=str.lower,
                   help="auto: CUDA when a GPU is usable, else CPU")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="ONNX Runtime threads per model (one session, shared by its instances); "
                   "0 = one per core the process may use (cpuset, CPU quota)")
    p.add_argument("--tls-cert", type=_path, help="PEM certificate (chain): serve TLS")
    p.add_argument("--tls-key", type=_path, help="its unencrypted PEM private key")
    p.add_argument("--tls-client-ca", type=_path, help="require client certificates (mTLS)")
    p.add_argument("--auth-token-file", type=_path, help="require 'authorization: Bearer TOKEN'")
    p.add_argument("--log-level", default="info", choices=logs.LEVELS, type=str.lower,
                   help="least severe level logged")
    p.add_argument("--log-format", default="text", choices=logs.FORMATS, type=str.lower,
                   help="json: one object per line, for log collectors")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    parser.json_errors = (_log_format(argv) or "").lower() == "json"
    return parser.parse_args(argv)


def _log_format(argv: list[str]) -> str | None:
    """The ``--log-format`` value in ``argv`` (the last one, as argparse reads it), found
    before parsing so that a mistake in another flag is reported in that format."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--log-format" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--log-format="):
            found = arg.partition("=")[2]
    return found


def build_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        models=tuple(args.models),
        model_repository=args.model_repository,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size,
        instances=args.instances,
        grace=args.grace,
        max_message_bytes=args.max_message_bytes,
        max_image_pixels=args.max_image_pixels,
        keepalive_time=args.keepalive_time,
        max_connection_age=args.max_connection_age,
        max_connection_age_grace=args.max_connection_age_grace,
        device=args.device,
        intra_op_threads=args.intra_op_threads,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM, SIGINT or SIGHUP (unless ignored at start), then drain within
    ``config.grace``."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[int] = loop.create_future()

    def on_signal(signum: int) -> None:
        if not received.done():
            received.set_result(signum)
            return
        if signum == signal.SIGHUP:
            # A hangup comes twice (the kernel to the terminal's foreground group, the shell
            # to its jobs): no operator's impatience, so the drain goes on.
            return
        # A second Ctrl-C (or SIGTERM) while draining or loading: the operator will not wait
        # out --grace or a warm-up; exit as a shell reports a process killed by the signal.
        _log.warning(
            "%s received again; exiting at once, without draining", signal.Signals(signum).name
        )
        os._exit(128 + signum)

    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    # Any of them sent since start-up (held pending by main) is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    # After logging is configured and the handlers are in place: this imports ORT and gRPC,
    # which takes a while, and a signal meanwhile must not kill the process.
    from serve import images
    from serve.server import Server

    images.use_own_pixel_limit()  # process-wide: here, not in Server, which apps may embed
    _warn_if_oversubscribed(config.intra_op_threads)
    server = Server(config)
    try:
        # A signal while models load (a pod deleted during a long GPU warm-up) stops at once
        # instead of after the warm-up.
        starting = asyncio.create_task(server.start())
        await asyncio.wait({starting, received}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            _log.info(
                "%s: signal received while loading models; stopping (%s: exit at once)",
                *_named(received.result()),
            )
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()  # a load that failed raises here
        # Process-wide too. What is alive now (modules, models, gRPC) lives as long as the
        # process: the collector stops re-scanning it. Under unary load its full collections
        # had held the event loop 15-45 ms every few seconds (docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        waiter = asyncio.create_task(server.wait())
        await asyncio.wait({waiter, received}, return_when=asyncio.FIRST_COMPLETED)
        if received.done():
            _log.info("%s received; shutting down (%s: exit at once)", *_named(received.result()))
    finally:
        received.cancel()
        await server.stop()


def _named(signum: int) -> tuple[str, str]:
    """The signal's name, and what to send to stop without draining."""
    name = signal.Signals(signum).name
    return name, "SIGTERM or SIGINT" if signum == signal.SIGHUP else "again"


def _warn_if_oversubscribed(threads: int) -> None:
    """More ONNX Runtime threads than CPUs wait for each other at every operator: 100 on 2
    CPUs made a small CNN's batch 1.7 times slower."""
    cpus = affinity.worker_count(
        affinity.current_cpus(), os.cpu_count(), affinity.cgroup_cpu_quota(), cap=threads
    )
    if threads > cpus:
        _log.warning(
            "--intra-op-threads %d is more than the %d CPU%s this process may use (affinity, "
            "cgroup quota): its threads would take turns on them at every operator; pass at "
            "most %d, or 0 for one per core",
            threads,
            cpus,
            "" if cpus == 1 else "s",
            cpus,
        )


def _open_stdio() -> None:
    """Point closed stdin, stdout or stderr (`2>&-`, some supervisors) at /dev/null: the next
    files opened would take those numbers, and ONNX Runtime and gRPC's C core write their
    own lines to fd 2, which would be the event loop's wake-up socket or a client's."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: list[str] | None = None) -> int:
    _open_stdio()
    args = parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    # gRPC's C core logs at INFO on its own stderr, outside our format: one "Handshake failed"
    # line for every plaintext or garbage connection to a TLS port. Errors still show; set
    # GRPC_VERBOSITY yourself to see more. It is read when grpc is imported, below.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        asyncio.run(serve(build_config(args)))
    except (ValueError, OSError, RuntimeError) as e:
        # One line on stderr in the configured log format, for a bad flag as for a bad model:
        # a log collector reading --log-format json must be able to parse it. Under
        # --log-level critical it is critical: exiting without a word leaves nothing to fix.
        _log.log(logging.ERROR if _log.isEnabledFor(logging.ERROR) else logging.CRITICAL, "%s", e)
        return 2 if isinstance(e, ValueError) else 1
    except Exception:
        # A bug. One record all the same: in --log-format json the traceback is the "exc"
        # field of one line, not lines of its own that a log collector cannot parse.
        _log.critical("unexpected error, a bug: please report it", exc_info=True)
        return 1
    from serve.batcher import batches_running  # imported by serve() already

    if batches_running():  # a batch ran past --grace: exiting normally would abort the process
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
