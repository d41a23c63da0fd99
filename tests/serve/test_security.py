"""serve/security.py: TLS, mutual TLS and bearer tokens, on a small real grpc.aio server and on
the real `python -m serve`."""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import kserve_pb2
from serve.health import ProbeConfig, probe
from serve.security import auth_interceptor, check_bearer, read_token, server_credentials
from tests.serve.conftest import free_port, reference
from tests.serve.pki import Pki, make_pki
from tests.serve.procs import ServeProcess
from tests.serve.v2 import INFER, infer_payload, reply_logits, request_counts


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- server_credentials: refusals -----------------------------------------------------------


def test_no_certificate_means_plaintext() -> None:
    assert server_credentials(None, None, None) is None


def test_certificate_without_key_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="pass --tls-key"):
        server_credentials(pki.server_cert, None, None)
    with pytest.raises(ValueError, match="pass --tls-cert"):
        server_credentials(None, pki.server_key, None)


def test_client_ca_alone_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="--tls-client-ca"):
        server_credentials(None, None, pki.ca)


def test_unreadable_or_wrong_files_are_refused(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="readable PEM certificate"):
        server_credentials(tmp_path / "missing.pem", pki.server_key, None)
    with pytest.raises(ValueError, match="PEM private key"):
        server_credentials(pki.server_cert, pki.server_cert, None)
    with pytest.raises(ValueError, match="PEM certificate"):
        server_credentials(pki.server_key, pki.server_key, None)
    empty = tmp_path / "empty.pem"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty file"):
        server_credentials(pki.server_cert, pki.server_key, empty)


def _pem(path: Path, label: str, body: str) -> Path:
    path.write_text(f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
    return path


def test_bad_pem_contents_are_refused_before_binding(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key of another pair") as refused:
        server_credentials(pki.server_cert, pki.client_key, None)
    assert "--tls-key" in str(refused.value)
    garbage_cert = _pem(tmp_path / "cert.pem", "CERTIFICATE", "not base64 at all!")
    with pytest.raises(ValueError, match=r"--tls-cert .*got none that load"):
        server_credentials(garbage_cert, pki.server_key, None)
    garbage_key = _pem(tmp_path / "key.pem", "PRIVATE KEY", "AAAA")
    with pytest.raises(ValueError, match=r"OpenSSL cannot load.*--tls-key"):
        server_credentials(pki.server_cert, garbage_key, None)
    garbage_ca = _pem(tmp_path / "ca.pem", "CERTIFICATE", "AAAA")
    with pytest.raises(ValueError, match=r"--tls-client-ca .*got none that load"):
        server_credentials(pki.server_cert, pki.server_key, garbage_ca)
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ValueError, match="unencrypted"):  # and no password prompt
        server_credentials(pki.server_cert, encrypted, None)
    # A certificate chain still passes.
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.server_cert.read_bytes() + pki.ca.read_bytes())
    assert server_credentials(chain, pki.server_key, pki.ca) is not None


def test_what_grpc_serves_passes_the_pre_check(pki: Pki, tmp_path: Path) -> None:
    # Text outside the PEM blocks (an export tool's UTF-8 "Bag Attributes"), and a 1024-bit RSA
    # key, which OpenSSL's default security level refuses: gRPC serves both, so must the check.
    labelled = tmp_path / "labelled.pem"
    labelled.write_bytes(
        "Bag Attributes\n    friendlyName: Zertifikat für Server\n".encode()
        + pki.server_cert.read_bytes()
    )
    assert server_credentials(labelled, pki.server_key, labelled) is not None
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    weak = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "weak.pem").write_bytes(weak.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "weak.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert server_credentials(tmp_path / "weak.pem", tmp_path / "weak.key", None) is not None


# --- tokens ---------------------------------------------------------------------------------


def test_token_file_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret-token\n")
    assert read_token(path) == "s3cret-token"


@pytest.mark.parametrize("text", ["", "\n", "two words\n", "pässwort\n"])  # not ASCII: no metadata
def test_bad_token_files_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "token"
    path.write_text(text)
    with pytest.raises(ValueError, match="token"):
        read_token(path)


@pytest.mark.parametrize(
    ("content", "advice"),
    [
        ("s3cret\r\n".encode("utf-16"), "byte order mark"),  # PowerShell 5's `echo s3cret > f`
        ("\ufeffs3cret\r\n".encode(), "byte order mark"),  # Notepad's "UTF-8 with BOM"
        (b"Bearer s3cret\n", "leave out 'Bearer '"),  # the header's value, not the token
    ],
)
def test_token_file_mistakes_are_named(tmp_path: Path, content: bytes, advice: str) -> None:
    """These used to be "a non-ASCII byte at offset 0" and "' ' at offset 6"."""
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=advice) as refused:
        read_token(path, "--token-file")
    assert "--token-file" in str(refused.value) and "s3cret" not in str(refused.value)


