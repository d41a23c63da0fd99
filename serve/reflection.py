"""The stock services beside ours: server reflection, and grpc.health.v1.

Both are registered with tolerant deserializers (``serve.wire``), so bytes that do not parse
get INVALID_ARGUMENT rather than the stock handlers' UNKNOWN and a logged traceback.

Reflection answers from a private descriptor pool that describes ``inference.*`` as upstream.
It is served as ``grpc.reflection.v1`` (what current grpcurl asks first) and as
``grpc.reflection.v1alpha`` (what grpcio-reflection ships and older clients speak): the two
protocols differ only in their package name, so one servicer and one message type serve both.
The list of services names v1alpha only, so ``grpcurl list`` shows the four services of
DESIGN.md; v1 is described on request like any other symbol.

Our KServe messages live in package ``kserve.v2`` (tritonclient owns ``inference.*`` in the
default pool). For reflection clients (grpcurl) the private pool holds a copy of our file with
the package renamed to ``inference`` and every type reference rewritten, so they see the same
service and message names tritonclient's stubs use, with identical field numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from protos import classifier_pb2, kserve_pb2
from serve import kserve
from serve.errors import not_found
from serve.health import unknown_service
from serve.wire import checked, checked_stream, deserializer

UPSTREAM_FILE = "inference/grpc_service.proto"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


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


def _renamed(module: object, package: str, name: str) -> descriptor_pb2.FileDescriptorProto:
    """The file descriptor of ``module`` moved to ``package`` (file ``name``), every reference
    to its own types rewritten."""
    proto = _file_proto(module)
    old, new = f".{proto.package}.", f".{package}."
    proto.name = name
    proto.package = package
    _rename_types(proto.message_type, old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return proto


def upstream_kserve_file() -> descriptor_pb2.FileDescriptorProto:
    """Our KServe file descriptor, renamed to the upstream ``inference`` package."""
    return _renamed(kserve_pb2, kserve.WIRE_PACKAGE, UPSTREAM_FILE)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """A private pool describing every service this server exposes."""
    pool = descriptor_pool.DescriptorPool()
    for module in (health_pb2, reflection_pb2, classifier_pb2):
        pool.Add(_file_proto(module))
    pool.Add(upstream_kserve_file())
    pool.Add(_renamed(reflection_pb2, "grpc.reflection.v1", "grpc/reflection/v1/reflection.proto"))
    return pool


class _MethodAwarePool:
    """``pool`` for grpcio-reflection, also finding the file of a method's full name.

    ``grpcurl describe inference.GRPCInferenceService.ModelInfer`` and protobuf's
    ``DescriptorPool(ProtoReflectionDescriptorDatabase(channel)).FindMethodByName`` ask
    ``file_containing_symbol`` for "package.Service.Method", which protobuf's (upb) pool does
    not resolve: they got NOT_FOUND for every method while Go and C++ servers answer it.
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> object:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> object:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file


def service_names() -> tuple[str, ...]:
    """The fully qualified names reflection lists (what ``grpcurl list`` prints)."""
    return (
        kserve.SERVICE,
        classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )


def handlers() -> tuple[grpc.GenericRpcHandler, ...]:
    """Reflection v1 and v1alpha, answering from :func:`reflection_pool`; bytes that do not
    parse end the call with INVALID_ARGUMENT (grpcio-reflection's own handler answers UNKNOWN)."""
    pool = _MethodAwarePool(reflection_pool())
    servicer = reflection.aio.ReflectionServicer(service_names(), pool=pool)
    info = grpc.stream_stream_rpc_method_handler(
        checked_stream(servicer.ServerReflectionInfo),
        request_deserializer=deserializer(reflection_pb2.ServerReflectionRequest),
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    return tuple(
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": info})
        for name in (REFLECTION_V1, reflection.SERVICE_NAME)
    )


def health_handler(
    servicer: health.aio.HealthServicer,
    closing: asyncio.Event,
    names: Callable[[], Iterable[str]],
) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health served by ``servicer``, with List answering for ``names()`` (the
    server's '' and its models); bytes that do not parse get INVALID_ARGUMENT (the stock
    registration answers UNKNOWN). Watch streams end (OK) once
    ``closing`` is set: the stock Watch never ends, and gRPC's stop waits for open calls, so
    one watcher (Envoy, client-side health checking) held every shutdown for its whole grace.
    """

    async def watch(request: health_pb2.HealthCheckRequest, context: aio.ServicerContext) -> None:
        updates = asyncio.ensure_future(servicer.Watch(request, context))
        closed = asyncio.ensure_future(closing.wait())
        try:
            await asyncio.wait({updates, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not updates.done():
                updates.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await updates

    # Reflection describes List (grpcio-health-checking's .proto has it) but the stock
    # servicer's List is the generated stub's UNIMPLEMENTED: answer it from Check per name.
    async def listed(
        request: health_pb2.HealthListRequest, context: aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        answer = health_pb2.HealthListResponse()
        for name in names():
            status = await servicer.Check(health_pb2.HealthCheckRequest(service=name), context)
            answer.statuses[name].CopyFrom(status)
        return answer

    # The stock Check answers an unknown name NOT_FOUND with an empty message.
    async def check(
        request: health_pb2.HealthCheckRequest, context: aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in names():
            raise not_found(unknown_service(request.service))
        return await servicer.Check(request, context)

    request = deserializer(health_pb2.HealthCheckRequest)
    answer = health_pb2.HealthCheckResponse.SerializeToString
    methods = {
        "Check": grpc.unary_unary_rpc_method_handler(
            checked(check), request_deserializer=request, response_serializer=answer
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            checked(watch), request_deserializer=request, response_serializer=answer
        ),
        # In grpcio-health-checking's .proto from 1.85 on, the floor in pyproject.toml.
        "List": grpc.unary_unary_rpc_method_handler(
            checked(listed),
            request_deserializer=deserializer(health_pb2.HealthListRequest),
            response_serializer=health_pb2.HealthListResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(health.SERVICE_NAME, methods)
