"""Python client; its CLI ``python -m serve.client HOST:PORT --model NAME IMAGE ...`` is in
serve/client_cli.py.

Classification goes through our ``classifier.v1.Classifier`` API; raw logits through the
KServe v2 ``ModelInfer`` method, or ``ModelStreamInfer`` for many requests on one open stream
(the same wire tritonclient uses).
"""

from __future__ import annotations

import math
import operator
import os
import sys
import threading
import time
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
from serve.config import DEFAULT_MAX_MESSAGE_BYTES, MAX_DEADLINE_S
from serve.security import first_unsendable
from serve.targets import check_target

_KSERVE = "/inference.GRPCInferenceService/"
MAX_TOP_K = 2**32 - 1  # ClassifyRequest.top_k is a uint32
# gRPC waits up to 120 s between attempts to reconnect to a server that went away (its backoff
# grows 1.6x from 1 s): a Client shared by a long-running service kept failing UNAVAILABLE up to
# that long after a restarted server was back. Attempts to a refused port cost next to nothing.
_MAX_RECONNECT_BACKOFF_MS = 2000
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's channel options are C ints


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

    def __reduce__(self) -> tuple[type[ClientError], tuple[grpc.StatusCode, str]]:
        # Exception pickles ``args`` alone, and (message,) cannot rebuild one: a ClientError
        # raised in a ProcessPoolExecutor worker broke the whole pool.
        return type(self), (self.code, str(self))


