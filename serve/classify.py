"""Our own ``classifier.v1.Classifier`` service: images or tensors in, top-k labels out."""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

import grpc
import numpy as np
from grpc import aio

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc
from serve import images, tensors
from serve.errors import ServeError, check_answer_size, invalid, shown
from serve.model_info import ModelInfo
from serve.state import VERSION, Model, ServingState
from serve.wire import Undecodable, deserializer, require_parsed

DEFAULT_TOP_K = 5
# Decoded rows of one call's encoded images. A 43-byte GIF decodes to a whole [C, H, W] float32
# row (588 KiB at 3x224x224), so without this one 64 MiB message could ask for 800 GiB; refused
# before anything is decoded.
MAX_DECODED_BYTES = 1 << 30
# Decoded rows held by all calls at once, from their arrival to their answer. With only the
# per-call bound, 40 concurrent calls of 1783 tiny GIFs (77 KB each) held 40 GiB at 3x224x224
# while they waited for decoding and in the model's queue (it bounds rows, not bytes).
MAX_HELD_DECODED_BYTES = 4 << 30
# Source pixels of one call's encoded images, each counted from its header before it is
# decoded (a call of one image within --max-image-pixels always passes). Decoding costs 8-25 ns
# a pixel whatever the bytes: a 40-megapixel palette PNG of one colour is 5 KB, and a 64 MiB
# call of them held a decoder thread for 10 minutes at 3x224x224 (an hour for smaller inputs).
# 2**30 takes 25 s at most; 64 MiB of 12-megapixel camera JPEGs (~3 MB each) is a quarter of
# it. Counted as each image is opened to decode: reading every header first opened each image
# twice, ~20 % of the decoding of a call of small (28x28) PNGs.
MAX_SOURCE_PIXELS = 1 << 30
# A call's images are decoded a slice of about this many seconds at a time, each slice a task
# of its own in the decoder pool (first in, first out), so that calls take turns: as one task,
# a small call waited until every image of the calls ahead of it was decoded.
DECODE_SLICE_S = 0.05


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """Decodes each image (Pillow, in a worker thread), batches, and answers with top-k."""

    def __init__(self, state: ServingState, decoder: Executor | None = None) -> None:
        self.state = state
        self._decoder = decoder  # None: the event loop's default executor
        self._held = 0  # bytes of decoded rows reserved by the calls in flight

    async def Classify(
        self, request: pb.ClassifyRequest | Undecodable, context: aio.ServicerContext
    ):
        async def work() -> pb.ClassifyResponse:
            parsed = require_parsed(request)
            model = self.state.model(parsed.model, parsed.version)
            if not parsed.images:
                raise invalid("expected at least one image in ClassifyRequest.images, got none")
            model.batcher.check_rows(len(parsed.images))  # before decoding any of them
            encoded = _encoded_count(model.info, parsed)
            held = self._hold(encoded * _row_bytes(model.info))
            try:
                rows = await self._rows(model, parsed, encoded)
                logits = await model.batcher.infer(rows, self.state.deadline(context))
                return _encode(
                    model, logits, parsed.top_k or DEFAULT_TOP_K, self.state.max_message_bytes
                )
            finally:
                self._held -= held

        return await self.state.run(context, request.model, work)

    def _hold(self, size: int) -> int:
        """Reserve ``size`` bytes of decoded rows (the caller gives them back);
        RESOURCE_EXHAUSTED when other calls hold too much. Runs on the event loop."""
        if self._held and self._held + size > MAX_HELD_DECODED_BYTES:
            raise ServeError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"expected room for {_mib(size)} MiB of decoded images, got other calls "
                f"holding {_mib(self._held)} of the server's {MAX_HELD_DECODED_BYTES >> 20} MiB; "
                "retry with backoff or send fewer images per call",
            )
        self._held += size
        return size

    async def _rows(self, model: Model, request: pb.ClassifyRequest, encoded: int) -> np.ndarray:
        """The request's images as float32 rows, decoded on decoder threads; INVALID_ARGUMENT
        at the encoded image that takes the call above ``MAX_SOURCE_PIXELS``, before it is
        decoded. Tensors alone are only copied: on the loop's default executor, so that they
        never wait behind other calls' images for a decoder thread (nor hold the loop: 65 536
        take 0.2 s)."""
        info, given = model.info, request.images
        max_pixels = self.state.max_image_pixels
        limit = max(MAX_SOURCE_PIXELS, max_pixels)
        spent = 0  # one slice at a time runs, so one thread at a time adds to it

        def spend(i: int, pixels: int) -> None:
            nonlocal spent
            spent += pixels
            if spent > limit:
                raise invalid(
                    f"expected encoded images of at most {limit} pixels in all per call, got "
                    f"{spent} by image {i} of {len(given)}; send fewer images per call or "
                    "smaller images"
                )

        # Else no call could go above it: its images are too few.
        counted = spend if encoded * max_pixels > limit else None
        rows = np.empty((len(given), *info.sample_shape), dtype=np.float32)

        def decode(i: int) -> None:
            rows[i] = _decode_one(info, given[i], i, max_pixels, counted)

        await _in_slices(self._decoder if encoded else None, decode, len(given))
        return rows


