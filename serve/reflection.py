"""The stock services beside ours: server reflection, and grpc.health.v1.

Both are registered with tolerant deserializers (``serve.wire``), so bytes that do not parse
get INVALID_ARGUMENT rather than the stock handlers' UNKNOWN and a logged traceback.

Reflection answers from a private descriptor pool that describes ``inference.*`` as upstream.

Our KServe messages live in package ``kserve.v2`` (tritonclient owns ``inference.*`` in the
default pool). For reflection clients (grpcurl) the private pool holds a copy of our file with
the package renamed to ``inference`` and every type reference rewritten, so they see the same
service and message names tritonclient's stubs use, with identical field numbers.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from protos import classifier_pb2, kserve_pb2
from serve.wire import checked, checked_stream, deserializer

UPSTREAM_PACKAGE = "inference"
UPSTREAM_FILE = "inference/grpc_service.proto"


def _file_proto(module: object) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
    return proto


def _rename_types(messages: object, old: str, new: str) -> None:
    for message in messages:  # type: ignore[attr-defined]
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
        _rename_types(message.nested_type, old, new)


def upstream_kserve_file() -> descriptor_pb2.FileDescriptorProto:
    """Our KServe file descriptor, renamed to the upstream ``inference`` package."""
    proto = _file_proto(kserve_pb2)
    old, new = f".{proto.package}.", f".{UPSTREAM_PACKAGE}."
    proto.name = UPSTREAM_FILE
    proto.package = UPSTREAM_PACKAGE
    _rename_types(proto.message_type, old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return proto


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """A private pool describing every service this server exposes."""
    pool = descriptor_pool.DescriptorPool()
    for module in (health_pb2, reflection_pb2, classifier_pb2):
        pool.Add(_file_proto(module))
    pool.Add(upstream_kserve_file())
    return pool


def service_names() -> tuple[str, ...]:
    """The fully qualified names reflection lists (what ``grpcurl list`` prints)."""
    return (
        f"{UPSTREAM_PACKAGE}.GRPCInferenceService",
        classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )


def handler() -> grpc.GenericRpcHandler:
    """The reflection service, answering from :func:`reflection_pool`; bytes that do not parse
    end the call with INVALID_ARGUMENT (grpcio-reflection's own handler answers UNKNOWN)."""
    servicer = reflection.aio.ReflectionServicer(service_names(), pool=reflection_pool())
    info = grpc.stream_stream_rpc_method_handler(
        checked_stream(servicer.ServerReflectionInfo),
        request_deserializer=deserializer(reflection_pb2.ServerReflectionRequest),
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        reflection.SERVICE_NAME, {"ServerReflectionInfo": info}
    )


def health_handler(servicer: health.aio.HealthServicer) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health served by ``servicer``; bytes that do not parse get
    INVALID_ARGUMENT (the stock registration answers UNKNOWN)."""
    request = deserializer(health_pb2.HealthCheckRequest)
    answer = health_pb2.HealthCheckResponse.SerializeToString
    methods = {
        "Check": grpc.unary_unary_rpc_method_handler(
            checked(servicer.Check), request_deserializer=request, response_serializer=answer
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            checked(servicer.Watch), request_deserializer=request, response_serializer=answer
        ),
    }
    return grpc.method_handlers_generic_handler(health.SERVICE_NAME, methods)
