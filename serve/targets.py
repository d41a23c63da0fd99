"""The target check of the client library and of the command lines that connect to a server
(client, health, bench).

Kept apart from serve/client.py so that the health probe, run by container runtimes every few
seconds, does not import numpy and the protos to check its argument.
"""

from __future__ import annotations

# gRPC's address forms that are not HOST:PORT, each with its own rule (they fail at once when
# wrong), and any resolver's URI but dns's (xds:///NAME names no port).
_OTHER_SCHEMES = ("unix-abstract:", "vsock:", "ipv4:", "ipv6:")


def check_target(target: str) -> None:
    """Raise ValueError saying what to pass unless ``target`` names the server's port: HOST:PORT
    with a port in 1..65535 (IPv6 as ``[::1]:8001``), ``dns:[//AUTHORITY]/HOST:PORT``, a
    ``unix:PATH`` socket or another of gRPC's address forms (``unix-abstract:``, ``ipv4:``,
    ``ipv6:``, ``vsock:``, a resolver's URI such as ``xds:///NAME``).

    The one check of the client library and of the client, health and bench command lines:
    gRPC itself connects to port 443 when the port is left out (also of a bare IPv6 address,
    ``::1``) and wraps a port above 65535, where this server listens on 8001 by default.
    """
    if target.startswith("unix:"):
        if target == "unix:":
            raise ValueError(
                "expected unix:PATH, got 'unix:' without a path; pass e.g. unix:/run/serve.sock"
            )
        return
    if target.lower().startswith(("http://", "https://", "grpc://", "grpcs://")):
        # Triton's HTTP habit; gRPC would take it for a resolver's URI and fail to resolve it.
        address = target.partition("://")[2].partition("/")[0]
        try:
            check_target(address)
            example = address  # the URL's own HOST:PORT
        except ValueError:
            example = "localhost:8001"
        raise ValueError(
            f"expected HOST:PORT, got {target!r}, a URL: gRPC targets take no scheme; pass e.g. "
            f"{example}"
        )
    if target.startswith(_OTHER_SCHEMES) or ("://" in target and not target.startswith("dns:")):
        return
    if target.startswith("dns:"):
        address = target.removeprefix("dns:")
        if address.startswith("//"):  # dns://AUTHORITY/HOST:PORT, AUTHORITY often empty
            address = address[2:].partition("/")[2]
        try:
            check_target(address)
        except ValueError as e:
            raise ValueError(
                f"expected dns:///HOST:PORT, got {target!r}; pass the port too, e.g. "
                "dns:///localhost:8001 (IPv6 as dns:///[::1]:8001)"
            ) from e
        return
    if target.count(":") > 1 and not target.startswith("["):
        # "::1" is an address without a port for gRPC, "::1:8001" a name it cannot resolve.
        raise ValueError(
            f"expected HOST:PORT, got {target!r}, an IPv6 address without brackets; pass e.g. "
            "[::1]:8001"
        )
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
