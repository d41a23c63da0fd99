"""The HOST:PORT check of the command lines that connect to a server (client, health, bench).

Kept apart from serve/client.py so that the health probe, run by container runtimes every few
seconds, does not import numpy and the protos to check its argument.
"""

from __future__ import annotations


def check_target(target: str) -> None:
    """Raise ValueError saying what to pass unless ``target`` is HOST:PORT with a port in
    1..65535 (IPv6 as ``[::1]:8001``) or a ``unix:PATH`` socket.

    The one check of the client, health and bench command lines: gRPC itself connects to
    port 443 when the port is left out and wraps a port above 65535.
    """
    if target.startswith("unix:") and target != "unix:":
        return
    host, sep, port = target.rpartition(":")
    if not sep or target.endswith("]"):  # "HOST" or "[::1]": no port at all
        host, port = target, ""
    if not target.strip():
        got = "an empty target"
    elif not port:
        got = f"{target!r} without a port"
    elif not host:
        got = f"{target!r} without a host"
    elif not (port.isascii() and port.isdigit()):
        got = f"{target!r}, whose port is not a number"
    elif not 0 < int(port) < 65536:
        got = f"{target!r}, whose port is outside 1..65535"
    else:
        return
    example = f"{host.strip() or 'localhost'}:8001"
    raise ValueError(f"expected HOST:PORT, got {got}; pass e.g. {example}")
