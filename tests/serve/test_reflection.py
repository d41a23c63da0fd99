"""serve/reflection.py: reflection (v1 and v1alpha) lists every service and describes
inference.* as upstream does."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
import tritonclient.grpc as tc  # registers inference.* in the default pool
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protos import classifier_pb2, kserve_pb2
from serve.background import BackgroundServer

REFLECTION_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
SERVICES = {
    "inference.GRPCInferenceService",
    "classifier.v1.Classifier",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",  # v1 answers too, unlisted (DESIGN: four)
}


def test_tritonclient_and_our_modules_share_one_process() -> None:
    upstream = tc.service_pb2.ModelInferRequest.DESCRIPTOR
    ours = kserve_pb2.ModelInferRequest.DESCRIPTOR
    assert upstream.full_name == "inference.ModelInferRequest"
    assert ours.full_name == "kserve.v2.ModelInferRequest"
    assert classifier_pb2.DESCRIPTOR.package == "classifier.v1"
    # Same field numbers, so the same bytes decode the same either way.
    message = tc.service_pb2.ModelInferRequest(model_name="m", raw_input_contents=[b"\x01"])
    message.inputs.add(name="input", datatype="FP32", shape=[1, 2])
    decoded = kserve_pb2.ModelInferRequest.FromString(message.SerializeToString())
    assert decoded.model_name == "m" and list(decoded.inputs[0].shape) == [1, 2]
    assert decoded.SerializeToString() == message.SerializeToString()


def test_wire_field_numbers_match_upstream() -> None:
    pairs = [
        (tc.service_pb2.DESCRIPTOR, kserve_pb2.DESCRIPTOR),
        (tc.model_config_pb2.DESCRIPTOR, kserve_pb2.DESCRIPTOR),
    ]
    checked = 0
    for upstream_file, our_file in pairs:
        for name, ours in our_file.message_types_by_name.items():
            upstream = upstream_file.message_types_by_name.get(name)
            if upstream is None:
                continue
            for field in ours.fields:
                theirs = upstream.fields_by_name[field.name]
                assert (field.number, field.type) == (theirs.number, theirs.type), field.full_name
                checked += 1
    assert checked > 40


def test_reflection_lists_and_describes_every_service(shared_server: BackgroundServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == SERVICES
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        infer = service.methods_by_name["ModelInfer"]
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        assert infer.output_type.fields_by_name["raw_output_contents"].number == 6
        classify = pool.FindServiceByName("classifier.v1.Classifier").methods_by_name["Classify"]
        assert classify.input_type.full_name == "classifier.v1.ClassifyRequest"
        assert pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]


def test_reflection_v1_answers_like_v1alpha(shared_server: BackgroundServer) -> None:
    """v1 differs from v1alpha only in its package: the same messages go over its path."""
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.ModelInferRequest"),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listed, v1, kserve = list(call(iter(requests), timeout=10))
    assert {s.name for s in listed.list_services_response.service} == SERVICES
    [v1_file] = v1.file_descriptor_response.file_descriptor_proto
    proto = descriptor_pb2.FileDescriptorProto.FromString(v1_file)
    assert proto.package == "grpc.reflection.v1"
    [method] = proto.service[0].method
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    kserve_files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in kserve.file_descriptor_response.file_descriptor_proto
    ]
    assert [f.package for f in kserve_files] == ["inference"]


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_grpcurl_lists_all_four_services(shared_server: BackgroundServer) -> None:
    listed = subprocess.run(
        ["grpcurl", "-plaintext", f"127.0.0.1:{shared_server.port}", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert set(listed) == SERVICES


def test_health_and_reflection_answer_invalid_argument_to_bytes_that_do_not_parse(
    shared_server: BackgroundServer,
) -> None:
    garbage = b"\x0f\x01"
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        calls = {
            "HealthCheckRequest": channel.unary_unary("/grpc.health.v1.Health/Check"),
            "HealthCheckRequest (Watch)": lambda data, timeout: list(
                channel.unary_stream("/grpc.health.v1.Health/Watch")(data, timeout=timeout)
            ),
            "ServerReflectionRequest": lambda data, timeout: list(
                channel.stream_stream(REFLECTION_INFO)(iter([data]), timeout=timeout)
            ),
        }
        for message, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call(garbage, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            expected = f"expected a serialized {message.split()[0]}, got bytes that do not parse"
            assert expected in caught.value.details(), message

        # Both still answer what parses, Watch included.
        check = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert check.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
        watch = check.Watch(health_pb2.HealthCheckRequest(service="tiny"), timeout=10)
        assert next(watch).status == serving
        watch.cancel()
        assert set(ProtoReflectionDescriptorDatabase(channel).get_services()) == SERVICES


def test_reflection_resolves_every_method_by_its_full_name(
    shared_server: BackgroundServer,
) -> None:
    """``grpcurl describe Service.Method`` and ``FindMethodByName`` ask file_containing_symbol
    for the method's full name; protobuf's pool alone answered NOT_FOUND for every method."""
    from google.protobuf.descriptor_pool import DescriptorPool

    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        services = sorted(ProtoReflectionDescriptorDatabase(channel).get_services())
        resolved = []
        for name in [*services, "grpc.reflection.v1.ServerReflection"]:
            # A fresh pool per service: nothing is known before the method's own look-up.
            fresh = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            service = fresh.FindServiceByName(name)
            by_file = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            assert by_file.FindFileByName(service.file.name).services_by_name[service.name]
            for method in service.methods:
                pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
                found = pool.FindMethodByName(method.full_name)
                assert found.input_type.full_name == method.input_type.full_name
                assert found.output_type.full_name == method.output_type.full_name
                resolved.append(found.full_name)
        call = channel.stream_stream(
            REFLECTION_INFO,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        missing = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService.NoSuchMethod"
        )
        (answer,) = list(call(iter([missing]), timeout=10))
    assert "inference.GRPCInferenceService.ModelStreamInfer" in resolved
    assert "classifier.v1.Classifier.Classify" in resolved
    assert "grpc.health.v1.Health.Watch" in resolved
    assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_health_list_that_reflection_describes_answers_every_status(
    shared_server: BackgroundServer,
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        health = pool.FindServiceByName("grpc.health.v1.Health")
        assert "List" in health.methods_by_name  # grpcio-health-checking >= 1.85 has it
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.List(health_pb2.HealthListRequest(), timeout=10)
        checked = {
            name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            for name in answer.statuses
        }
    listed = {name: status.status for name, status in answer.statuses.items()}
    assert "" in listed and len(listed) > 1
    assert set(listed.values()) == {health_pb2.HealthCheckResponse.SERVING}
    assert listed == checked
