"""Python client; its CLI ``python -m serve.client HOST:PORT --model NAME IMAGE ...`` is in
serve/client_cli.py.

Classification goes through our ``classifier.v1.Classifier`` API; raw logits through the
KServe v2 ``ModelInfer`` method, or ``ModelStreamInfer`` for many requests on one open stream
(the same wire tritonclient uses).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

if __name__ == "__main__":
    # As the server and the probe do: gRPC's C core would print its own "Handshake failed"
    # line before ours. It reads GRPC_VERBOSITY once, when grpc is first imported (below).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import numpy as np

from protos import classifier_pb2, classifier_pb2_grpc, kserve_pb2
from serve.config import DEFAULT_MAX_MESSAGE_BYTES

_KSERVE = "/inference.GRPCInferenceService/"
MAX_TOP_K = 2**32 - 1  # ClassifyRequest.top_k is a uint32


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
    """A blocking client of one server. Use as a context manager or call ``close()``.

    ``root_certificates`` (PEM CA) connects with TLS; ``private_key`` and ``certificate_chain``
    (PEM) add a client certificate, for servers started with ``--tls-client-ca``; ``token`` is
    sent as ``authorization: Bearer``.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if (private_key is None) != (certificate_chain is None):
            raise ValueError(
                "expected private_key and certificate_chain together (mutual TLS), got one; "
                "pass the client certificate's PEM chain and its key"
            )
        self.target = target
        self.timeout = timeout
        self._tls = root_certificates is not None or private_key is not None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if not self._tls:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates, private_key, certificate_chain
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._classifier = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._infer = self._kserve("ModelInfer", kserve_pb2.ModelInferResponse)
        self._metadata_rpc = self._kserve("ModelMetadata", kserve_pb2.ModelMetadataResponse)
        self._server_ready = self._kserve("ServerReady", kserve_pb2.ServerReadyResponse)
        self._model_ready = self._kserve("ModelReady", kserve_pb2.ModelReadyResponse)
        self._stream = self._channel.stream_stream(
            _KSERVE + "ModelStreamInfer",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=kserve_pb2.ModelStreamInferResponse.FromString,
        )

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
            raise self._error(e) from e

    def _error(self, error: grpc.RpcError) -> ClientError:
        return _client_error(self.target, error, self._tls)

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
                raise self._error(e) from e
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
        """Top-k predictions per image; each image is encoded bytes (PNG, JPEG, ...) that the
        server preprocesses, or a preprocessed float array [C, H, W] sent as float32.

        ``top_k`` 0 asks for the server's default (5). Raises ValueError for a ``top_k``
        outside 0..2**32-1 and TypeError for an image that is
        neither (a path, an integer array such as raw uint8 pixels).
        """
        if not 0 <= top_k <= MAX_TOP_K:
            raise ValueError(f"expected 0 <= top_k <= {MAX_TOP_K}, got {top_k}; pass e.g. 5")
        request = classifier_pb2.ClassifyRequest(model=model, top_k=top_k)
        request.images.extend(_image(image, i) for i, image in enumerate(images))
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
        """Top-k predictions for preprocessed float images [N, C, H, W] (one image: image[None])."""
        return self.classify(model, list(np.asarray(batch)), top_k)

    def infer(self, model: str, batch: np.ndarray, input_name: str = "input") -> np.ndarray:
        """Raw logits [N, K] for a float32 batch [N, ...] through KServe ModelInfer."""
        request = _infer_request(model, batch, input_name, "")
        return _logits(self._call(self._infer, request, self.timeout))

    def infer_stream(
        self,
        model: str,
        batches: Iterable[np.ndarray],
        input_name: str = "input",
        *,
        window: int = 32,
        timeout: float | None = None,
    ) -> Iterator[np.ndarray]:
        """Raw logits for each batch of ``batches``, in their order, over one open KServe
        ``ModelStreamInfer`` stream.

        Up to ``window`` requests are in flight at once, so they batch on the server together
        with other clients' requests; a message on an open stream costs far less than a call
        (docs/serving.md). ``timeout`` bounds the whole stream (default: none). The first
        request that fails raises ClientError with its status and ends the stream; answers
        before it have been yielded.
        """
        if window < 1:
            raise ValueError(f"expected window >= 1, got {window}")
        slots = threading.Semaphore(window)
        ended = threading.Event()
        sent = 0
        failed: list[Exception] = []  # what ``batches`` or a batch's check raised

        def requests() -> Iterator[kserve_pb2.ModelInferRequest]:
            # Runs on a gRPC thread; stops waiting for a slot once the stream has ended. An
            # exception here would reach the caller only as gRPC's "Exception iterating
            # requests!": it is kept for the caller, and the stream is half-closed.
            nonlocal sent
            source = iter(batches)
            while True:
                while not slots.acquire(timeout=0.1):
                    if ended.is_set():
                        return
                try:
                    batch = next(source, None)  # taken only once a slot is free
                    if batch is None or ended.is_set():
                        return
                    request = _infer_request(model, batch, input_name, str(sent))
                except Exception as e:
                    failed.append(e)
                    return
                yield request
                sent += 1

        call = self._stream(requests(), timeout=timeout, metadata=self._metadata)
        answered: dict[int, np.ndarray] = {}
        following = 0
        try:
            for response in call:
                slots.release()
                if response.error_message:
                    raise _stream_error(response)
                answered[int(response.infer_response.id)] = _logits(response.infer_response)
                while following in answered:
                    yield answered.pop(following)
                    following += 1
            if failed:
                raise failed[0]
            if following < sent:
                raise ClientError(
                    grpc.StatusCode.UNKNOWN,
                    f"expected answers to {sent} requests, got {following} before the stream "
                    "ended; retry the rest",
                )
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            ended.set()
            call.cancel()


