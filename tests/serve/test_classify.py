"""serve/classify.py + serve/images.py: the Classifier API with encoded images and tensors."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps

from protos import classifier_pb2, classifier_pb2_grpc
from serve import images
from serve.background import BackgroundServer
from serve.errors import ServeError
from serve.model_info import read_model_info
from tests.serve.conftest import free_port
from tests.serve.procs import ServeProcess
from tests.serve.v2 import request_counts

Reference = Callable[[Path, np.ndarray], np.ndarray]


@pytest.fixture(scope="module")
def stub(shared_server: BackgroundServer):
    channel = grpc.insecure_channel(f"127.0.0.1:{shared_server.port}")
    yield classifier_pb2_grpc.ClassifierStub(channel)
    channel.close()


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _expected_input(data: bytes) -> np.ndarray:
    """The preprocessing the model's metadata asks for (mean 0.5, std 0.25, 8x8 RGB)."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return ((x - 0.5) / 0.25).astype(np.float32)


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; the pixel data is never reached."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_encoded_images_are_preprocessed_from_metadata(
    stub, classifier_path: Path, reference: Reference
) -> None:
    rng = np.random.default_rng(1)
    images = [
        _png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),  # already the input size
        _png(rng.integers(0, 256, (20, 13, 3), dtype=np.uint8)),  # resized
        _png(rng.integers(0, 256, (8, 8), dtype=np.uint8)),  # grey → RGB
        _png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "JPEG"),
    ]
    request = classifier_pb2.ClassifyRequest(model="tiny", top_k=3)
    for data in images:
        request.images.add(encoded=data)
    response = stub.Classify(request, timeout=30)
    expected = reference(classifier_path, np.stack([_expected_input(d) for d in images]))
    assert response.model == "tiny" and response.version == "1"
    assert len(response.results) == len(images)
    for result, logits in zip(response.results, expected, strict=True):
        order = np.argsort(-logits, kind="stable")[:3]
        assert [label.index for label in result.labels] == list(order)
        assert [label.label for label in result.labels] == [f"label{i}" for i in order]
        np.testing.assert_allclose(
            [label.logit for label in result.labels], logits[order], atol=1e-4
        )
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(
            [label.score for label in result.labels], probs[order], atol=1e-5
        )


def test_tensors_and_default_top_k(stub, classifier_path: Path, reference: Reference) -> None:
    x = np.random.default_rng(2).normal(size=(3, 3, 8, 8)).astype(np.float32)
    request = classifier_pb2.ClassifyRequest(model="tiny")  # top_k 0 → 5
    for row in x:
        request.images.add(tensor=classifier_pb2.Tensor(shape=row.shape, data=row.tobytes()))
    response = stub.Classify(request, timeout=30)
    expected = reference(classifier_path, x)
    for result, logits in zip(response.results, expected, strict=True):
        assert len(result.labels) == 5
        assert result.labels[0].index == int(np.argmax(logits))


def _classify_error(stub, *images: classifier_pb2.Image, model: str = "tiny") -> grpc.RpcError:
    request = classifier_pb2.ClassifyRequest(model=model, images=list(images))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(request, timeout=30)
    return caught.value