class Client:
    """A blocking client of one server. Use as a context manager or call ``close()``; a closed
    Client raises ValueError: create a new one.

    ``target`` is HOST:PORT with the port given (the server's default is 8001; IPv6 as
    ``[::1]:8001``), ``unix:PATH``, ``dns:///HOST:PORT`` or another of gRPC's address forms;
    ValueError for a target without a port, which gRPC would take as port 443.

    One Client may be shared by threads: their calls and streams run concurrently on its one
    gRPC channel. ``timeout`` is the deadline of each call in seconds (None: no deadline).
    ``root_certificates`` (PEM CA) connects with TLS; ``private_key`` and ``certificate_chain``
    (PEM) add a client certificate, for servers started with ``--tls-client-ca``; ``token`` is
    sent as ``authorization: Bearer``. ``max_message_bytes`` (1..2**31-1, -1: no limit)
    bounds what it sends and receives; raise it with the server's ``--max-message-bytes``.
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
        if not isinstance(target, str) or not target.strip():
            # gRPC logs its own lines, then fails the first call with UNKNOWN.
            raise ValueError(
                f"expected target as HOST:PORT, got {target!r}; pass e.g. localhost:8001"
            )
        check_target(target)
        self.target = target
        self.timeout = _seconds(timeout, "timeout")
        max_message_bytes = _message_bytes(max_message_bytes)
        self._tls = root_certificates is not None or private_key is not None
        token = _token(token)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
        ]
        if not self._tls:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates, private_key, certificate_chain
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._closed = False
        self._classifier = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._infer = self._kserve("ModelInfer", kserve_pb2.ModelInferResponse)
        self._metadata_rpc = self._kserve("ModelMetadata", kserve_pb2.ModelMetadataResponse)
        self._server_ready = self._kserve("ServerReady", kserve_pb2.ServerReadyResponse)
        self._model_ready = self._kserve("ModelReady", kserve_pb2.ModelReadyResponse)
        self._index = self._kserve("RepositoryIndex", kserve_pb2.RepositoryIndexResponse)
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
        self._check_open()
        try:
            return rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e) from e

    def _error(self, error: grpc.RpcError) -> ClientError:
        if self._closed and error.code() == grpc.StatusCode.CANCELLED:
            # gRPC's words are "Channel closed!": close() ran on another thread.
            return ClientError(
                grpc.StatusCode.CANCELLED,
                f"CANCELLED: the Client of {self.target} was closed while this call was in "
                "flight; close it only once its calls are done, or use a new Client",
            )
        return _client_error(self.target, error, self._tls)

    def _check_open(self) -> None:
        """ValueError once ``close`` was called: gRPC's own, "Cannot invoke RPC on closed
        channel!", did not say that the Client is done for."""
        if self._closed:
            raise ValueError(
                f"expected an open Client, got one of {self.target} that was closed (close() "
                f"or the end of its with block); create a new Client({self.target!r})"
            )

    def close(self) -> None:
        """Close the channel; calls still in flight end CANCELLED. Safe to call again."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_ready(self, model: str | None = None, timeout: float | None = 30.0) -> None:
        """Block until the server (and ``model``) is ready, also while the server is still
        loading its models or restarting; ClientError after ``timeout`` seconds (None: no
        limit), and at once (NOT_FOUND) for a model that the ready server does not serve.

        A server that is shutting down (draining) answers not ready and is not ready again; it
        is waited for all the same, since a server restarted at the same address will be, and
        the ClientError at the end says that the server was shutting down."""
        self._check_open()
        seconds = _seconds(timeout, "timeout")
        deadline = None if seconds is None else time.monotonic() + seconds
        state: str | None = None  # what the server last said: None until it answers
        while True:
            # The server binds its port before it loads: until then ServerReady says false.
            try:
                server = self._ready(None, deadline)
                if server and (model is None or self._ready(model, deadline)):
                    return
                if server:  # ready without the model: its NOT_FOUND names the models it serves
                    request = kserve_pb2.ModelMetadataRequest(name=model)
                    self._metadata_rpc(request, timeout=_left(deadline), metadata=self._metadata)
                state = self._not_ready_state(deadline) or state or "unknown"
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise self._not_ready(model, seconds, state) from e
                stopped = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                if e.code() not in stopped or self._closed:
                    raise self._error(e) from e
                # The server stopped under the call (UNAVAILABLE "Cancelling all calls", or
                # CANCELLED by the server): the next call waits for one restarted in its place.
            left = _left(deadline)
            if left is not None and left <= 0:
                raise self._not_ready(model, seconds, state)
            time.sleep(0.1 if left is None else min(0.1, left))

    def _ready(self, model: str | None, deadline: float | None) -> bool:
        """One ServerReady (``model`` None) or ModelReady call, waiting for a connection."""
        options = {"timeout": _left(deadline), "wait_for_ready": True, "metadata": self._metadata}
        if model is None:
            return self._server_ready(kserve_pb2.ServerReadyRequest(), **options).ready
        return self._model_ready(kserve_pb2.ModelReadyRequest(name=model), **options).ready

    def _not_ready_state(self, deadline: float | None) -> str | None:
        """Why a server answered not ready, from its RepositoryIndex: "draining" when a model
        is UNAVAILABLE because the server is shutting down, else "loading"; None without an
        answer (the deadline, a server without the method)."""
        left = _left(deadline)
        try:
            index = self._index(
                kserve_pb2.RepositoryIndexRequest(),
                timeout=5.0 if left is None else max(left, 0.001),
                metadata=self._metadata,
            )
        except grpc.RpcError:
            return None
        for entry in index.models:
            if entry.state == "UNAVAILABLE" and "shutting down" in entry.reason:
                return "draining"
        return "loading"

    def _not_ready(
        self, model: str | None, seconds: float | None, state: str | None
    ) -> ClientError:
        within = "the timeout" if seconds is None else f"{seconds:g} s"
        if state is None:
            # gRPC's wait for a connection hides why it failed: a TLS mismatch too.
            message = (
                f"expected a server at {self.target}, got no answer within {within}; check the "
                f"address, that `python -m serve` is running, {_tls_hint(self._tls)}"
            )
        elif state == "draining":
            message = (
                f"expected {model or 'the server'} to be ready at {self.target} within {within}, "
                "got a server shutting down (draining), which is not ready again; use another "
                "replica, or restart the server and wait again"
            )
        else:
            why = "still loading its models" + (", or draining" if state == "unknown" else "")
            message = (
                f"expected {model or 'the server'} to be ready at {self.target} within {within}, "
                f"got not ready ({why}); raise the timeout or check the server's log"
            )
        return ClientError(grpc.StatusCode.UNAVAILABLE, message)

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
        _require_many(images, "images", "image", "[image]")
        if isinstance(images, np.ndarray) and images.ndim != 4:
            # Iterated, one [C, H, W] image is sent as C images of [H, W], which the server
            # refuses asking for "one preprocessed image of that shape": what was sent.
            raise TypeError(
                f"expected images as a list, or an array [N, C, H, W], got an array of shape "
                f"{list(images.shape)}; pass one image [C, H, W] as [image]"
            )
        try:
            top_k = operator.index(top_k)
        except TypeError:
            raise TypeError(f"expected top_k as an int, got {top_k!r}; pass e.g. 5") from None
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
        _require_many(paths, "paths", "path", "[path]")
        return self.classify(model, [Path(p).read_bytes() for p in paths], top_k)

    def classify_arrays(
        self, model: str, batch: np.ndarray, top_k: int = 5
    ) -> list[list[Prediction]]:
        """Top-k predictions for preprocessed float images [N, C, H, W] (one image: image[None])."""
        batch = np.asarray(batch)
        if batch.ndim != 4:
            # Each image of a [C, H, W] array would be one channel, refused by the server
            # with a message about images without a batch axis.
            raise ValueError(
                f"expected a batch of images [N, C, H, W], got shape {list(batch.shape)}; "
                "pass one image [C, H, W] as image[None]"
            )
        return self.classify(model, list(batch), top_k)

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
        try:
            window = operator.index(window)
        except TypeError:
            raise TypeError(f"expected window as an int, got {window!r}; pass e.g. 32") from None
        if window < 1:
            raise ValueError(f"expected window >= 1, got {window}; pass e.g. 32")
        timeout = _seconds(timeout, "timeout")
        self._check_open()
        source = iter(batches)  # here, not on gRPC's thread: "'int' object is not iterable"
        slots = threading.Semaphore(window)
        ended = threading.Event()
        sent = 0
        failed: list[Exception] = []  # what ``batches`` or a batch's check raised

        def requests() -> Iterator[kserve_pb2.ModelInferRequest]:
            # Runs on a gRPC thread; stops waiting for a slot once the stream has ended. An
            # exception here would reach the caller only as gRPC's "Exception iterating
            # requests!": it is kept for the caller, and the stream is half-closed.
            nonlocal sent
            while True:
                while not slots.acquire(timeout=0.1):
                    if ended.is_set():
                        return
                try:
                    batch = next(source, _END)  # taken only once a slot is free
                    if batch is _END or ended.is_set():
                        return
                    request = _infer_request(model, batch, input_name, str(sent))
                except Exception as e:
                    failed.append(e)
                    return
                yield request
                sent += 1

        call = self._stream(requests(), timeout=timeout, metadata=self._metadata)
        answered: dict[int, np.ndarray | ClientError] = {}
        following = 0
        try:
            for response in call:
                slots.release()
                number = response.infer_response.id
                if response.error_message:
                    if not number.isdecimal():  # not one of ours: nothing to wait for
                        raise _stream_error(response)
                    # Raised in its turn: answers to earlier requests may still be on their
                    # way (a request refused on arrival is answered before queued ones). No
                    # more batches are taken meanwhile.
                    answered[int(number)] = _stream_error(response)
                    ended.set()
                else:
                    answered[int(number)] = _logits(response.infer_response)
                while following in answered:
                    answer = answered.pop(following)
                    if isinstance(answer, ClientError):
                        raise answer
                    yield answer
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


_END = object()  # the end of ``batches``, which may hold a None by mistake


def _message_bytes(value: int) -> int:
    """``value`` as gRPC's message size limit: 1..2**31-1 bytes, or -1 for none. gRPC took
    2**31 as an OverflowError from its C core, and a str or a float without a word."""
    try:
        size = operator.index(value)
    except TypeError:
        size = 0
    if size != -1 and not 0 < size <= MAX_MESSAGE_BYTES:
        raise ValueError(
            f"expected max_message_bytes in 1..{MAX_MESSAGE_BYTES} (-1: no limit), got "
            f"{value!r}; pass e.g. {DEFAULT_MAX_MESSAGE_BYTES}"
        )
    return size


def _seconds(value: float | None, name: str) -> float | None:
    """``value`` as seconds > 0 (at most ``MAX_DEADLINE_S``), or None (no deadline); ValueError
    for anything else, which gRPC takes as a deadline already past (inf, nan, 0, negative) or a
    TypeError of its own."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"expected {name} > 0 seconds, or None for no deadline, got {value!r}; pass e.g. 30"
        )
    return min(seconds, MAX_DEADLINE_S)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _token(token: str | None) -> str | None:
    """``token`` without surrounding whitespace (a file's newline); ValueError unless it is one
    word of printable ASCII, which gRPC would refuse as INTERNAL "Invalid metadata"."""
    if token is None:
        return None
    token = token.strip()
    found = first_unsendable(token)
    if found is not None:
        offset, char = found
        raise ValueError(
            f"expected token as one word of printable ASCII, got {char!r} at offset "
            f"{offset}; pass the server's token alone ('Bearer ' is added when it is sent)"
        )
    return token


