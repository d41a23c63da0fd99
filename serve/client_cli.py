"""``python -m serve.client HOST:PORT --model NAME IMAGE ... [--top-k 5]``: classify files.

The images go in calls of at most ``_CALL_IMAGES`` images and ``_CALL_BYTES`` bytes (a bigger
file alone), read only when their call is sent, so a folder of photos needs neither one huge
message nor the memory for all of it. A call the server refuses as too large or as too many
rows is split in half; an image the server refuses is reported by its path and the others are
still classified.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from serve.cli_help import DefaultsFormatter, reader_gone
from serve.client import MAX_TOP_K, Client, ClientError
from serve.security import (
    check_certificates,
    check_client_certificate_flags,
    key_pair,
    read_file,
    read_token,
)
from serve.targets import check_target

_CALL_BYTES = 4 << 20
_CALL_IMAGES = 64
_IMAGE_INDEX = re.compile(r"\bimage (\d+)\b")  # how the server's messages name a bad image
# How the server refuses a call with more images than one request may hold.
_TOO_MANY = ("rows per request", "encoded images per call")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m serve.client``."""
    parser = argparse.ArgumentParser(
        prog="python -m serve.client",
        description="Classify images with a running server.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("target", metavar="HOST:PORT", help="the server's gRPC address")
    parser.add_argument("--model", required=True, help="the model's name on the server")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                        help="image files (PNG, JPEG, GIF, BMP, WebP); - reads one from stdin")
    parser.add_argument("--top-k", type=int, default=5, help="labels printed per image")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--token-file", type=Path, help="bearer token (servers with auth)")
    parser.add_argument("--ca", type=Path, help="PEM CA certificate: connect with TLS")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--key", type=Path, help="client private key (PEM) for mutual TLS")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_target(args.target)
    except ValueError as e:
        parser.error(str(e))
    if not 1 <= args.top_k <= MAX_TOP_K:
        parser.error(f"expected 1 <= --top-k <= {MAX_TOP_K}, got {args.top_k}; pass e.g. 5")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"expected --timeout > 0 seconds, got {args.timeout:g}; pass e.g. 30")
    try:
        check_client_certificate_flags(args.ca, args.cert, args.key)
    except ValueError as e:
        parser.error(str(e))
    return args


@dataclass(frozen=True)
class _Input:
    """One IMAGE argument: a file read when its call is sent, or the bytes of stdin ("-") or
    of a pipe, read at once."""

    path: Path
    size: int
    data: bytes | None = None

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


def _inputs(paths: list[Path]) -> list[_Input]:
    """Every IMAGE checked to be a readable file (OSError otherwise) before any connection."""
    stdin: bytes | None = None
    inputs = []
    for path in paths:
        if str(path) == "-":
            stdin = _stdin() if stdin is None else stdin
            inputs.append(_Input(path, len(stdin), stdin))
            continue
        with path.open("rb") as file:
            info = os.fstat(file.fileno())
            if stat.S_ISREG(info.st_mode):
                inputs.append(_Input(path, info.st_size))
            else:  # a pipe gives its bytes once, to the reader that is open now
                data = file.read()
                inputs.append(_Input(path, len(data), data))
    return inputs


def _stdin() -> bytes:
    """The bytes of stdin for "-"; ValueError when there is none to read: closed (``<&-``),
    where ``sys.stdin`` is None, or a terminal, where the read waited for input unannounced."""
    if sys.stdin is None or sys.stdin.isatty():
        got = "no stdin" if sys.stdin is None else "a terminal"
        raise ValueError(
            f"expected an image on stdin for IMAGE '-', got {got}; pipe one in "
            "(... - < cat.png) or pass the file's path"
        )
    return sys.stdin.buffer.read()