def handler(servicer: ClassifierServicer) -> grpc.GenericRpcHandler:
    """``servicer`` on ``/classifier.v1.Classifier/Classify``, with a deserializer that turns
    bytes that do not parse into INVALID_ARGUMENT instead of gRPC's UNKNOWN."""
    classify = grpc.unary_unary_rpc_method_handler(
        servicer.Classify,
        request_deserializer=deserializer(pb.ClassifyRequest),
        response_serializer=pb.ClassifyResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("classifier.v1.Classifier", {"Classify": classify})


async def _in_slices(executor: Executor | None, step: Callable[[int], None], count: int) -> None:
    """``step(i)`` for every i below ``count`` on ``executor``'s threads, as one task per
    ``DECODE_SLICE_S`` seconds or so, so that other calls' tasks run in between."""
    loop = asyncio.get_running_loop()
    abandoned = threading.Event()
    done = 0
    try:
        while done < count:
            done = await loop.run_in_executor(executor, _slice, step, done, count, abandoned)
    except asyncio.CancelledError:
        # gRPC cancels the call when the client goes away or its deadline passes; the
        # worker thread cannot be cancelled, so it stops at its next image instead of
        # decoding the rest of its slice for nobody.
        abandoned.set()
        raise


def _slice(step: Callable[[int], None], start: int, count: int, abandoned: threading.Event) -> int:
    """``step`` from ``start`` until ``count`` or ``DECODE_SLICE_S`` seconds (at least one
    step); returns where it stopped."""
    until = time.monotonic() + DECODE_SLICE_S
    i = start
    while i < count:
        if abandoned.is_set():
            raise ServeError(grpc.StatusCode.CANCELLED, "the call was cancelled while decoding")
        step(i)
        i += 1
        if time.monotonic() >= until:
            break
    return i


def _decode_one(
    info: ModelInfo,
    image: pb.Image,
    i: int,
    max_pixels: int,
    spend: Callable[[int, int], None] | None,
) -> np.ndarray:
    """Image ``i`` of a request as one float32 row; ``spend(i, pixels)`` is told each encoded
    image's size before it is decoded."""
    source = image.WhichOneof("source")
    if source == "encoded":
        counted = None if spend is None else functools.partial(spend, i)
        return images.decode(info, image.encoded, i, max_pixels, counted)
    if source != "tensor":
        raise invalid(f"expected image {i} to set encoded or tensor, got neither; set one")
    shape = tuple(image.tensor.shape)
    if shape != info.sample_shape:
        raise invalid(
            f"expected tensor {i} of shape {list(info.sample_shape)} for model "
            f"{info.name}, got {shown(list(shape))}; {_shape_hint(info, shape)}"
        )
    count = math.prod(info.sample_shape)
    if len(image.tensor.data) != count * 4:
        raise invalid(
            f"expected {count * 4} bytes of little-endian float32 in tensor {i}, got "
            f"{len(image.tensor.data)}; send product(shape) float32 values"
        )
    return np.frombuffer(image.tensor.data, dtype="<f4").reshape(shape)


def _mib(size: int) -> str:
    """Bytes in MiB, one decimal below 10 (a refused call of a few rows read "0 MiB")."""
    return f"{size / 2**20:.1f}" if size < 10 << 20 else str(size >> 20)


def _encoded_count(info: ModelInfo, request: pb.ClassifyRequest) -> int:
    """The request's encoded images; INVALID_ARGUMENT when their rows would take more than
    ``MAX_DECODED_BYTES``."""
    limit = max(1, MAX_DECODED_BYTES // _row_bytes(info))
    encoded = sum(1 for image in request.images if image.WhichOneof("source") == "encoded")
    if encoded > limit:
        raise invalid(
            f"expected at most {limit} encoded images per call to model {info.name} "
            f"({MAX_DECODED_BYTES >> 20} MiB once decoded to float32 "
            f"{list(info.sample_shape)}), got {encoded}; send them in several calls"
        )
    return encoded


def _row_bytes(info: ModelInfo) -> int:
    return 4 * math.prod(info.sample_shape)


def _shape_hint(info: ModelInfo, shape: tuple[int, ...]) -> str:
    sample = info.sample_shape
    if shape == (1, *sample):
        return "send one image without a batch axis"
    if len(sample) == 3 and shape == (*sample[1:], sample[0]):
        return "send channels first: transpose an [H, W, C] array with .transpose(2, 0, 1)"
    return "send one preprocessed image of that shape, without a batch axis"


def _encode(model: Model, logits: np.ndarray, k: int, limit: int) -> pb.ClassifyResponse:
    """The top ``k`` labels per row; RESOURCE_EXHAUSTED when the answer is above ``limit``."""
    info = model.info
    best = tensors.top_k(logits, k)
    probabilities = tensors.softmax(logits)
    results = []
    text = len(info.name)
    for row, (values, probs) in enumerate(zip(logits, probabilities, strict=True)):
        labels = [
            pb.Label(
                index=int(i), label=info.labels[i], score=float(probs[i]), logit=float(values[i])
            )
            for i in best[row]
        ]
        text += sum(len(label.label) for label in labels)
        results.append(pb.Classification(labels=labels))
    response = pb.ClassifyResponse(model=info.name, version=VERSION, results=results)
    # A label takes at most 4 bytes a character and 32 for its tags, index, score and logit.
    bound = 4 * text + 32 * best.size + 8 * len(results)
    check_answer_size(
        response,
        bound,
        limit,
        lambda: f"{len(results)} images of top {best.shape[1]}: send fewer images or ask for "
        "fewer labels",
    )
    return response