def _require_many(items: object, name: str, one: str, example: str) -> None:
    """TypeError for a lone path or buffer passed where a sequence of them is expected: it
    would be iterated character by character (the path '/' for classify_files)."""
    if isinstance(items, str | bytes | bytearray | memoryview | PathLike):
        raise TypeError(
            f"expected {name} as a list, got a single {one} ({type(items).__name__}); "
            f"pass {example}"
        )


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


def _tls_hint(tls: bool) -> str:
    if tls:
        return (
            "that --ca is the CA that signed its certificate, and that --cert and --key are "
            "given if it requires client certificates (mutual TLS)"
        )
    return "and pass --ca CA.pem (root_certificates= in Python) if it serves TLS"


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
        message = (
            f"cannot reach a ready server at {target} ({details}); retry if it is restarting, "
            f"else check the address, that `python -m serve` is running, {_tls_hint(tls)}"
        )
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        side = "this client's" if "CLIENT:" in details else "the server's"
        message = (
            f"RESOURCE_EXHAUSTED: {details}: the call is above {side} message size limit; send "
            "fewer or smaller images per call, or raise the limit (the server's "
            "--max-message-bytes, the client's max_message_bytes)"
        )
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and "Deadline Exceeded" in details:
        # gRPC's words: "Deadline Exceeded", on a stream "Stream removed (Deadline Exceeded)".
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