def test_bad_images_are_invalid_argument(stub) -> None:
    good = _png(np.zeros((8, 8, 3), dtype=np.uint8))
    cases = {
        "undecodable": b"this is not an image",
        "truncated": _png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))[:300],
        "bomb": _bomb_png(20000, 20000),
        "above the pixel limit": _bomb_png(10000, 5000),
    }
    for name, data in cases.items():
        error = _classify_error(
            stub, classifier_pb2.Image(encoded=good), classifier_pb2.Image(encoded=data)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "image 1" in error.details(), name


# A 2x2 TIFF with one byte changed, found by fuzzing: Pillow's TIFF plugin raised TypeError
# ('IFDRational' object cannot be interpreted as an integer) on it, which became INTERNAL.
_FUZZED_TIFF = bytes.fromhex(
    "49492a00080000000a0000010400010000000200000001010400010000000200000002010300030000008600"
    "000003010300010000000100000006010300010000000200000011010500010000008c000000150103000100"
    "00000300000016010400010000000200000017010400010000000c0000001c01030001000000010000000000"
    "0000080008000800a2440a04cfe89aba8aeed076"
)


def _dds(flags: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4)).save(buffer, format="DDS")
    data = bytearray(buffer.getvalue())
    data[80:84] = flags  # the pixel format's flags: Pillow raised NotImplementedError on these
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (_FUZZED_TIFF, "none of these formats"),
        (_dds(b"\0\0\0\xff"), "none of these formats"),
        (b"GIF89a" + b"\xff" * 40, "GIF"),
    ],
    ids=["fuzzed-tiff", "fuzzed-dds", "broken-gif"],
)
def test_only_common_formats_are_decoded_and_their_errors_are_invalid_argument(
    stub, data: bytes, said: str
) -> None:
    error = _classify_error(stub, classifier_pb2.Image(encoded=data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert said in error.details() and "image 0" in error.details()


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP"])
def test_gif_bmp_and_webp_are_decoded_too(stub, fmt: str) -> None:
    data = _png(np.full((8, 8, 3), 128, dtype=np.uint8), fmt=fmt)
    answer = stub.Classify(
        classifier_pb2.ClassifyRequest(model="tiny", images=[classifier_pb2.Image(encoded=data)]),
        timeout=30,
    )
    assert len(answer.results) == 1


def test_a_decoder_error_of_any_type_is_invalid_argument(
    classifier_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow's plugins raise what they meet on malformed bytes (NotImplementedError in DDS,
    # AttributeError in SPIDER); whatever the type, the image is the client's to fix.
    info = read_model_info("tiny", classifier_path)
    data = _png(np.zeros((8, 8, 3), dtype=np.uint8))

    def broken(*args: object) -> Image.Image:
        raise NotImplementedError("Unknown pixel format flags 4278190080")

    monkeypatch.setattr(Image.Image, "convert", broken)
    with pytest.raises(ServeError) as caught:
        images.decode(info, data, 3, 1_000_000)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 3" in caught.value.message and "NotImplementedError" in caught.value.message


def test_bad_tensors_and_requests(stub) -> None:
    ok = np.zeros((3, 8, 8), dtype=np.float32)
    wrong_shape = classifier_pb2.Tensor(shape=[3, 8, 9], data=np.zeros(216, np.float32).tobytes())
    short = classifier_pb2.Tensor(shape=[3, 8, 8], data=ok.tobytes()[:-4])
    for tensor in (wrong_shape, short):
        error = _classify_error(stub, classifier_pb2.Image(tensor=tensor))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _classify_error(stub).code() == grpc.StatusCode.INVALID_ARGUMENT  # zero images
    assert _classify_error(stub, classifier_pb2.Image()).code() == grpc.StatusCode.INVALID_ARGUMENT
    tensor = classifier_pb2.Tensor(shape=[3, 8, 8], data=ok.tobytes())
    error = _classify_error(stub, classifier_pb2.Image(tensor=tensor), model="nope")
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_bomb_is_refused_before_decoding(stub) -> None:
    # 20000 x 20000 RGBA would take 1.6 GB; the refusal must come from the header alone.
    data = _bomb_png(20000, 20000)
    assert len(data) < 2000
    error = _classify_error(stub, classifier_pb2.Image(encoded=data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resize" in error.details()


def test_a_pixel_limit_above_pillows_own_is_the_one_that_counts(
    classifier_path: Path, tmp_path: Path
) -> None:
    # Pillow refuses headers above ~179M pixels by itself; with --max-image-pixels above that,
    # such an image used to be refused anyway, blaming Pillow. Now only the server's limit
    # counts: this header passes it and the (missing) pixel data is what fails. A process of
    # its own: python -m serve switches Pillow's limit off for the whole process.
    port = free_port()
    args = [str(classifier_path), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--device", "cpu", "--max-image-pixels", "300000000"]
    with (
        ServeProcess(args, port, tmp_path / "serve.log") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        error = _classify_error(stub, classifier_pb2.Image(encoded=_bomb_png(15000, 15000)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "to be a complete PNG, JPEG" in error.details(), error.details()
        error = _classify_error(stub, classifier_pb2.Image(encoded=_bomb_png(20000, 20000)))
        assert "expected images of at most 300000000 pixels" in error.details()


def test_more_images_than_a_request_may_hold_are_refused_before_decoding(
    start_server: Callable[..., BackgroundServer], decoded: list[int]
) -> None:
    server = start_server(max_queue_size=2, max_batch_size=4)  # at most 8 rows per request
    png = _png(np.zeros((8, 8, 3), np.uint8))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        error = _classify_error(stub, *[classifier_pb2.Image(encoded=png)] * 9)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected at most 8 rows per request to model tiny" in error.details()
        assert decoded == []
        request = classifier_pb2.ClassifyRequest(model="tiny", images=[{"encoded": png}] * 8)
        assert len(stub.Classify(request, timeout=30).results) == 8
        assert len(decoded) == 8


def test_bytes_that_do_not_parse_are_invalid_argument(shared_server: BackgroundServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        classify = channel.unary_unary("/classifier.v1.Classifier/Classify")
        with pytest.raises(grpc.RpcError) as caught:
            classify(b"\xff\xff\xff\x01not a protobuf", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected a serialized ClassifyRequest" in caught.value.details()


def _classify(stub, *datas: bytes, model: str = "tiny") -> classifier_pb2.ClassifyResponse:
    images = [classifier_pb2.Image(encoded=d) for d in datas]
    request = classifier_pb2.ClassifyRequest(model=model, images=images, top_k=100)
    return stub.Classify(request, timeout=30)


def _logits(result: classifier_pb2.Classification) -> np.ndarray:
    out = np.zeros(len(result.labels), np.float32)
    for label in result.labels:
        out[label.index] = label.logit
    return out


def test_16_bit_grey_png_is_scaled_not_clipped(
    stub, classifier_path: Path, reference: Reference
) -> None:
    # Pillow opens it as I;16 (as I before 10.3), and its convert("RGB") clips at 255: all but
    # black went white.
    grey = np.random.default_rng(3).integers(0, 65536, (12, 10), dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode in ("I;16", "I")
    (result,) = _classify(stub, buffer.getvalue()).results
    small = Image.fromarray(grey.astype(np.float32)).resize((8, 8), Image.Resampling.BILINEAR)
    x = np.repeat(np.asarray(small)[None] / 65535.0, 3, axis=0)
    expected = reference(classifier_path, ((x - 0.5) / 0.25).astype(np.float32)[None])[0]
    np.testing.assert_allclose(_logits(result), expected, atol=1e-4)


# What ImageOps.exif_transpose does to show each EXIF orientation upright, and its inverse:
# how a camera stores an upright scene under that tag.
_STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _with_orientation(image: Image.Image, orientation: int, fmt: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_is_applied_so_phone_photos_are_classified_upright(
    stub, classifier_path: Path, reference: Reference
) -> None:
    upright = Image.fromarray(np.random.default_rng(4).integers(0, 256, (8, 16, 3), np.uint8))
    stored = [_with_orientation(upright.transpose(_STORED[o]), o) for o in sorted(_STORED)]
    response = _classify(stub, _png(np.asarray(upright)), *stored)
    first = _logits(response.results[0])
    for orientation, result in zip(sorted(_STORED), response.results[1:], strict=True):
        np.testing.assert_allclose(_logits(result), first, atol=1e-5, err_msg=str(orientation))
    # A JPEG from a phone held upright: the sensor's landscape pixels, tagged "rotate 90° CW".
    jpeg = _with_orientation(upright.transpose(Image.Transpose.ROTATE_90), 6, "JPEG")
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg)))
    (result,) = _classify(stub, jpeg).results
    expected = reference(classifier_path, _expected_input(_png(np.asarray(shown)))[None])[0]
    np.testing.assert_allclose(_logits(result), expected, atol=1e-4)


def test_transparent_palette_png_keeps_its_colours_without_a_pillow_warning(
    stub, classifier_path: Path, reference: Reference, recwarn: pytest.WarningsRecorder
) -> None:
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgba).quantize(16).save(buffer, format="PNG")  # tRNS with 16 alphas
    data = buffer.getvalue()
    (result,) = _classify(stub, data).results
    # Alpha dropped, as torchvision's loader drops it (convert("RGB")): the palette's colours.
    with Image.open(io.BytesIO(data)) as image:
        colours = np.asarray(image.convert("RGBA").convert("RGB"))
    expected = reference(classifier_path, _expected_input(_png(colours))[None])[0]
    np.testing.assert_allclose(_logits(result), expected, atol=1e-4)
    assert not [w for w in recwarn if "Palette images" in str(w.message)]


def test_a_call_of_tiny_images_that_would_decode_to_gigabytes_is_refused_first(
    start_server: Callable[..., BackgroundServer],
    make_classifier: Callable[..., Path],
    tmp_path: Path,
    decoded: list[int],
) -> None:
    # Each 43-byte GIF becomes a 3x224x224 float32 row (588 KiB): 1784 of them pass 1 GiB.
    # The server used to decode them all first (a 64 MiB message of them: MemoryError, INTERNAL).
    server = start_server(models=(make_classifier(tmp_path / "big.onnx", size=224),))
    gif = io.BytesIO()
    Image.new("L", (1, 1)).save(gif, format="GIF")
    limit = 2**30 // (3 * 224 * 224 * 4)  # docs/serving.md: 1 GiB of decoded rows per call
    request = classifier_pb2.ClassifyRequest(model="big")
    request.images.extend([classifier_pb2.Image(encoded=gif.getvalue())] * (limit + 1))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    with channel, pytest.raises(grpc.RpcError) as caught:
        classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"expected at most {limit} encoded images per call" in caught.value.details()
    assert decoded == []


def test_a_channels_last_tensor_is_told_to_transpose(stub) -> None:
    hwc = np.zeros((8, 8, 3), np.float32)
    tensor = classifier_pb2.Tensor(shape=hwc.shape, data=hwc.tobytes())
    error = _classify_error(stub, classifier_pb2.Image(tensor=tensor))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "got [8, 8, 3]; send channels first" in error.details()
    batched = classifier_pb2.Tensor(shape=[1, 3, 8, 8], data=np.zeros(192, np.float32).tobytes())
    error = _classify_error(stub, classifier_pb2.Image(tensor=batched))
    assert "send one image without a batch axis" in error.details()


def test_images_decode_on_one_thread_per_usable_cpu(shared_server: BackgroundServer) -> None:
    # The executor's default (CPUs + 4, up to 32) held more ~250 MB decodes at once for no speed.
    usable = len(os.sched_getaffinity(0))
    assert shared_server.server._decoder._max_workers == usable


def test_an_answer_above_the_message_limit_is_resource_exhausted_in_words(
    start_server: Callable[..., BackgroundServer],
    make_classifier: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """gRPC's own refusal ("Sent message larger than max") was counted as a success."""
    wide = make_classifier(tmp_path / "wide.onnx", classes=8192)
    server = start_server(models=(wide,), max_message_bytes=64 * 1024)
    x = np.random.default_rng(5).normal(size=(3, 8, 8)).astype(np.float32)
    image = classifier_pb2.Image(tensor=classifier_pb2.Tensor(shape=x.shape, data=x.tobytes()))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        request = classifier_pb2.ClassifyRequest(model="wide", images=[image], top_k=8192)
        with pytest.raises(grpc.RpcError) as caught:  # ~200 KB of labels
            stub.Classify(request, timeout=30)
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 images of top 8192: send fewer images or ask for fewer labels" in (
            error.details()
        )
        request = classifier_pb2.ClassifyRequest(model="wide", images=[image], top_k=5)
        assert len(stub.Classify(request, timeout=30).results[0].labels) == 5
    assert server.server is not None and server.server.metrics is not None
    counts = request_counts(server.server.metrics.render().decode())
    assert (counts[("wide", "success")], counts[("wide", "rejected")]) == (1, 1)


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_call_given_up_on_stops_decoding_its_images(
    start_server: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The server used to decode every image of a call whose client had gone or whose deadline
    # had passed: a decoder thread held for nobody (seconds for a call of large photos, and
    # again for each retry). The first decode is held until the call is over on the server.
    started, release = threading.Event(), threading.Event()
    decodes: list[int] = []
    decode = images.decode

    def held_decode(*args: object) -> np.ndarray:
        decodes.append(1)
        started.set()
        release.wait(30)
        return decode(*args)

    monkeypatch.setattr(images, "decode", held_decode)
    server = start_server()
    assert server.server is not None
    png = _png(np.zeros((8, 8, 3), np.uint8))
    request = classifier_pb2.ClassifyRequest(model="tiny", images=[{"encoded": png}] * 20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            classify = classifier_pb2_grpc.ClassifierStub(channel).Classify
            if how == "deadline":
                with pytest.raises(grpc.RpcError) as caught:
                    classify(request, timeout=0.5)
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                call = classify.future(request, timeout=30)
                assert started.wait(30)
                call.cancel()
            state = server.server.state
            until = time.monotonic() + 30
            while state.in_flight and time.monotonic() < until:  # the server ends the call
                time.sleep(0.01)
            assert state.in_flight == 0
    finally:
        release.set()
    server.server._decoder.shutdown(wait=True)  # every decode that was going to run has run
    assert len(decodes) == 1


def test_tensors_do_not_wait_behind_other_calls_images(
    start_server: Callable[..., BackgroundServer],
) -> None:
    # Tensor-only calls used to queue for a decoder thread too: behind two calls of 80 large
    # PNGs, a one-tensor call waited 3.7 s. Here every decoder thread is held meanwhile.
    server = start_server()
    assert server.server is not None
    decoder = server.server._decoder
    release = threading.Event()
    held = [decoder.submit(release.wait, 60) for _ in range(decoder._max_workers)]
    x = np.zeros((3, 8, 8), np.float32)
    image = classifier_pb2.Image(tensor=classifier_pb2.Tensor(shape=x.shape, data=x.tobytes()))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            request = classifier_pb2.ClassifyRequest(model="tiny", images=[image, image])
            assert len(stub.Classify(request, timeout=20).results) == 2
    finally:
        release.set()
    assert all(h.result(30) for h in held)
