"""Classify's decoding cost per call: source pixels bounded, decoder threads shared fairly."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from PIL import Image

from protos import classifier_pb2, classifier_pb2_grpc
from serve import classify, images
from serve.background import BackgroundServer


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _refused(stub: classifier_pb2_grpc.ClassifierStub, data: bytes, count: int) -> grpc.RpcError:
    request = classifier_pb2.ClassifyRequest(model="tiny", images=[{"encoded": data}] * count)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(request, timeout=60)
    return caught.value


def test_a_call_of_compressed_bombs_is_refused_at_the_image_past_the_bound(
    start_server: Callable[..., BackgroundServer],
    decoded: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 40-megapixel palette PNG of one colour is 5 KB and takes ~0.35 s to decode: one 64 MiB
    # call of them held a decoder thread for over an hour, each image within
    # --max-image-pixels. Shrunk here to a bound of 4 such images of 1 megapixel.
    monkeypatch.setattr(classify, "MAX_SOURCE_PIXELS", 4_000_000)
    server = start_server(max_image_pixels=1_000_000)
    bomb = _png(Image.new("P", (1000, 1000)))
    assert len(bomb) < 2_000
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        error = _refused(stub, bomb, 500)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            "expected encoded images of at most 4000000 pixels in all per call, got 5000000 by "
            "image 4 of 500; send fewer images per call or smaller images" in error.details()
        ), error.details()
        assert len(decoded) == 5  # the fifth refused from its header, before its pixels
        request = classifier_pb2.ClassifyRequest(model="tiny", images=[{"encoded": bomb}] * 4)
        assert len(stub.Classify(request, timeout=60).results) == 4


def test_the_source_pixel_bound_counts_every_encoded_image_of_a_call(
    start_server: Callable[..., BackgroundServer],
    monkeypatch: pytest.MonkeyPatch,
    decoded: list[int],
) -> None:
    # Shrunk to ten 8x8 images; tensors are not decoded and do not count.
    monkeypatch.setattr(classify, "MAX_SOURCE_PIXELS", 640)
    server = start_server(max_image_pixels=64)
    png = _png(Image.new("RGB", (8, 8), (200, 10, 10)))
    x = np.zeros((3, 8, 8), np.float32)
    tensor = classifier_pb2.Image(tensor=classifier_pb2.Tensor(shape=x.shape, data=x.tobytes()))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        request = classifier_pb2.ClassifyRequest(
            model="tiny", images=[{"encoded": png}] * 10 + [tensor] * 5
        )
        assert len(stub.Classify(request, timeout=30).results) == 15
        error = _refused(stub, png, 11)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 640 pixels in all per call, got 704 by image 10 of 11" in error.details()


def test_a_call_of_small_images_opens_each_once(
    shared_server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bound was first checked in a pass over every header before decoding: each image was
    # opened twice, ~20 % of the decoding of a call of small PNGs.
    opened: list[int] = []
    open_image = images.Image.open

    def counting_open(*args: object, **kwargs: object) -> object:
        opened.append(1)
        return open_image(*args, **kwargs)

    monkeypatch.setattr(images.Image, "open", counting_open)
    png = _png(Image.new("RGB", (8, 8), (0, 90, 0)))
    request = classifier_pb2.ClassifyRequest(model="tiny", images=[{"encoded": png}] * 64)
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        assert len(stub.Classify(request, timeout=60).results) == 64
    assert len(opened) == 64


def test_a_call_of_many_slow_images_does_not_hold_back_other_calls(
    start_server: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A call's images were decoded as one task of the decoder pool: a small call waited until
    # every image of the calls ahead of it was decoded (minutes for calls of large PNGs). Here
    # every decoder thread gets a call of 200 images of 20 ms each; the small call must be
    # answered before they are half done.
    server = start_server()
    assert server.server is not None
    threads = server.server._decoder._max_workers
    slow = [_png(Image.new("RGB", (8, 8), (n, 0, 0))) for n in range(threads)]
    small = _png(Image.new("RGB", (8, 8), (0, 0, 255)))
    slow_done: list[bytes] = []
    started = threading.Semaphore(0)
    decode = images.decode

    def slowed_decode(info: object, data: bytes, *args: object) -> np.ndarray:
        if data in slow:
            if data not in slow_done:
                started.release()
            slow_done.append(data)
            time.sleep(0.02)
        return decode(info, data, *args)

    monkeypatch.setattr(images, "decode", slowed_decode)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        calls = [
            stub.Classify.future(
                classifier_pb2.ClassifyRequest(model="tiny", images=[{"encoded": data}] * 200),
                timeout=60,
            )
            for data in slow
        ]
        try:
            for _ in slow:
                assert started.acquire(timeout=30)  # every decoder thread is on a slow call
            request = classifier_pb2.ClassifyRequest(model="tiny", images=[{"encoded": small}])
            assert len(stub.Classify(request, timeout=60).results) == 1
            count = len(slow_done)
            assert count < 100 * threads, count
        finally:
            for call in calls:
                call.cancel()
