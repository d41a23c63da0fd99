"""The command line of ``python -m serve.bench``: flags, their checks, and ``BenchConfig``.

Every check that needs no server runs here, before anything is measured: a usage error
exits 2 (argparse's ``parser.error``). See serve/bench.py for what the run does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shlex
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import grpc

from serve import benchreport
from serve.benchenv import ModelFileError, check_model_file
from serve.cli_help import DefaultsFormatter
from serve.loadgen import Load, check_payload
from serve.loadsend import Metadata
from serve.security import (
    check_certificates,
    check_client_certificate_flags,
    key_pair,
    read_file,
    read_token,
)
from serve.targets import check_target

if TYPE_CHECKING:
    from serve.model_info import ModelInfo


@dataclass(frozen=True)
class BenchConfig:
    """Everything one bench run does; built from the command line by ``parse``."""

    target: str | None
    model: str
    spawn: Path | None
    model_file: Path | None
    model_file_info: ModelInfo | None  # what the server would read from model_file
    server_args: tuple[str, ...]
    compare: tuple[tuple[str, ...], ...]
    loads: tuple[Load, ...]
    distinct: int
    channels: int
    metrics_url: str | None
    baseline_batches: tuple[int, ...]
    baseline_seconds: float
    baseline_threads: tuple[int, ...]
    baseline_device: str
    credentials: grpc.ChannelCredentials | None = None  # TLS to HOST:PORT (--ca, --cert, --key)
    metadata: Metadata = None  # sent with every call (--token-file)


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1, got {text!r}")
    return values


# Flags of `python -m serve` a spawned server must not get: the bench sets them itself, or
# cannot follow them (its channels to a spawned server and its readiness probe are plaintext,
# its calls to it carry no token). The server would listen elsewhere, or refuse every call.
_OWN_FLAGS = {
    "--host": "the bench starts the server on 127.0.0.1 and free ports itself",
    "--port": "the bench starts the server on 127.0.0.1 and free ports itself",
    "--metrics-port": "the bench starts the server on 127.0.0.1 and free ports itself",
    "--tls-cert": "the bench connects in plaintext",
    "--tls-key": "the bench connects in plaintext",
    "--tls-client-ca": "the bench connects in plaintext",
    "--auth-token-file": "the bench sends no token",
}


def _own_flag(token: str) -> str | None:
    """The flag of ``_OWN_FLAGS`` that ``token`` sets (argparse takes a unique prefix too)."""
    name = token.split("=", 1)[0]
    if not name.startswith("--") or len(name) < 3:
        return None
    return next((flag for flag in _OWN_FLAGS if flag.startswith(name)), None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve.bench",
        description="Benchmark a classifier server (KServe v2 ModelInfer) against in-process "
        "ONNX Runtime on the same model file.",
        epilog="exit codes: 0 every call answered; 1 some calls failed (see the errors column) "
        "or the server could not be reached; 2 usage",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("target", nargs="?", metavar="HOST:PORT", help="a running server")
    p.add_argument("--model", help="model name (default with --spawn: the file's stem)")
    p.add_argument("--spawn", type=Path, metavar="MODEL.onnx",
                   help="start `python -m serve MODEL.onnx` on free 127.0.0.1 ports for the run")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for the spawned server, e.g. --server-arg=--max-batch-size=1")
    p.add_argument("--compare", action="append", default=[], metavar="'ARGS'",
                   help="also spawn a server with these extra flags and run the same settings "
                   "(--compare='--max-batch-size=1')")
    p.add_argument("--model-file", type=Path, help="the ONNX file for the in-process baseline")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 16, 64],
                   help="closed-loop calls in flight per setting (default 1 16 64)")
    p.add_argument("--rate", type=float, nargs="*", default=[],
                   help="open-loop settings: requests per second")
    p.add_argument("--api", choices=("unary", "stream"), nargs="+", default=["unary"],
                   help="unary ModelInfer calls and/or ModelStreamInfer streams (closed loop: "
                   "one stream per concurrent caller); each api runs every setting")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per setting")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per setting")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call")
    p.add_argument("--distinct", type=int, default=16, help="distinct request payloads")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (connections)")
    p.add_argument("--ca", type=Path, help="PEM CA certificate: connect to HOST:PORT with TLS")
    p.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", type=Path, help="client private key (PEM) for mutual TLS")
    p.add_argument("--token-file", type=Path,
                   help="bearer token sent with every call (servers with auth)")
    p.add_argument("--metrics-url",
                   help="the server's /metrics (default http://HOST:8002/metrics; "
                   "a spawned server's own)")
    p.add_argument("--baseline-batches", type=_batches, default=(1, 2, 4, 8, 16, 32, 64),
                   metavar="B,B,...", help="in-process batch sizes (default 1,2,4,...,64)")
    p.add_argument("--baseline-seconds", type=float, default=2.0, help="per in-process batch size")
    p.add_argument("--baseline-threads", type=int, nargs="+", default=[1, 0],
                   help="in-process intra-op thread counts to try, best kept per batch size "
                   "(0: the server's default, ONNX Runtime's capped to the CPUs this process may "
                   "use; default 1 0)")
    p.add_argument("--baseline-device", choices=("cpu", "cuda"), default="cpu",
                   help="execution provider of the in-process baseline")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="draw throughput vs p99 latency per concurrency (needs matplotlib)")
    return p  # fmt: skip


def parse(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.target is None) == (args.spawn is None):
        parser.error("expected HOST:PORT or --spawn MODEL.onnx (exactly one); pass one of them")
    if args.target is not None:
        try:
            check_target(args.target)
        except ValueError as e:
            parser.error(str(e))
    if args.spawn is not None and not args.spawn.is_file():
        parser.error(f"expected a model file for --spawn, got {str(args.spawn)!r}; check the path")
    if args.target is not None and not args.model:
        parser.error("expected --model NAME with HOST:PORT; pass the served model's name")
    given = {"--ca": args.ca, "--cert": args.cert, "--key": args.key,
             "--token-file": args.token_file}  # fmt: skip
    secured = [flag for flag, value in given.items() if value is not None]
    if secured and args.spawn is not None:
        parser.error(
            f"expected {'/'.join(secured)} with HOST:PORT, got --spawn: the bench starts that "
            "server in plaintext without a token; leave them out, or bench a running server"
        )
    try:
        check_client_certificate_flags(args.ca, args.cert, args.key)
    except ValueError as e:
        parser.error(str(e))
    if (args.server_arg or args.compare) and args.spawn is None:
        parser.error("expected --spawn with --server-arg/--compare; they configure that server")
    compare = []
    for text in args.compare:
        try:
            compare.append(tuple(shlex.split(text)))
        except ValueError as e:  # "No closing quotation", "No escaped character"
            parser.error(
                f"expected --compare 'FLAGS' in shell quoting, got {text!r} ({e}); close the "
                "quote, e.g. --compare='--instances=2'"
            )
    for token in (*args.server_arg, *(token for flags in compare for token in flags)):
        flag = _own_flag(token)
        if flag is not None:
            parser.error(
                f"expected --server-arg and --compare without {flag}, got {token!r}: "
                f"{_OWN_FLAGS[flag]}; leave it out"
            )
    if args.spawn is not None:
        for flags in (args.server_arg, *([*args.server_arg, *extra] for extra in compare)):
            try:
                _check_server_flags(args.spawn, flags)
            except ValueError as e:
                parser.error(
                    f"expected --server-arg and --compare flags that `python -m serve` takes, "
                    f"got {' '.join(flags)!r}: {e}; fix them or leave them out"
                )
    if args.distinct < 1 or args.channels < 1:
        parser.error("expected --distinct >= 1 and --channels >= 1")
    if not 0 < args.baseline_seconds < math.inf:
        parser.error(f"expected --baseline-seconds > 0, got {args.baseline_seconds}; pass e.g. 2")
    if min(args.baseline_threads) < 0:
        parser.error(
            f"expected --baseline-threads >= 0 (0: ONNX Runtime's default), got "
            f"{args.baseline_threads}; pass e.g. 1 0"
        )
    if args.metrics_url is not None and not _is_http_url(args.metrics_url):
        parser.error(
            f"expected --metrics-url http(s)://HOST:PORT/PATH, got {args.metrics_url!r}; "
            "pass the server's metrics URL, e.g. http://localhost:8002/metrics"
        )
    if args.plot is not None:
        try:
            benchreport.check_plot_path(args.plot)
        except ValueError as e:
            parser.error(str(e))
    try:
        loads = [
            Load(concurrency=c, rate=r, images=args.images, seconds=args.seconds,
                 warmup=args.warmup, timeout=args.timeout, stream=api == "stream")
            for api in dict.fromkeys(args.api)
            for c, r in [(c, None) for c in args.concurrency] + [(1, r) for r in args.rate]
        ]  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    try:
        credentials, metadata = _security(args)
    except ValueError as e:  # a token, CA or client certificate file that cannot work
        parser.error(str(e))
    model_file = args.model_file or args.spawn
    info = None
    if model_file is not None:
        flag = "--model-file" if args.model_file else "--spawn"
        try:
            info = check_model_file(model_file, args.baseline_device)
            check_payload(info.sample_shape, args.images, args.distinct)
        except ModelFileError as e:
            parser.error(f"{flag}: {e}")
        except ValueError as e:
            parser.error(str(e))
    metrics_url = args.metrics_url
    if metrics_url is None and args.target is not None and not args.target.startswith("unix:"):
        metrics_url = f"http://{args.target.rsplit(':', 1)[0]}:8002/metrics"
    config = BenchConfig(
        target=args.target,
        model=args.model or (args.spawn.stem if args.spawn else ""),
        spawn=args.spawn,
        model_file=model_file,
        model_file_info=info,
        server_args=tuple(args.server_arg),
        compare=tuple(compare),
        loads=tuple(loads),
        distinct=args.distinct,
        channels=args.channels,
        metrics_url=metrics_url,
        baseline_batches=args.baseline_batches,
        baseline_seconds=args.baseline_seconds,
        baseline_threads=tuple(args.baseline_threads),
        baseline_device=args.baseline_device,
        credentials=credentials,
        metadata=metadata,
    )
    return config, args


def _check_server_flags(model: Path, flags: list[str]) -> None:
    """ValueError with `python -m serve`'s own message when a server spawned with ``flags``
    would exit at once: with --compare, that was found only after the earlier servers' settings
    had all run, and what they measured was lost."""
    from serve.__main__ import build_config
    from serve.__main__ import build_parser as server_parser

    def refuse(message: str) -> NoReturn:
        raise ValueError(message)

    parser = server_parser()
    parser.error = refuse  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            build_config(parser.parse_args([str(model), *flags]))
    except SystemExit as e:  # --help: it prints and exits
        raise ValueError("that server would print its help and exit") from e


def _security(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, Metadata]:
    """TLS credentials and the token's metadata from --ca, --cert, --key and --token-file, read
    and checked as ``python -m serve.client`` does; ValueError naming the flag to fix."""
    metadata = None
    if args.token_file is not None:
        metadata = (("authorization", f"Bearer {read_token(args.token_file, '--token-file')}"),)
    if args.ca is None:
        return None, metadata
    ca = read_file(args.ca, "PEM CA certificate", "--ca")  # first: it words a missing file
    check_certificates(args.ca, "--ca", "pass the CA that signed the server's --tls-cert")
    key, chain = key_pair(args.cert, args.key, "--cert", "--key") or (None, None)
    return grpc.ssl_channel_credentials(ca, key, chain), metadata


def _is_http_url(text: str) -> bool:
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)
