"""Small server-side messages a client acts on: health Check of an unknown name, the
classification parameter, bytes that do not parse, ModelStatistics' version, and certificates
out of their validity dates (serve/health.py, serve/kserve*.py, serve/wire.py, serve/security.py).
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protos import kserve_pb2 as pb
from serve import security
from serve.background import BackgroundServer
from serve.health import ProbeConfig, probe
from serve.security import server_credentials
from tests.serve.v2 import INFER

STATISTICS = "/inference.GRPCInferenceService/ModelStatistics"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
CLASSIFY = "/classifier.v1.Classifier/Classify"
GARBAGE = b"\xff\xff\xff\x01not a protobuf"
UTC = datetime.timezone.utc


def _call(channel: grpc.Channel, method: str, request: object) -> grpc.RpcError:
    data = request if isinstance(request, bytes) else request.SerializeToString()
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(method)(data, timeout=10)
    return caught.value


def test_health_check_of_an_unknown_name_says_what_to_ask_for(
    shared_server: BackgroundServer,
) -> None:
    target = f"127.0.0.1:{shared_server.port}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(service="tiny.onnx"), timeout=10)
        # NOT_FOUND is the health protocol's answer; the stock servicer's message was empty.
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        details = caught.value.details() or ""
        assert "got 'tiny.onnx'" in details and "'' (the whole server)" in details, details
        assert "stem" in details and "health List" in details, details
        # Check takes no token: it names no served model.
        assert "'tiny'" not in details, details
        # The names it does know still answer.
        serving = health_pb2.HealthCheckResponse.SERVING
        assert stub.Check(health_pb2.HealthCheckRequest(service="tiny"), timeout=10).status == (
            serving
        )
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
    code, message = probe(ProbeConfig(target, service="tiny.onnx"))
    assert code == 1 and message.startswith("UNKNOWN: model 'tiny.onnx' is not served"), message
    assert message.count("stem") == 1 and "\n" not in message, message


def test_a_long_unknown_health_name_is_shown_cut(shared_server: BackgroundServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(service="s" * 20000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "(20002 characters)" in (caught.value.details() or "")


def _classification_request(**value: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(np.zeros((1, 3, 8, 8), "<f4").tobytes())
    output = request.outputs.add(name="logits")
    parameter = output.parameters["classification"]
    parameter.SetInParent()
    for field, given in value.items():
        setattr(parameter, field, given)
    return request


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ({}, "got the parameter without a value"),
        ({"string_param": "3"}, "got string_param '3'"),
        ({"int64_param": 0}, "got int64_param 0"),
    ],
)
def test_a_classification_parameter_without_a_count_says_what_to_send(
    shared_server: BackgroundServer, value: dict[str, object], got: str
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        error = _call(channel, INFER, _classification_request(**value))
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert got in details and "None" not in details, details
    assert "int64_param" in details and "class_count=5" in details, details


def test_bytes_that_do_not_parse_name_the_message_as_clients_know_it(
    shared_server: BackgroundServer,
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        for method, wire_name in (
            (INFER, "inference.ModelInferRequest"),
            (STATISTICS, "inference.ModelStatisticsRequest"),
            (CLASSIFY, "classifier.v1.ClassifyRequest"),
        ):
            error = _call(channel, method, GARBAGE)
            details = error.details() or ""
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            # Our private package (kserve.v2) is in no client's .proto.
            assert "kserve.v2" not in details and "Error parsing" not in details, details
            assert f"grpcurl describe {wire_name}`" in details, details
            # The message cited is one that the server's reflection describes.
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            assert pool.FindMessageTypeByName(wire_name).full_name == wire_name
        (reply,) = list(channel.stream_stream(STREAM)(iter([GARBAGE]), timeout=10))
    message = pb.ModelStreamInferResponse.FromString(reply).error_message
    assert "inference.ModelInferRequest" in message and "kserve.v2" not in message, message


def test_statistics_of_every_model_at_a_version_not_served_is_not_found(
    shared_server: BackgroundServer,
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        error = _call(channel, STATISTICS, pb.ModelStatisticsRequest(name="", version="2"))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        details = error.details() or ""
        assert "got '2'" in details and "leave the version empty" in details, details
        # As for a named model: a version not served is NOT_FOUND there too.
        named = _call(channel, STATISTICS, pb.ModelStatisticsRequest(name="tiny", version="2"))
        assert named.code() == grpc.StatusCode.NOT_FOUND
        statistics = channel.unary_unary(
            STATISTICS,
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )
        for version in ("", "1", "01"):
            answer = statistics(pb.ModelStatisticsRequest(version=version), timeout=10)
            assert [s.name for s in answer.model_stats] == ["tiny"], version


def _self_signed(
    directory: Path, not_before: datetime.datetime, not_after: datetime.datetime
) -> tuple[Path, Path]:
    """A localhost certificate valid from ``not_before`` to ``not_after``, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    stem = f"cert-{not_before:%Y%m%d}-{not_after:%Y%m%d}"
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        # UTCTime both (years 1950-2049), 19YY and 20YY; GeneralizedTime from 2050.
        (datetime.datetime(1999, 12, 31, 23, 59, 58), datetime.datetime(2001, 2, 3, 4, 5, 6)),
        (datetime.datetime(2030, 1, 1), datetime.datetime(2049, 12, 31, 23, 59, 59)),
        (datetime.datetime(2049, 6, 1), datetime.datetime(2051, 7, 8, 9, 10, 11)),
        (datetime.datetime(2060, 1, 1), datetime.datetime(9999, 12, 31, 23, 59, 59)),
    ],
)
def test_validity_reads_the_dates_that_cryptography_reads(
    tmp_path: Path, not_before: datetime.datetime, not_after: datetime.datetime
) -> None:
    cert_path, _ = _self_signed(tmp_path, not_before.replace(tzinfo=UTC), not_after)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert security.validity(der) == (cert.not_valid_before_utc, cert.not_valid_after_utc)
    with pytest.raises((ValueError, IndexError)):
        security.validity(der[:40])


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_certificate_out_of_its_dates_is_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.datetime.now(UTC)
    day = datetime.timedelta(days=1)
    caplog.set_level(logging.WARNING, logger="serve.security")
    expired, expired_key = _self_signed(tmp_path, now - 30 * day, now - 2 * day)
    assert server_credentials(expired, expired_key, None) is not None  # served all the same
    (warning,) = _warnings(caplog)
    after = (now - 2 * day).strftime("%Y-%m-%d %H:%M")
    assert f"--tls-cert certificate {str(expired)!r} expired on {after}" in warning, warning
    assert "renew it" in warning

    caplog.clear()
    future, future_key = _self_signed(tmp_path, now + 2 * day, now + 30 * day)
    server_credentials(future, future_key, None)
    (warning,) = _warnings(caplog)
    assert str(future) in warning and "is not valid before" in warning, warning
    assert (now + 30 * day).strftime("notAfter %Y-%m-%d %H:%M") in warning, warning
    assert "clock" in warning

    caplog.clear()
    valid, valid_key = _self_signed(tmp_path, now - day, now + day)
    server_credentials(valid, valid_key, None)
    assert _warnings(caplog) == []
    # An expired client CA: every client certificate it signed is refused.
    server_credentials(valid, valid_key, expired)
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"--tls-client-ca certificate {str(expired)!r} expired"), warning
    # Not sent to clients: the warning once said "TLS clients will refuse it", as for a cert.
    assert "the server will refuse the client certificates it signed" in warning, warning

    caplog.clear()
    chain = tmp_path / "chain.pem"
    chain.write_bytes(valid.read_bytes() + expired.read_bytes())
    server_credentials(chain, valid_key, None)
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"--tls-cert certificate 2 of 2 in {str(chain)!r}"), warning


def test_a_server_started_with_an_expired_certificate_warns(
    start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.datetime.now(UTC)
    cert, key = _self_signed(
        tmp_path, now - datetime.timedelta(days=9), now - datetime.timedelta(days=1)
    )
    caplog.set_level(logging.WARNING, logger="serve.security")
    start_server(tls_cert=cert, tls_key=key)
    (warning,) = _warnings(caplog)
    assert str(cert) in warning and "expired on" in warning, warning