def test_missing_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--auth-token-file"):
        auth_interceptor(tmp_path / "nope")
    assert auth_interceptor(None) is None


def test_check_bearer() -> None:
    assert check_bearer((("authorization", "Bearer abc"),), "abc") is None
    assert check_bearer((("authorization", "bearer abc"),), "abc") is None
    assert check_bearer((("x", "y"), ("authorization", "Bearer abd")), "abc") is not None
    assert check_bearer((("authorization", "Basic abc"),), "abc") is not None
    assert check_bearer((("authorization", "Bearer abcd"),), "abc") is not None
    assert "no authorization" in (check_bearer((), "abc") or "")


# --- a small real grpc.aio server: every handler kind -----------------------------------------

_IDENTITY = {"request_deserializer": None, "response_serializer": None}


async def _unary_unary(request: bytes, _context: aio.ServicerContext) -> bytes:
    return b"uu:" + request


async def _unary_stream(request: bytes, _context: aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(2):
        yield b"us%d:" % i + request


async def _stream_unary(requests: AsyncIterator[bytes], _context: aio.ServicerContext) -> bytes:
    return b"su:" + b"".join([r async for r in requests])


async def _stream_stream(
    requests: AsyncIterator[bytes], _context: aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for r in requests:
        yield b"ss:" + r


def _echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "UU": grpc.unary_unary_rpc_method_handler(_unary_unary, **_IDENTITY),
            "US": grpc.unary_stream_rpc_method_handler(_unary_stream, **_IDENTITY),
            "SU": grpc.stream_unary_rpc_method_handler(_stream_unary, **_IDENTITY),
            "SS": grpc.stream_stream_rpc_method_handler(_stream_stream, **_IDENTITY),
        },
    )