def _calls(inputs: list[_Input]) -> Iterator[list[_Input]]:
    call: list[_Input] = []
    size = 0
    for item in inputs:
        if call and (len(call) == _CALL_IMAGES or size + item.size > _CALL_BYTES):
            yield call
            call, size = [], 0
        call.append(item)
        size += item.size
    if call:
        yield call


def _too_large(error: ClientError) -> bool:
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message size limit" in str(error)


def _too_many(error: ClientError) -> bool:
    return error.code == grpc.StatusCode.INVALID_ARGUMENT and any(
        words in str(error) for words in _TOO_MANY
    )


def _bad_image(error: ClientError, count: int) -> int | None:
    """The image of a call of ``count`` that ``error`` is about alone, if it is."""
    if error.code == grpc.StatusCode.INVALID_ARGUMENT:
        found = _IMAGE_INDEX.search(str(error))
        if found is not None and int(found.group(1)) < count:
            return int(found.group(1))
    return 0 if count == 1 and _too_large(error) else None


def _classify_call(client: Client, args: argparse.Namespace, call: list[_Input]) -> bool:
    """Classify and print one call's images. False if any image failed (it is reported, the
    others are classified); ClientError for what is not one image's fault (no server, an
    unknown model)."""
    pending = []
    for item in call:
        try:
            pending.append((item, item.read()))
        except OSError as e:
            print(
                f"error: {item.path}: cannot read it ({e.strerror}); check the file",
                file=sys.stderr,
            )
    return _send(client, args, pending) and len(pending) == len(call)


def _send(client: Client, args: argparse.Namespace, pending: list[tuple[_Input, bytes]]) -> bool:
    if not pending:
        return True
    try:
        results = client.classify(args.model, [data for _, data in pending], args.top_k)
    except ClientError as e:
        # A server with a smaller --max-message-bytes or --max-queue-size, or a large model.
        if len(pending) > 1 and (_too_large(e) or _too_many(e)):
            half = len(pending) // 2
            first = _send(client, args, pending[:half])
            return _send(client, args, pending[half:]) and first
        bad = _bad_image(e, len(pending))
        if bad is None:
            raise
        print(f"error: {pending[bad][0].path}: {e}", file=sys.stderr)
        _send(client, args, pending[:bad] + pending[bad + 1 :])
        return False
    for (item, _), predictions in zip(pending, results, strict=True):
        print(item.path)
        for p in predictions:
            print(f"  {p.score:8.4f}  {p.index:4d}  {p.label}")
    return True


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A file name that is not UTF-8 (Python holds its bytes as surrogates) ended the run
        # in a UnicodeEncodeError traceback under a UTF-8 locale: print its bytes as they are.
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        code = _run(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # a reader gone shows here, not as a line of Python's at exit
    except KeyboardInterrupt:  # Ctrl-C: a traceback from inside gRPC said nothing more
        print("error: interrupted; the images printed above were classified", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): was a traceback
        return reader_gone()
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        inputs = _inputs(args.images)
        token = read_token(args.token_file, "--token-file") if args.token_file else None
        ca = None
        if args.ca is not None:
            check_certificates(args.ca, "--ca", "pass the CA that signed the server's --tls-cert")
            ca = read_file(args.ca, "PEM CA certificate", "--ca")
        key, chain = key_pair(args.cert, args.key, "--cert", "--key") or (None, None)
    except OSError as e:
        fix = (
            "pass the images in it (DIR/*)"
            if isinstance(e, IsADirectoryError)
            else "check the path"
        )
        message = f"expected a readable file, got {e.filename!r} ({e.strerror}); {fix}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except ValueError as e:  # no stdin for "-"; a token, CA or certificate that cannot work
        print(f"error: {e}", file=sys.stderr)
        return 2
    complete = True
    try:
        with Client(
            args.target,
            timeout=args.timeout,
            token=token,
            root_certificates=ca,
            private_key=key,
            certificate_chain=chain,
        ) as c:
            for call in _calls(inputs):
                complete = _classify_call(c, args, call) and complete
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
