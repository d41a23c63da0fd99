"""Python client and CLI: ``python -m serve.client HOST:PORT --model NAME IMAGE ... [--top-k 5]``.

Classification goes through our ``classifier.v1.Classifier`` API; raw logits through the
KServe v2 ``ModelInfer`` method (the same wire tritonclient uses).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from protos import classifier_pb2, classifier_pb2_grpc, kserve_pb2
from serve.config import DEFAULT_MAX_MESSAGE_BYTES

_KSERVE = "/inference.GRPCInferenceService/"


@dataclass(frozen=True)
class Prediction:
    """One label of one image: class index, label, softmax score and raw logit."""

    index: int
    label: str
    score: float
    logit: float


class ClientError(Exception):
    """A call failed; ``code`` is the gRPC status and the message says what to do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """A blocking client of one server. Use as a context manager or call ``close()``."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        root_certificates: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if root_certificates is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._classifier = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._infer = self._kserve("ModelInfer", kserve_pb2.ModelInferResponse)
        self._metadata_rpc = self._kserve("ModelMetadata", kserve_pb2.ModelMetadataResponse)
        self._server_ready = self._kserve("ServerReady", kserve_pb2.ServerReadyResponse)
        self._model_ready = self._kserve("ModelReady", kserve_pb2.ModelReadyResponse)

    def _kserve(self, method: str, response: type) -> grpc.UnaryUnaryMultiCallable:
        return self._channel.unary_unary(
            _KSERVE + method,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response.FromString,
        )

    def _call(self, rpc: grpc.UnaryUnaryMultiCallable, request: object, timeout: float | None):
        try:
            return rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _client_error(self.target, e) from e

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_ready(self, model: str | None = None, timeout: float = 30.0) -> None:
        """Block until the server (and ``model``) is ready; ClientError after ``timeout``."""
        try:
            options = {"timeout": timeout, "wait_for_ready": True, "metadata": self._metadata}
            if model is None:
                ready = self._server_ready(kserve_pb2.ServerReadyRequest(), **options).ready
            else:
                ready = self._model_ready(kserve_pb2.ModelReadyRequest(name=model), **options).ready
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _client_error(self.target, e) from e
            raise ClientError(
                grpc.StatusCode.UNAVAILABLE,
                f"expected a server at {self.target}, got no answer within {timeout:g} s; "
                "check the address and that `python -m serve` is running",
            ) from e
        if not ready:
            raise ClientError(
                grpc.StatusCode.UNAVAILABLE,
                f"expected {model or 'the server'} to be ready at {self.target}, got not ready; "
                "wait for start-up to finish or check the model name",
            )

    def model_metadata(self, model: str) -> kserve_pb2.ModelMetadataResponse:
        """The KServe ModelMetadata of ``model``: tensor names, datatypes and shapes."""
        request = kserve_pb2.ModelMetadataRequest(name=model)
        return self._call(self._metadata_rpc, request, self.timeout)

    def classify(
        self, model: str, images: Sequence[bytes | np.ndarray], top_k: int = 5
    ) -> list[list[Prediction]]:
        """Top-k predictions per image; each image is encoded bytes or a float32 [C,H,W] array."""
        request = classifier_pb2.ClassifyRequest(model=model, top_k=top_k)
        for image in images:
            if isinstance(image, bytes | bytearray):
                request.images.add(encoded=bytes(image))
            else:
                array = np.ascontiguousarray(image, dtype="<f4")
                request.images.add(
                    tensor=classifier_pb2.Tensor(shape=array.shape, data=array.tobytes())
                )
        response = self._call(self._classifier.Classify, request, self.timeout)
        return [
            [Prediction(p.index, p.label, p.score, p.logit) for p in result.labels]
            for result in response.results
        ]

    def classify_files(
        self, model: str, paths: Sequence[str | Path], top_k: int = 5
    ) -> list[list[Prediction]]:
        """Top-k predictions for image files (PNG, JPEG, ...)."""
        return self.classify(model, [Path(p).read_bytes() for p in paths], top_k)

    def classify_arrays(
        self, model: str, batch: np.ndarray, top_k: int = 5
    ) -> list[list[Prediction]]:
        """Top-k predictions for preprocessed float32 images [N, C, H, W]."""
        return self.classify(model, list(np.asarray(batch, dtype=np.float32)), top_k)

    def infer(self, model: str, batch: np.ndarray, input_name: str = "input") -> np.ndarray:
        """Raw logits [N, K] for a float32 batch [N, ...] through KServe ModelInfer."""
        array = np.ascontiguousarray(batch, dtype="<f4")
        request = kserve_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
        response = self._call(self._infer, request, self.timeout)
        output = response.outputs[0]
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(output.shape)


def _client_error(target: str, error: grpc.RpcError) -> ClientError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE and "shutting down" not in (details or ""):
        message = (
            f"cannot reach a ready server at {target} ({details}); check the address and "
            "that `python -m serve` is running"
        )
    else:
        message = f"{code.name}: {details}"
    return ClientError(code, message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve.client", description="Classify images with a running server."
    )
    parser.add_argument("target", metavar="HOST:PORT")
    parser.add_argument("--model", required=True)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--token-file", type=Path, help="bearer token (servers with auth)")
    parser.add_argument("--ca", type=Path, help="PEM CA certificate: connect with TLS")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"expected --top-k >= 1, got {args.top_k}")
    try:
        images = [path.read_bytes() for path in args.images]
        token = args.token_file.read_text().strip() if args.token_file else None
        ca = args.ca.read_bytes() if args.ca else None
    except OSError as e:
        message = f"expected a readable file, got {e.filename!r} ({e.strerror}); check the path"
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        with Client(args.target, timeout=args.timeout, token=token, root_certificates=ca) as c:
            results = c.classify(args.model, images, args.top_k)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path, predictions in zip(args.images, results, strict=True):
        print(path)
        for p in predictions:
            print(f"  {p.score:8.4f}  {p.index:4d}  {p.label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