async def _start(
    token_file: Path | None,
    credentials: grpc.ServerCredentials | None,
    rejected: list[tuple[str, object]] | None = None,
) -> tuple[aio.Server, int]:
    on_reject = None if rejected is None else (lambda m, r: rejected.append((m, r)))
    interceptor = auth_interceptor(token_file, on_reject=on_reject)
    server = aio.server(interceptors=[interceptor] if interceptor else None)
    server.add_generic_rpc_handlers((_echo_handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


async def _call_all(
    channel: aio.Channel, metadata: tuple[tuple[str, str], ...], stream: bool = True
) -> list[object]:
    """The four handler kinds' answers, or the status code each failed with.

    ``stream=False`` sends empty request streams: a client still writing when the server
    aborts sometimes reports INTERNAL ("Internal error from Core") instead of the server's
    status, in grpc.aio itself, with or without an interceptor.
    """
    requests = _two if stream else _none
    calls = [
        channel.unary_unary("/test.Echo/UU")(b"a", metadata=metadata, timeout=10),
        _collect(channel.unary_stream("/test.Echo/US")(b"b", metadata=metadata, timeout=10)),
        channel.stream_unary("/test.Echo/SU")(requests(), metadata=metadata, timeout=10),
        _collect(channel.stream_stream("/test.Echo/SS")(requests(), metadata=metadata, timeout=10)),
    ]
    results: list[object] = []
    for call in calls:
        try:
            results.append(await call)
        except aio.AioRpcError as e:
            results.append(e.code())
    return results


async def _two() -> AsyncIterator[bytes]:
    yield b"x"
    yield b"y"


async def _none() -> AsyncIterator[bytes]:
    return
    yield b""


async def _collect(call: aio.UnaryStreamCall | aio.StreamStreamCall) -> list[bytes]:
    return [r async for r in call]


_ANSWERS = [b"uu:a", [b"us0:b", b"us1:b"], b"su:xy", [b"ss:x", b"ss:y"]]


def test_token_guards_every_handler_kind_but_not_health(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("right-token\n")

    rejected: list[tuple[str, object]] = []

    async def scenario() -> None:
        server, port = await _start(token_file, None, rejected)
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unauth = [grpc.StatusCode.UNAUTHENTICATED] * 4
                assert await _call_all(channel, (), stream=False) == unauth
                assert sorted(rejected, key=str) == sorted(
                    [
                        ("/test.Echo/UU", b"a"),
                        ("/test.Echo/US", b"b"),
                        ("/test.Echo/SU", None),
                        ("/test.Echo/SS", None),
                    ],
                    key=str,
                )
                wrong = (("authorization", "Bearer wrong"),)
                assert await _call_all(channel, wrong, stream=False) == unauth
                good = (("authorization", "Bearer right-token"),)
                assert await _call_all(channel, good) == _ANSWERS
                try:
                    await channel.unary_unary("/test.Echo/UU")(b"a", timeout=10)
                except aio.AioRpcError as e:
                    assert "authorization: Bearer <token>" in (e.details() or "")
                else:
                    pytest.fail("a call without a token was answered")
                stub = health_pb2_grpc.HealthStub(channel)
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_no_token_file_lets_everything_through() -> None:
    async def scenario() -> None:
        server, port = await _start(None, None)
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await _call_all(channel, ()) == _ANSWERS
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def _tls_channel(port: int, ca: Path, cert: Path | None = None, key: Path | None = None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return aio.secure_channel(f"127.0.0.1:{port}", creds)


def test_tls_and_mutual_tls(pki: Pki) -> None:
    async def scenario() -> None:
        creds = server_credentials(pki.server_cert, pki.server_key, None)
        server, port = await _start(None, creds)
        try:
            async with _tls_channel(port, pki.ca) as channel:
                assert await _call_all(channel, ()) == _ANSWERS
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await _call_all(channel, ()) == [grpc.StatusCode.UNAVAILABLE] * 4
            async with _tls_channel(port, pki.other_ca) as channel:
                assert await _call_all(channel, ()) == [grpc.StatusCode.UNAVAILABLE] * 4
        finally:
            await server.stop(None)

        creds = server_credentials(pki.server_cert, pki.server_key, pki.ca)
        server, port = await _start(None, creds)
        try:
            async with _tls_channel(port, pki.ca, pki.client_cert, pki.client_key) as channel:
                assert await _call_all(channel, ()) == _ANSWERS
            async with _tls_channel(port, pki.ca) as channel:
                assert await _call_all(channel, ()) == [grpc.StatusCode.UNAVAILABLE] * 4
        finally:
            await server.stop(None)

    asyncio.run(scenario())


# --- the real server: python -m serve's Server with TLS, mTLS and a token ---------------------

def _sync_call(
    channel: grpc.Channel, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> bytes | grpc.StatusCode:
    try:
        return channel.unary_unary(INFER)(payload, metadata=metadata, timeout=15)
    except grpc.RpcError as e:
        return e.code()


def _assert_answer(got: object, model: Path, batch: np.ndarray) -> None:
    assert isinstance(got, bytes), got
    np.testing.assert_allclose(reply_logits(got)[1], reference(model, batch), atol=1e-5)


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=15).status


def _sync_tls(port: int, pki: Pki, client_cert: bool) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


@pytest.fixture
def batch() -> np.ndarray:
    return np.random.default_rng(7).normal(size=(2, 3, 8, 8)).astype(np.float32)


def test_server_over_tls(start_server, classifier_path: Path, pki: Pki, batch) -> None:
    bg = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with _sync_tls(bg.port, pki, client_cert=False) as channel:
        got = _sync_call(channel, infer_payload("tiny", batch))
        _assert_answer(got, classifier_path, batch)
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        assert _sync_call(channel, infer_payload("tiny", batch)) == grpc.StatusCode.UNAVAILABLE
    code, message = probe(ProbeConfig(f"127.0.0.1:{bg.port}", tls_ca=pki.ca, timeout=10))
    assert (code, message.split(":")[0]) == (0, "SERVING")
    assert probe(ProbeConfig(f"127.0.0.1:{bg.port}", timeout=5))[0] == 1


def test_server_with_mutual_tls(start_server, classifier_path: Path, pki: Pki, batch) -> None:
    bg = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    with _sync_tls(bg.port, pki, client_cert=True) as channel:
        got = _sync_call(channel, infer_payload("tiny", batch))
        _assert_answer(got, classifier_path, batch)
    with _sync_tls(bg.port, pki, client_cert=False) as channel:
        assert _sync_call(channel, infer_payload("tiny", batch)) == grpc.StatusCode.UNAVAILABLE
    target = f"127.0.0.1:{bg.port}"
    mtls = ProbeConfig(target, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    assert probe(mtls)[0] == 0
    assert probe(ProbeConfig(target, tls_ca=pki.ca, timeout=5))[0] == 1


def test_server_with_token(start_server, classifier_path: Path, tmp_path: Path, batch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-for-tests\n")
    bg = start_server(auth_token_file=token_file)
    payload = infer_payload("tiny", batch)
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        assert _sync_call(channel, payload) == grpc.StatusCode.UNAUTHENTICATED
        wrong = (("authorization", "Bearer t0ken-for-test"),)
        assert _sync_call(channel, payload, wrong) == grpc.StatusCode.UNAUTHENTICATED
        unknown = infer_payload("nope", batch)
        assert _sync_call(channel, unknown) == grpc.StatusCode.UNAUTHENTICATED
        right = (("authorization", "Bearer t0ken-for-tests"),)
        got = _sync_call(channel, payload, right)
        _assert_answer(got, classifier_path, batch)
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        # Metadata calls are guarded too; only health and reflection are open.
        metadata = channel.unary_unary("/inference.GRPCInferenceService/ServerMetadata")
        with pytest.raises(grpc.RpcError) as info:
            metadata(kserve_pb2.ServerMetadataRequest().SerializeToString(), timeout=15)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in (info.value.details() or "")
        # Health List is no probe, and would name every model to anyone.
        listing = health_pb2_grpc.HealthStub(channel).List
        with pytest.raises(grpc.RpcError) as info:
            listing(health_pb2.HealthListRequest(), timeout=15)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = listing(health_pb2.HealthListRequest(), metadata=right, timeout=15)
        assert set(listed.statuses) == {"", "tiny"}
    counts = request_counts(bg.server.metrics.render().decode())
    assert counts[("tiny", "unauthenticated")] == 2
    assert counts[("_unknown", "unauthenticated")] == 1
    assert counts[("tiny", "success")] == 1


def test_cli_refuses_half_tls_config(classifier_path: Path, pki: Pki) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serve", str(classifier_path), "--port", "0",
         "--metrics-port", "0", "--tls-cert", str(pki.server_cert)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "--tls-key" in done.stderr and "Traceback" not in done.stderr


def test_cli_refuses_a_key_of_another_pair_as_bad_input(classifier_path: Path, pki: Pki) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serve", str(classifier_path), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--device", "cpu",
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "key of another pair" in done.stderr and "--tls-key" in done.stderr
    assert "Traceback" not in done.stderr and "refused (in use" not in done.stderr


def test_plaintext_connections_to_a_tls_port_do_not_flood_the_log(
    classifier_path: Path, pki: Pki, tmp_path: Path
) -> None:
    """gRPC's C core logged an INFO "Handshake failed" line, outside --log-format json, for
    every plaintext connection to a TLS port: a flood any scanner could cause."""
    port = free_port()
    args = [str(classifier_path), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--device", "cpu", "--log-format", "json",
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]  # fmt: skip
    # The server's own default is under test: not one the environment sets.
    with ServeProcess(
        args, port, tmp_path / "serve.log", ready_line='"ready: serving', unset=("GRPC_VERBOSITY",)
    ) as server:
        for _ in range(3):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(
                grpc.RpcError
            ):
                channel.unary_unary(INFER)(b"", timeout=5)
        server.terminate()
        assert server.wait(60) == 0
        output = server.output()
    lines = output.splitlines()
    assert lines and all(json.loads(line)["msg"] for line in lines), lines


def test_a_chain_written_ca_first_says_to_put_the_certificate_first(
    pki: Pki, tmp_path: Path
) -> None:
    """OpenSSL pairs the key with a chain file's first certificate; with the CA written first,
    the message used to call the right key "the key of another pair"."""
    reversed_chain = tmp_path / "chain.pem"
    reversed_chain.write_bytes(pki.ca.read_bytes() + pki.server_cert.read_bytes())
    with pytest.raises(ValueError, match="first certificate") as refused:
        server_credentials(reversed_chain, pki.server_key, None)
    assert "put the certificate made with that key first" in str(refused.value)
    assert "--tls-cert" in str(refused.value) and "--tls-key" in str(refused.value)
    # One certificate of another pair keeps its own message.
    with pytest.raises(ValueError, match="pass the key made with that certificate"):
        server_credentials(pki.ca, pki.server_key, None)
