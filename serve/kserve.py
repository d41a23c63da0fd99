"""The KServe v2 / Triton ``inference.GRPCInferenceService``, bound on its upstream path."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc import aio

from protos import kserve_pb2 as pb
from serve.errors import not_found, shown
from serve.kserve_codec import decode_request, encode_response
from serve.state import VERSION, ServingState, serves_version
from serve.streaming import Stream
from serve.wire import Undecodable, checked, deserializer, require_parsed

# The package clients know our KServe service and messages by (Triton's); the one our .proto
# compiles to is private (DESIGN.md).
WIRE_PACKAGE = "inference"
SERVICE = f"{WIRE_PACKAGE}.GRPCInferenceService"
PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "onnx-classifier-serving"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("classification", "model_configuration", "statistics")


class KServeServicer:
    """Handlers of the KServe v2 methods this server implements (the rest of Triton's:
    UNIMPLEMENTED with what to do instead, ``UNSUPPORTED``)."""

    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext):
        return pb.ServerReadyResponse(ready=self.state.ready and not self.state.draining)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext):
        ready = (
            request.name in self.state.models
            and serves_version(request.version)
            and self.state.ready
            and not self.state.draining
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext):
        info = self.state.model(request.name, request.version).info
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=info.name,
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=info.input_name, datatype="FP32", shape=[-1, *info.sample_shape])],
            outputs=[tensor(name=info.output_name, datatype="FP32", shape=[-1, info.num_classes])],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: aio.ServicerContext):
        model = self.state.model(request.name, request.version)
        info = model.info
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=info.name,
                platform=PLATFORM,
                max_batch_size=model.batcher.runtime.max_batch,
                input=[
                    pb.ModelInput(
                        name=info.input_name,
                        data_type=pb.TYPE_FP32,
                        format=pb.ModelInput.FORMAT_NCHW
                        if info.image_shape
                        else pb.ModelInput.FORMAT_NONE,
                        dims=list(info.sample_shape),
                    )
                ],
                output=[
                    pb.ModelOutput(
                        name=info.output_name, data_type=pb.TYPE_FP32, dims=[info.num_classes]
                    )
                ],
            )
        )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """The served models (version 1 each), loaded or still loading; ``ready`` keeps the
        ready ones. This server has no repository of unloaded models to list."""
        index = pb.RepositoryIndexResponse.ModelIndex
        state = self.state
        models = []
        for name in sorted(set(state.models) | state.loading):
            if state.draining:
                entry = index(name=name, version=VERSION, state="UNAVAILABLE",
                              reason="the server is shutting down")  # fmt: skip
            elif name in state.models and state.ready:
                entry = index(name=name, version=VERSION, state="READY")
            else:
                entry = index(name=name, version=VERSION, state="LOADING")
            if entry.state == "READY" or not request.ready:
                models.append(entry)
        return pb.RepositoryIndexResponse(models=models)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """Triton's per-model totals (serve/statistics.py); every model when no name is given
        (at a version every model is served at: "" or "1")."""
        if request.name:
            names = [self.state.model(request.name, request.version).info.name]
        elif serves_version(request.version):
            names = sorted(self.state.models)
        else:
            # Triton ignores the version without a name; here every model has version 1 only,
            # so any other version would get version 1's totals without a word.
            raise not_found(
                f"expected version '' or {VERSION!r} with no model name (every model's "
                f"statistics), got {shown(request.version)}; this server serves version "
                f"{VERSION} only: leave the version empty, or name the model too"
            )
        stats = []
        for name in names:
            tally = self.state.metrics.statistics(name) if self.state.metrics else None
            if tally is not None:
                stats.append(tally.snapshot(name))
        return pb.ModelStatisticsResponse(model_stats=stats)

    async def ModelInfer(
        self, request: pb.ModelInferRequest | Undecodable, context: aio.ServicerContext
    ):
        async def work() -> pb.ModelInferResponse:
            parsed = require_parsed(request)
            model = self.state.model(parsed.model_name, parsed.model_version)
            rows, k = decode_request(model, parsed)
            logits = await model.batcher.infer(rows, self.state.deadline(context))
            return encode_response(model, parsed, logits, k, self.state.max_message_bytes)

        return await self.state.run(context, request.model_name, work)

    async def ModelStreamInfer(self, requests: object, context: aio.ServicerContext) -> None:
        await Stream(self.state, context).serve()


# Triton methods this server does not implement, and what to do instead: one clear status
# rather than gRPC's bare "Method not found!".
_STATIC_MODELS = (
    "this server serves the models it was started with; to change them, start it with the "
    "new files (roll out a new pod)"
)
_NO_SHARED_MEMORY = (
    "shared memory is not supported by this server; send tensors in the request "
    "(tritonclient: set_data_from_numpy without set_shared_memory)"
)
UNSUPPORTED = {
    "RepositoryModelLoad": f"loading models at run time is not supported: {_STATIC_MODELS}",
    "RepositoryModelUnload": f"unloading models at run time is not supported: {_STATIC_MODELS}",
    "SystemSharedMemoryStatus": _NO_SHARED_MEMORY,
    "SystemSharedMemoryRegister": _NO_SHARED_MEMORY,
    "SystemSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryStatus": _NO_SHARED_MEMORY,
    "CudaSharedMemoryRegister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "TraceSetting": "tracing is not supported; run the server with --log-level debug for a "
    "line per request with its queue and compute times",
    "LogSettings": "log settings cannot be changed at run time; start the server with "
    "--log-level and --log-format",
}


def _unsupported(method: str) -> grpc.RpcMethodHandler:
    message = f"{method} is not implemented by this server: {UNSUPPORTED[method]}"

    async def refuse(request: bytes, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return grpc.unary_unary_rpc_method_handler(refuse)  # raw bytes: nothing to parse


def _deserializer(message_type: type) -> Callable:
    """``serve.wire.deserializer`` naming the message as Triton's .proto does."""
    return deserializer(message_type, f"{WIRE_PACKAGE}.{message_type.DESCRIPTOR.name}")


