"""Classify at its edges: preprocessing round trips, empty images, decoded rows across calls."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from PIL import Image

from protos import classifier_pb2, classifier_pb2_grpc
from serve import classify, images
from serve.background import BackgroundServer


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _as_tensor(data: bytes) -> classifier_pb2.Image:
    """``data`` preprocessed as a torchvision user would (convert("RGB"), ToTensor, Normalize
    with the test model's mean 0.5 and std 0.25), as a Classify tensor; already 8x8."""
    with Image.open(io.BytesIO(data)) as image:
        x = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    x = ((x - np.float32(0.5)) / np.float32(0.25)).astype(np.float32)
    return classifier_pb2.Image(tensor=classifier_pb2.Tensor(shape=x.shape, data=x.tobytes()))


_PIXELS = np.random.default_rng(7).integers(0, 256, (8, 8, 4), dtype=np.uint8)
_IMAGES = {
    "rgb-png": _encode(Image.fromarray(_PIXELS[..., :3]), "PNG"),
    "grey-png": _encode(Image.fromarray(_PIXELS[..., 0]), "PNG"),
    "rgba-png": _encode(Image.fromarray(_PIXELS), "PNG"),
    "palette-png": _encode(Image.fromarray(_PIXELS[..., :3]).quantize(32), "PNG"),
    "cmyk-jpeg": _encode(Image.fromarray(_PIXELS).convert("CMYK"), "JPEG"),
    "progressive-jpeg": _encode(Image.fromarray(_PIXELS[..., :3]), "JPEG", progressive=True),
    "lossless-webp": _encode(Image.fromarray(_PIXELS[..., :3]), "WEBP", lossless=True),
    "bmp": _encode(Image.fromarray(_PIXELS[..., :3]), "BMP"),
}


@pytest.mark.parametrize("name", sorted(_IMAGES))
def test_an_image_at_the_input_size_gives_the_logits_of_its_torchvision_tensor(
    shared_server: BackgroundServer, name: str
) -> None:
    data = _IMAGES[name]
    request = classifier_pb2.ClassifyRequest(
        model="tiny", images=[classifier_pb2.Image(encoded=data), _as_tensor(data)], top_k=5
    )
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        answer = classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    encoded, tensor = ([(lab.index, lab.logit) for lab in r.labels] for r in answer.results)
    assert encoded == tensor  # bit for bit: the same float32 operations in the same order


def test_empty_image_bytes_are_named_as_empty(shared_server: BackgroundServer) -> None:
    # An empty file read by the client was "bytes in none of these formats; convert it".
    good = classifier_pb2.Image(encoded=_IMAGES["rgb-png"])
    request = classifier_pb2.ClassifyRequest(
        model="tiny", images=[good, classifier_pb2.Image(encoded=b"")]
    )
    with (
        grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected image 1 to be a PNG" in caught.value.details()
    assert "got 0 bytes" in caught.value.details()


def test_decoded_rows_held_across_calls_are_bounded(
    start_server: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each call may decode up to 1 GiB of rows, but nothing bounded them across calls: 40
    # concurrent calls of 1783 tiny GIFs (77 KB each) held 40 GiB at 3x224x224. The budget is
    # shrunk here to three 3x8x8 rows; the first call's decoding is held while a second asks.
    row = 3 * 8 * 8 * 4
    monkeypatch.setattr(classify, "MAX_HELD_DECODED_BYTES", 3 * row, raising=False)
    started, release = threading.Event(), threading.Event()
    decode = images.decode

    def held_decode(*args: object) -> np.ndarray:
        started.set()
        release.wait(30)
        return decode(*args)

    monkeypatch.setattr(images, "decode", held_decode)
    server = start_server()
    png = classifier_pb2.Image(encoded=_IMAGES["rgb-png"])
    two = classifier_pb2.ClassifyRequest(model="tiny", images=[png, png])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        classify_call = classifier_pb2_grpc.ClassifierStub(channel).Classify
        first = classify_call.future(two, timeout=30)
        try:
            assert started.wait(30)
            with pytest.raises(grpc.RpcError) as caught:
                classify_call(two, timeout=5)
        finally:
            release.set()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry with backoff or send fewer images per call" in caught.value.details()
        assert len(first.result().results) == 2
        assert len(classify_call(two, timeout=30).results) == 2  # the first gave its bytes back


def test_an_image_the_server_has_no_memory_to_decode_is_resource_exhausted(
    start_server: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow or numpy running out of memory mid-decode was answered INTERNAL, "a bug: please
    # report it", where the client should back off and retry.
    def no_memory(*args: object) -> np.ndarray:
        raise MemoryError

    monkeypatch.setattr(images, "_pixels", no_memory)
    server = start_server()
    request = classifier_pb2.ClassifyRequest(
        model="tiny", images=[classifier_pb2.Image(encoded=_IMAGES["rgb-png"])]
    )
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert "expected memory to decode image 0" in caught.value.details()