def _image(image: bytes | np.ndarray, index: int) -> classifier_pb2.Image:
    if isinstance(image, bytes | bytearray) or (
        isinstance(image, memoryview) and image.ndim == 1 and image.itemsize == 1
    ):  # a memoryview of floats (of an array) is a tensor, as it was before
        return classifier_pb2.Image(encoded=bytes(image))
    if isinstance(image, str | PathLike):
        raise TypeError(
            f"expected image {index} as encoded bytes or a float array, got the path "
            f"{str(image)!r}; use classify_files for files"
        )
    array = _float32(image, f"image {index}")
    return classifier_pb2.Image(
        tensor=classifier_pb2.Tensor(shape=array.shape, data=array.tobytes())
    )


def _float32(values: object, what: str) -> np.ndarray:
    """``values`` as contiguous little-endian float32; TypeError unless they are floats, since
    a cast of raw integer pixels (uint8 0..255) would be classified without preprocessing."""
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(
            f"expected {what} as preprocessed floats (scaled and normalized as the model "
            f"expects), got dtype {array.dtype}; preprocess it to float32, or send the encoded "
            "image (PNG/JPEG bytes) and let the server preprocess it"
        )
    return np.ascontiguousarray(array, dtype="<f4")


def _infer_request(
    model: str, batch: np.ndarray, input_name: str, request_id: str
) -> kserve_pb2.ModelInferRequest:
    array = _float32(batch, "the batch")
    request = kserve_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=input_name, datatype="FP32", shape=array.shape)
    request.raw_input_contents.append(array.tobytes())
    return request


def _logits(response: kserve_pb2.ModelInferResponse) -> np.ndarray:
    shape = response.outputs[0].shape
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)


def _stream_error(response: kserve_pb2.ModelStreamInferResponse) -> ClientError:
    """The ClientError of a failed stream answer ("STATUS: message" in ``error_message``)."""
    name, _, _ = response.error_message.partition(":")
    code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
    request = response.infer_response.id or "?"
    return ClientError(code, f"request {request}: {response.error_message}")


def _client_error(target: str, error: grpc.RpcError, tls: bool = False) -> ClientError:
    """``error`` as one message: the server's own, or for the failures gRPC words itself
    (unreachable, too large, too slow) what to do about them."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    if code == grpc.StatusCode.UNAVAILABLE and "Cancelling all calls" in details:
        # gRPC's words when a server stops with the call still open: its drain ran out.
        message = (
            f"UNAVAILABLE: the server at {target} stopped before answering ({details}): it was "
            "shut down; retry, on another replica"
        )
    elif code == grpc.StatusCode.UNAVAILABLE and "shutting down" not in details:
        tls_hint = (
            "that --ca is the CA that signed its certificate, and that --cert and --key are "
            "given if it requires client certificates (mutual TLS)"
            if tls
            else "and pass --ca CA.pem (root_certificates= in Python) if it serves TLS"
        )
        message = (
            f"cannot reach a ready server at {target} ({details}); check the address, that "
            f"`python -m serve` is running, {tls_hint}"
        )
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        side = "this client's" if "CLIENT:" in details else "the server's"
        message = (
            f"RESOURCE_EXHAUSTED: {details}: the call is above {side} message size limit; send "
            "fewer or smaller images per call, or raise the limit (the server's "
            "--max-message-bytes, the client's max_message_bytes)"
        )
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
        message = (
            f"DEADLINE_EXCEEDED: no answer from {target} within the deadline; raise --timeout "
            "(timeout= in Python) or send fewer images per call"
        )
    else:
        message = f"{code.name}: {details}"
    return ClientError(code, message)


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.client`` (serve/client_cli.py)."""
    from serve.client_cli import main as cli_main  # it imports this module

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
