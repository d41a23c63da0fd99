"""Transport security (TLS, mTLS) and bearer-token authentication for the gRPC server."""

from __future__ import annotations

import base64
import codecs
import hmac
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path

import grpc
from grpc import aio

_log = logging.getLogger(__name__)

Reject = Callable[[str, object], None]

# Probes and tooling must work without a token: kubelet's gRPC probe cannot send metadata.
# Health List is not a probe and would name every model, so it needs the token.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def read_file(path: Path, what: str, flag: str) -> bytes:
    """The bytes of ``path``; ValueError naming ``flag`` when it is unreadable or blank."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(
            f"expected a readable {what} file, got {str(path)!r} ({e.strerror}); "
            f"fix the path given to {flag}"
        ) from e
    if not data.strip():
        raise ValueError(
            f"expected a {what} in {str(path)!r}, got an empty file; fill it or fix {flag}"
        )
    return data


def _openssl_reason(error: ssl.SSLError) -> str:
    return re.sub(r" \(_ssl\.c:\d+\)$", "", str(error))


def _context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Security level 0: refuse only what cannot work. gRPC's own TLS (BoringSSL) serves 1024-bit
    # keys and SHA-1 chains; OpenSSL's default level would call those keys unparsable.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def check_certificates(path: Path, flag: str, hint: str) -> None:
    """Raise ValueError naming ``flag`` unless ``path`` holds PEM certificates OpenSSL loads.

    Text outside the BEGIN/END blocks (comments, "Bag Attributes") is allowed, as gRPC allows it.
    """
    try:
        _context().load_verify_locations(cafile=str(path))
    except ssl.SSLError as e:
        raise ValueError(
            f"expected PEM certificates (-----BEGIN CERTIFICATE-----) in {flag} {str(path)!r}, "
            f"got none that load ({_openssl_reason(e)}); {hint}"
        ) from e


# gRPC refuses a bad certificate, key or CA only when binding, as if the port were refused; so
# they are checked here first, with the same PEM parser (OpenSSL) behind Python's ssl module.
def _check_pair(
    cert: Path, key: Path, cert_pem: bytes, key_pem: bytes, cert_flag: str, key_flag: str
) -> None:
    check_certificates(cert, cert_flag, f"pass the certificate (chain) to {cert_flag}")
    if b"ENCRYPTED" in key_pem:
        raise ValueError(
            f"expected an unencrypted private key in {str(key)!r}, got an encrypted one; "
            f"decrypt it (openssl pkey -in KEY -out PLAIN.key) and pass that to {key_flag}"
        )
    try:
        # A password callback, so OpenSSL never prompts on the terminal.
        _context().load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" not in str(e):
            raise ValueError(
                f"expected a valid PEM private key in {str(key)!r}, got one OpenSSL cannot load "
                f"({_openssl_reason(e)}); pass the certificate's unencrypted key to {key_flag}"
            ) from e
        if cert_pem.count(b"-----BEGIN CERTIFICATE-----") > 1:
            # OpenSSL pairs the key with the file's first certificate: a chain written CA first
            # (cat ca.pem server.pem) is refused although its key is the right one.
            raise ValueError(
                f"expected the private key of the first certificate in {cert_flag} "
                f"{str(cert)!r}, got the key of another pair in {str(key)!r}; put the "
                "certificate made with that key first in the file (then its intermediates), "
                f"or pass the key of the first certificate to {key_flag}"
            ) from e
        raise ValueError(
            f"expected the private key of the certificate {str(cert)!r}, got the key of "
            f"another pair in {str(key)!r}; pass the key made with that certificate to "
            f"{key_flag}"
        ) from e


# Dates are read from the DER bytes by hand: Python's ssl module decodes only a peer's or a
# CA's certificate, and the `cryptography` package is not in a serving install.
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL
)
_UTC_TIME, _GENERALIZED_TIME, _EXPLICIT_VERSION = 0x17, 0x18, 0xA0


def _der_item(der: bytes, at: int) -> tuple[int, int, int]:
    """The tag, content start and content end of the DER item at offset ``at``."""
    tag, length, start = der[at], der[at + 1], at + 2
    if length & 0x80:  # long form: the low bits count the length's bytes
        count = length & 0x7F
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > len(der):
        raise ValueError("a DER item runs past the end")
    return tag, start, start + length


def _der_time(tag: int, value: bytes) -> datetime:
    text = value.decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; RFC 5280: years 50-99 are 19YY, the rest 20YY
        text = f"{19 if int(text[:2]) >= 50 else 20}{text}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError(f"expected a UTCTime or GeneralizedTime, got tag {tag:#x}")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)


def validity(der: bytes) -> tuple[datetime, datetime]:
    """notBefore and notAfter of the DER X.509 certificate ``der``; ValueError or IndexError
    when it is not one (RFC 5280, 4.1: validity is TBSCertificate's fifth field, after the
    optional [0] version, serialNumber, signature and issuer)."""
    _, tbs, _ = _der_item(der, _der_item(der, 0)[1])
    tag, _, end = _der_item(der, tbs)
    at = end if tag == _EXPLICIT_VERSION else tbs
    for _ in range(3):  # serialNumber, signature, issuer
        at = _der_item(der, at)[2]
    _, at, _ = _der_item(der, at)
    tag, start, end = _der_item(der, at)
    not_before = _der_time(tag, der[start:end])
    tag, start, end = _der_item(der, end)
    return not_before, _der_time(tag, der[start:end])


def warn_if_out_of_date(path: Path, pem: bytes, flag: str, now: datetime | None = None) -> None:
    """Log one warning when a certificate in ``pem`` (the file ``path`` given as ``flag``)
    has expired or is not valid yet: gRPC serves it all the same, and clients refuse it (the
    server refuses the client certificates a ``--tls-client-ca`` signed)."""
    now = now or datetime.now(timezone.utc)
    refused = (
        "TLS clients will refuse it"
        if flag == "--tls-cert"
        else "the server will refuse the client certificates it signed"
    )
    blocks = _PEM_CERTIFICATE.findall(pem)
    for position, block in enumerate(blocks, 1):
        try:
            not_before, not_after = validity(base64.b64decode(block))
        except (ValueError, IndexError):  # OpenSSL loaded it: not expected, and not fatal
            _log.debug("certificate %d in %s: validity dates unreadable", position, path)
            continue
        which = f"certificate {position} of {len(blocks)} in" if len(blocks) > 1 else "certificate"
        if now > not_after:
            _log.warning(
                "%s %s %r expired on %s UTC (notAfter): %s; renew it and restart the server",
                flag, which, str(path), not_after.strftime("%Y-%m-%d %H:%M:%S"), refused,
            )  # fmt: skip
        elif now < not_before:
            _log.warning(
                "%s %s %r is not valid before %s UTC (notBefore; notAfter %s): %s until "
                "then; check this host's clock or the certificate's dates",
                flag, which, str(path), not_before.strftime("%Y-%m-%d %H:%M:%S"),
                not_after.strftime("%Y-%m-%d %H:%M:%S"), refused,
            )  # fmt: skip
        else:
            continue
        return


def check_client_certificate_flags(ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """ValueError unless ``--cert``/``--key`` come with ``--ca``: a client certificate needs TLS
    (the command lines of serve.client and serve.bench)."""
    if (cert is not None or key is not None) and ca is None:
        raise ValueError(
            "expected --ca with --cert and --key, got a client certificate without a CA; "
            "pass the CA that signed the server's certificate"
        )


def key_pair(
    cert: Path | None, key: Path | None, cert_flag: str, key_flag: str
) -> tuple[bytes, bytes] | None:
    """The PEM private key and certificate chain given as ``key_flag`` and ``cert_flag``, checked
    by OpenSSL to be one pair; None when neither is given. ValueError naming the flag to fix."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = (cert_flag, key_flag) if key is None else (key_flag, cert_flag)
        raise ValueError(
            f"expected {given} and {missing} together, got only {given}; pass {missing}"
        )
    cert_pem = read_file(cert, "PEM certificate", cert_flag)
    key_pem = read_file(key, "PEM private key", key_flag)
    if b"PRIVATE KEY-----" not in key_pem:
        raise ValueError(
            f"expected a PEM private key in {str(key)!r}, got something else; "
            f"pass the unencrypted key (-----BEGIN ... PRIVATE KEY-----) to {key_flag}"
        )
    _check_pair(cert, key, cert_pem, key_pem, cert_flag, key_flag)
    return key_pem, cert_pem


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for a plaintext port.

    ``cert`` and ``key`` are PEM files (the certificate may be a chain); with ``client_ca`` the
    server also requires client certificates signed by that CA (mutual TLS).
    Raises ValueError with a message that says which flag to fix.
    """
    pair = key_pair(cert, key, "--tls-cert", "--tls-key")
    if pair is None:
        if client_ca is not None:
            raise ValueError(
                "expected --tls-cert and --tls-key with --tls-client-ca, got only the client CA; "
                "mutual TLS needs the server's own certificate and key too"
            )
        return None
    key_pem, cert_pem = pair
    warn_if_out_of_date(cert, cert_pem, "--tls-cert")
    ca_pem = None
    if client_ca is not None:
        ca_pem = read_file(client_ca, "PEM CA certificate", "--tls-client-ca")
        check_certificates(
            client_ca, "--tls-client-ca", "pass the CA that signs client certificates"
        )
        warn_if_out_of_date(client_ca, ca_pem, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=ca_pem,
        require_client_auth=ca_pem is not None,
    )


# What Notepad and PowerShell write before the text: UTF-8's mark, UTF-16's either way round.
_BYTE_ORDER_MARKS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def read_token(token_file: Path, flag: str = "--auth-token-file") -> str:
    """The bearer token in ``token_file`` (given as ``flag``), stripped of surrounding
    whitespace; ValueError unless it is one word of printable ASCII, all that gRPC metadata
    and a ``Bearer`` header can carry. Server and client read their token files with this."""
    raw = read_file(token_file, "bearer token", flag)
    if raw.startswith(_BYTE_ORDER_MARKS):
        raise ValueError(
            f"expected a token of printable ASCII in {flag} {str(token_file)!r}, got a "
            "non-ASCII byte at offset 0, a byte order mark (the file was saved as UTF-16 or as "
            "UTF-8 with BOM, as Windows PowerShell's > does); save the token as plain ASCII"
        )
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"expected a token of printable ASCII in {flag} {str(token_file)!r}, got a "
            f"non-ASCII byte at offset {e.start}; gRPC metadata carries ASCII only"
        ) from e
    scheme, space, rest = token.partition(" ")
    if space and scheme.lower() == "bearer" and rest.strip():
        raise ValueError(
            f"expected the token alone in {flag} {str(token_file)!r}, got it after 'Bearer '; "
            "leave out 'Bearer ': it is added to the token when it is sent"
        )
    found = first_unsendable(token)
    if found is not None:
        offset, char = found
        raise ValueError(
            f"expected one token of printable ASCII without spaces in {flag} "
            f"{str(token_file)!r}, got {char!r} at offset {offset}; put a single token on "
            "one line"
        )
    return token


def first_unsendable(token: str) -> tuple[int, str] | None:
    """The offset and character of the first character in ``token`` that a ``Bearer`` header
    cannot carry (anything but printable ASCII without spaces); None when there is none."""
    for offset, char in enumerate(token):
        if not "!" <= char <= "~":
            return offset, char
    return None


def check_bearer(metadata: object, token: str) -> str | None:
    """None when ``metadata`` holds ``authorization: Bearer <token>``, else why not."""
    values = [value for key, value in (metadata or ()) if key.lower() == "authorization"]
    if not values:
        return (
            "expected metadata 'authorization: Bearer <token>', got no authorization; "
            "send the server's token (the contents of its --auth-token-file)"
        )
    expected = token.encode()
    for value in values:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        scheme, _, given = text.strip().partition(" ")
        # compare_digest keeps the comparison time independent of where the tokens differ.
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
            return None
    return (
        "expected metadata 'authorization: Bearer <token>' with the server's token, got a wrong "
        "token or scheme; send the contents of the server's --auth-token-file"
    )


def _deny(
    handler: grpc.RpcMethodHandler, method: str, message: str, on_reject: Reject | None
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""

    async def abort(request: object, context: aio.ServicerContext) -> None:
        _log.info("unauthenticated call to %s from %s: %s", method, context.peer(), message)
        if on_reject is not None:
            # Streaming calls get None: their requests are never read.
            unary = not handler.request_streaming
            on_reject(method, request if unary else None)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **serializers)
    return grpc.unary_unary_rpc_method_handler(abort, **serializers)


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Rejects calls without the right bearer token, except health checks and reflection."""

    def __init__(self, token: str, on_reject: Reject | None = None) -> None:
        if not token:
            raise ValueError("expected a non-empty bearer token, got an empty one; set a token")
        self._token = token
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        problem = check_bearer(handler_call_details.invocation_metadata, self._token)
        if problem is None:
            return handler
        return _deny(handler, method, problem, self._on_reject)


def auth_interceptor(
    token_file: Path | None, *, on_reject: Reject | None = None
) -> aio.ServerInterceptor | None:
    """An interceptor requiring the bearer token stored in ``token_file``; None without one.

    ``on_reject(method, request)`` is called for every refused call (``request`` is None for
    client-streaming methods), e.g. to count it in the metrics.
    """
    if token_file is None:
        return None
    return BearerTokenInterceptor(read_token(token_file), on_reject)
