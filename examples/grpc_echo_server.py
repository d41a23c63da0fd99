"""A KServe v2 ModelInfer server that computes nothing: the gRPC floor under `serve.bench`.

    python examples/grpc_echo_server.py [PORT]          # default 18500
    python -m serve.bench 127.0.0.1:18500 --model echo -c 1 16 64

It answers every ModelInfer (and every message on a ModelStreamInfer stream) with a fixed
[1, 10] FP32 output without parsing the request, and ModelMetadata with a 3×32×32 input, so
the bench (`--api unary stream`) measures what grpc.aio alone costs per call on this machine
(client and server together), with no batching, Python handler work or ONNX Runtime.
docs/benchmarks.md uses it to explain which targets this machine can reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protos import kserve_pb2 as pb  # noqa: E402  (after the path set-up above)


def _handlers() -> grpc.GenericRpcHandler:
    tensor = pb.ModelInferResponse.InferOutputTensor
    answer = pb.ModelInferResponse(
        model_name="echo",
        model_version="1",
        outputs=[tensor(name="logits", datatype="FP32", shape=[1, 10])],
        raw_output_contents=[bytes(40)],
    ).SerializeToString()
    meta = pb.ModelMetadataResponse.TensorMetadata
    metadata = pb.ModelMetadataResponse(
        name="echo",
        versions=["1"],
        platform="none",
        inputs=[meta(name="input", datatype="FP32", shape=[-1, 3, 32, 32])],
        outputs=[meta(name="logits", datatype="FP32", shape=[-1, 10])],
    ).SerializeToString()

    streamed = pb.ModelStreamInferResponse(
        infer_response=pb.ModelInferResponse.FromString(answer)
    ).SerializeToString()

    async def infer(request: bytes, context: aio.ServicerContext) -> bytes:
        return answer

    async def stream_infer(
        requests: AsyncIterator[bytes], context: aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield streamed

    async def model_metadata(request: bytes, context: aio.ServicerContext) -> bytes:
        return metadata

    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream_infer),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(model_metadata),
        },
    )


async def serve(port: int) -> None:
    server = aio.server()
    server.add_generic_rpc_handlers((_handlers(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo server on 127.0.0.1:{port}; Ctrl-C to stop", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(0)


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 18500
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