def handler(servicer: KServeServicer) -> grpc.GenericRpcHandler:
    """The generic handler that serves ``servicer`` on ``/inference.GRPCInferenceService/*``.

    Every request deserializer is tolerant (``serve.wire``): bytes that do not parse get
    INVALID_ARGUMENT from the method, not UNKNOWN and a traceback from gRPC.
    """
    # Method → (behaviour, request type, response type). The inference methods check parsing
    # and map errors themselves (a stream answers a bad message and goes on); the others
    # through ``serve.wire.checked``.
    methods: dict[str, tuple[Callable, type, type]] = {
        "ServerLive": (checked(servicer.ServerLive), pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (
            checked(servicer.ServerReady),
            pb.ServerReadyRequest,
            pb.ServerReadyResponse,
        ),
        "ModelReady": (checked(servicer.ModelReady), pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (
            checked(servicer.ServerMetadata),
            pb.ServerMetadataRequest,
            pb.ServerMetadataResponse,
        ),
        "ModelMetadata": (
            checked(servicer.ModelMetadata),
            pb.ModelMetadataRequest,
            pb.ModelMetadataResponse,
        ),
        "ModelConfig": (
            checked(servicer.ModelConfig),
            pb.ModelConfigRequest,
            pb.ModelConfigResponse,
        ),
        "RepositoryIndex": (
            checked(servicer.RepositoryIndex),
            pb.RepositoryIndexRequest,
            pb.RepositoryIndexResponse,
        ),
        "ModelStatistics": (
            checked(servicer.ModelStatistics),
            pb.ModelStatisticsRequest,
            pb.ModelStatisticsResponse,
        ),
        "ModelInfer": (servicer.ModelInfer, pb.ModelInferRequest, pb.ModelInferResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=_deserializer(request),
            response_serializer=response.SerializeToString,
        )
        for name, (behavior, request, response) in methods.items()
    }
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=_deserializer(pb.ModelInferRequest),
        response_serializer=pb.ModelStreamInferResponse.SerializeToString,
    )
    handlers.update({method: _unsupported(method) for method in UNSUPPORTED})
    return grpc.method_handlers_generic_handler(SERVICE, handlers)
