"""The KServe v2 / Triton ``inference.GRPCInferenceService``, bound on its upstream path."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
from grpc import aio

from protos import kserve_pb2 as pb
from serve import tensors
from serve.errors import ServeError, invalid
from serve.state import VERSION, Model, ServingState

SERVICE = "inference.GRPCInferenceService"
PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "onnx-classifier-serving"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("classification", "model_configuration")
_CLASSIFICATION = "classification"


class KServeServicer:
    """Handlers of the KServe v2 methods this server implements (others: UNIMPLEMENTED)."""

    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext):
        return pb.ServerReadyResponse(ready=self.state.ready and not self.state.draining)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext):
        ready = (
            request.name in self.state.models
            and request.version in ("", VERSION)
            and self.state.ready
            and not self.state.draining
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext):
        info = (await self._lookup(request.name, request.version, context)).info
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=info.name,
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=info.input_name, datatype="FP32", shape=[-1, *info.sample_shape])],
            outputs=[tensor(name=info.output_name, datatype="FP32", shape=[-1, info.num_classes])],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: aio.ServicerContext):
        model = await self._lookup(request.name, request.version, context)
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

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext):
        async def work() -> pb.ModelInferResponse:
            model = self.state.model(request.model_name, request.model_version)
            rows = _decode_input(model, request)
            k = _requested_classes(model, request)
            logits = await model.batcher.infer(rows, self.state.deadline(context))
            return _encode_output(model, request, logits, k)

        return await self.state.run(context, request.model_name, work)

    async def _lookup(self, name: str, version: str, context: aio.ServicerContext) -> Model:
        try:
            return self.state.model(name, version)
        except ServeError as e:
            await context.abort(e.code, e.message)
            raise


def _decode_input(model: Model, request: pb.ModelInferRequest) -> np.ndarray:
    info = model.info
    if len(request.inputs) != 1 or request.inputs[0].name != info.input_name:
        names = [t.name for t in request.inputs]
        raise invalid(
            f"expected exactly one input named {info.input_name!r} for model {info.name}, "
            f"got {names}; name the tensor as ModelMetadata lists it"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise invalid(
            f"expected datatype FP32 for input {tensor.name!r}, got {tensor.datatype!r}; "
            "send float32 data"
        )
    shape = tuple(tensor.shape)
    what = f"input {tensor.name!r}"
    has_typed = len(tensor.contents.fp32_contents) > 0
    if request.raw_input_contents:
        if has_typed or len(request.raw_input_contents) != 1:
            raise invalid(
                f"expected one raw_input_contents entry and no typed contents, got "
                f"{len(request.raw_input_contents)} raw entries; send the tensor once"
            )
        return tensors.from_raw(info, shape, request.raw_input_contents[0], what)
    if not has_typed:
        tensors.check_rows(info, shape, what)
        raise invalid(
            f"expected data for {what} in raw_input_contents or contents.fp32_contents, got "
            "none; send the tensor's values"
        )
    return tensors.from_values(info, shape, tensor.contents.fp32_contents, what)


def _requested_classes(model: Model, request: pb.ModelInferRequest) -> int | None:
    """The classification count k asked for (None: plain logits); checks output names."""
    info = model.info
    if not request.outputs:
        return None
    if len(request.outputs) != 1 or request.outputs[0].name != info.output_name:
        names = [o.name for o in request.outputs]
        raise invalid(
            f"expected the requested output to be {info.output_name!r} for model {info.name}, "
            f"got {names}; ask for it by that name or ask for none"
        )
    params = request.outputs[0].parameters
    if _CLASSIFICATION not in params:
        return None
    param = params[_CLASSIFICATION]
    choice = param.WhichOneof("parameter_choice")
    k = param.int64_param if choice == "int64_param" else param.uint64_param
    if choice not in ("int64_param", "uint64_param") or k < 1:
        raise invalid(
            f"expected the classification parameter to be an integer >= 1, got "
            f"{getattr(param, choice) if choice else None!r}; pass class_count=k"
        )
    return min(int(k), info.num_classes)


def _encode_output(
    model: Model, request: pb.ModelInferRequest, logits: np.ndarray, k: int | None
) -> pb.ModelInferResponse:
    info = model.info
    tensor = pb.ModelInferResponse.InferOutputTensor
    if k is None:
        output = tensor(name=info.output_name, datatype="FP32", shape=list(logits.shape))
        raw = np.ascontiguousarray(logits, dtype="<f4").tobytes()
    else:
        output = tensor(name=info.output_name, datatype="BYTES", shape=[len(logits), k])
        raw = tensors.encode_bytes(tensors.classification_strings(logits, k, info.labels))
    return pb.ModelInferResponse(
        model_name=info.name,
        model_version=VERSION,
        id=request.id,
        outputs=[output],
        raw_output_contents=[raw],
    )


def handler(servicer: KServeServicer) -> grpc.GenericRpcHandler:
    """The generic handler that serves ``servicer`` on ``/inference.GRPCInferenceService/*``."""
    methods: dict[str, tuple[Callable, type, type]] = {
        "ServerLive": (servicer.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (servicer.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (servicer.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (
            servicer.ServerMetadata,
            pb.ServerMetadataRequest,
            pb.ServerMetadataResponse,
        ),
        "ModelMetadata": (
            servicer.ModelMetadata,
            pb.ModelMetadataRequest,
            pb.ModelMetadataResponse,
        ),
        "ModelConfig": (servicer.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelInfer": (servicer.ModelInfer, pb.ModelInferRequest, pb.ModelInferResponse),
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (behavior, request, response) in methods.items()
        },
    )
