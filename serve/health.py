"""Health probe: ``python -m serve.health HOST:PORT [--model NAME]``.

Asks the server's grpc.health.v1 Check for the whole server (service "") or one model and exits
0 when it answers SERVING, 1 otherwise (not serving, unknown model, unreachable), printing one
line. Meant for container HEALTHCHECKs, scripts and humans; Kubernetes can use its native gRPC
probe instead.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    # gRPC's C core logs a TLS handshake failure at INFO on stderr, a line of its own before
    # the probe's one line. It reads GRPC_VERBOSITY once, when grpc is first imported (below).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.cli_help import DefaultsFormatter
from serve.config import MAX_DEADLINE_S
from serve.errors import shown
from serve.security import check_certificates, key_pair, read_file
from serve.targets import check_target

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

_MODEL_NAMES = "a model is named after its .onnx file's stem or its folder in the model repository"


def unknown_service(service: str) -> str:
    """The server's NOT_FOUND message for a health Check of ``service``, a name it does not
    serve. It names no served model: Check needs no token (kubelet's probe sends none), so
    the names are left to health List and RepositoryIndex, which do."""
    return (
        f"expected service '' (the whole server) or a served model's name, got "
        f"{shown(service)}; check the model name: {_MODEL_NAMES} (health List or RepositoryIndex "
        "lists them)"
    )


@dataclass(frozen=True)
class ProbeConfig:
    """Where and how to probe; built from the command line."""

    target: str
    service: str = ""
    timeout: float = 5.0
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        check_target(self.target)
        if not 0 < self.timeout <= MAX_DEADLINE_S:  # NaN fails too
            raise ValueError(
                f"expected --timeout > 0 seconds, at most {MAX_DEADLINE_S:g} (gRPC's deadlines "
                f"end in 2262), got {self.timeout}; pass e.g. 5"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "expected --tls-cert and --tls-key together, got only one; pass both for mutual TLS"
            )
        if self.tls_server_name is not None and self.tls_ca is None:
            raise ValueError(
                "expected --tls-ca with --tls-server-name, got a server name for a plaintext "
                "probe; pass the CA that signed the server's certificate, or drop the name"
            )
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError(
                "expected --tls-ca with --tls-cert, got a client certificate without a CA; "
                "pass the CA that signed the server's certificate"
            )


def open_channel(config: ProbeConfig) -> grpc.Channel:
    """A plaintext channel, or a TLS one when a CA is given (with a client cert for mTLS);
    ValueError naming the flag when a file cannot be read, the CA holds no PEM certificates or
    the client key is not the client certificate's."""
    if config.tls_ca is None:
        return grpc.insecure_channel(config.target)
    root_certificates = read_file(config.tls_ca, "PEM CA certificate", "--tls-ca")
    # gRPC would log native errors for files it cannot load, then report the server unreachable.
    check_certificates(
        config.tls_ca, "--tls-ca", "pass the CA that signed the server's certificate"
    )
    private_key, certificate_chain = key_pair(
        config.tls_cert, config.tls_key, "--tls-cert", "--tls-key"
    ) or (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )
    options = []
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return grpc.secure_channel(config.target, credentials, options=options)


def probe(config: ProbeConfig) -> tuple[int, str]:
    """The exit code and the one-line message for one health check."""
    what = f"model {config.service!r}" if config.service else "server"
    with open_channel(config) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=config.service), timeout=config.timeout
            )
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
            if code == grpc.StatusCode.NOT_FOUND:
                if details:  # ours says what to ask for (``unknown_service``)
                    return EXIT_NOT_SERVING, (
                        f"UNKNOWN: {what} is not served at {config.target}: {details}"
                    )
                # The standard health servicer answers NOT_FOUND without details.
                return EXIT_NOT_SERVING, (
                    f"UNKNOWN: {what} is not served at {config.target} (its health service "
                    f"knows no such name); check the model name: {_MODEL_NAMES}"
                )
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return EXIT_NOT_SERVING, (
                    f"UNREACHABLE: {config.target} did not answer within {config.timeout:g}s; "
                    "check the address and port, or raise --timeout"
                )
            if code == grpc.StatusCode.UNAVAILABLE:
                return EXIT_NOT_SERVING, (
                    f"UNREACHABLE: {config.target} ({details}); "
                    "check the address, the port and the TLS flags"
                )
            return EXIT_NOT_SERVING, f"ERROR: {what} at {config.target}: {code.name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return (EXIT_SERVING if serving else EXIT_NOT_SERVING), f"{status}: {what} at {config.target}"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m serve.health``."""
    parser = argparse.ArgumentParser(
        prog="python -m serve.health",
        description="Check a server's gRPC health: exit 0 when SERVING, 1 otherwise.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("target", metavar="HOST:PORT", help="the server's gRPC address")
    parser.add_argument("--model", default="", help="check one model instead of the server")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM) for mutual TLS")
    parser.add_argument("--tls-server-name", help="name to verify in the server's certificate")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probe; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ProbeConfig(
            target=args.target,
            service=args.model,
            timeout=args.timeout,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
        )
        code, message = probe(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C while waiting: a traceback from inside gRPC
        print(f"error: interrupted before {args.target} answered", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(message, file=sys.stdout if code == EXIT_SERVING else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
