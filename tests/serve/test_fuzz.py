"""Every RPC fed structurally valid but hostile or odd messages, built by a seeded mutation
fuzzer: each gets a status a client can act on (never INTERNAL or UNKNOWN) with a message that
says what was expected and what came, the log holds no error, and a good request sent after
each round still gets the right answer."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from protos import classifier_pb2, kserve_pb2
from serve.background import BackgroundServer
from tests.serve.v2 import INFER, infer_payload, reply_logits, request_counts

_KSERVE = "/inference.GRPCInferenceService/"
_CLASSIFY = "/classifier.v1.Classifier/Classify"
_STREAM = _KSERVE + "ModelStreamInfer"
_REFLECTION = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
_SAMPLE = (3, 8, 8)  # the shared tiny classifier's input: [rows, 3, 8, 8] → 5 classes
_DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
    "FP32", "FP64", "BYTES", "BF16", "fp32", "", "FP32 ", "FLOAT", "\u00e9", "x" * 500,
)  # fmt: skip
_DIMS = (0, -1, -2, 1, 3, 8, 9, 2**31, 2**62, 2**63 - 1, -(2**63))
_KEYS = (
    "classification", "timeout", "priority", "binary_data", "sequence_id", "sequence_start",
    "binary_data_size", "shared_memory_region", "shared_memory_byte_size", "", "é" * 10,
    "k" * 3000,
)  # fmt: skip
_TEXTS = ("", "1", "01", "0", "2", "-1", "1.0", " 1", "+1", "1\n", "\u0661", "\x00", "v" * 5000)
_CONTENTS = (
    "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
    "fp64_contents", "bytes_contents",
)  # fmt: skip
# What a value of each typed contents field looks like.
_VALUES = {"bool_contents": [True], "bytes_contents": [b"ab"], "fp64_contents": [1.5]}


def _parameter(rng: random.Random) -> kserve_pb2.InferParameter:
    """An InferParameter of any type, or of none."""
    param = kserve_pb2.InferParameter()
    choice = rng.randrange(6)
    if choice == 0:
        param.bool_param = rng.random() < 0.5
    elif choice == 1:
        param.int64_param = rng.choice((0, 1, -1, 3, 6, 2**63 - 1, -(2**63)))
    elif choice == 2:
        param.string_param = rng.choice(_TEXTS)
    elif choice == 3:
        param.double_param = rng.choice((0.0, 2.0, 2.5, float("nan"), float("inf"), -1e300))
    elif choice == 4:
        param.uint64_param = rng.choice((0, 3, 2**63, 2**64 - 1))
    return param


def _good_infer(rng: random.Random) -> tuple[kserve_pb2.ModelInferRequest, np.ndarray]:
    batch = np.random.default_rng(rng.randrange(1 << 30)).normal(size=(rng.randint(1, 3), *_SAMPLE))
    request = kserve_pb2.ModelInferRequest(model_name="tiny", id="fuzz")
    request.inputs.add(name="input", datatype="FP32", shape=list(batch.shape))
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    return request, batch


def _mutated_infer(rng: random.Random) -> bytes:
    """A ModelInferRequest with one to four fields made odd."""
    request, batch = _good_infer(rng)
    for _ in range(rng.randint(1, 4)):
        tensor = request.inputs[0] if request.inputs else request.inputs.add(name="input")
        raw = request.raw_input_contents
        kind = rng.randrange(18)
        if kind == 0:
            tensor.shape[:] = [rng.choice(_DIMS) for _ in range(rng.randint(0, 6))]
        elif kind == 1 and tensor.shape:
            tensor.shape[rng.randrange(len(tensor.shape))] = rng.choice(_DIMS)
        elif kind == 2:
            tensor.datatype = rng.choice(_DATATYPES)
        elif kind == 3:
            raw.append(rng.choice((b"", bytes(5), batch.astype("<f4").tobytes())))
        elif kind == 4 and raw:
            cut = len(raw[0]) + rng.choice((-1, -4, 1, 4))
            raw[0] = (raw[0] + bytes(4))[: max(0, cut)]
        elif kind == 5:
            del raw[:]
        elif kind == 6:  # typed values too, one off or right
            values = batch.ravel().tolist()
            count = rng.choice((len(values), len(values) - 1, len(values) + 1))
            tensor.contents.fp32_contents.extend((values * 2)[:count])
        elif kind == 7:
            field = rng.choice(_CONTENTS)
            getattr(tensor.contents, field).extend(_VALUES.get(field, [1, 2]))
        elif kind == 8:
            request.parameters[rng.choice(_KEYS)].CopyFrom(_parameter(rng))
        elif kind == 9:
            tensor.parameters[rng.choice(_KEYS)].CopyFrom(_parameter(rng))
        elif kind == 10:  # an output, maybe unknown, maybe again, with any parameter
            output = request.outputs.add(name=rng.choice(("logits", "logits", "probs", "")))
            key = rng.choice(("classification", "classification", *_KEYS))
            output.parameters[key].CopyFrom(_parameter(rng))
        elif kind == 11:
            request.model_version = rng.choice(_TEXTS)
        elif kind == 12:
            request.model_name = rng.choice(("", "TINY", "tiny ", "n" * 20000, "tiny\x00"))
        elif kind == 13:
            request.id = rng.choice(("", "i" * 100_000, "\u2603" * 1000, "\x00"))
        elif kind == 14:
            request.inputs.add().CopyFrom(tensor)
        elif kind == 15:
            del request.inputs[:]
        elif kind == 16:
            tensor.name = rng.choice(("", "INPUT", "input0"))
        elif kind == 17 and raw:  # values the model takes: NaN, Inf, the float32 maximum
            values = batch.astype("<f4")
            values.flat[0] = rng.choice((np.nan, np.inf, -np.inf, 3.4e38))
            raw[0] = values.tobytes()
    data = request.SerializeToString()
    if rng.random() < 0.05:
        data = b"\x0a\x02\xff\xfe" + data  # a model name that is not UTF-8
    return data


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = b""
    while value > 0x7F:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def _mutated_classify(rng: random.Random) -> bytes:
    """A ClassifyRequest with odd images, top_k, model or version."""
    request = classifier_pb2.ClassifyRequest(model="tiny")
    row = bytes(4 * int(np.prod(_SAMPLE)))
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        image = request.images.add()
        kind = rng.randrange(6)
        if kind == 0:
            image.tensor.shape.extend(_SAMPLE)
            image.tensor.data = row[: rng.choice((len(row), len(row) - 1, 4, 0))]
        elif kind == 1:
            shapes = ([], [0], [1, *_SAMPLE], [8, 8, 3], [3, 8, -8], [3, 2**40, 8], [192])
            image.tensor.shape.extend(rng.choice(shapes))
            image.tensor.data = row
        elif kind == 2:
            image.encoded = rng.choice((b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff"))
        elif kind == 3:
            pass  # neither source
        elif kind == 4:  # both, the tensor last: protobuf keeps the last of a oneof
            image.encoded = b"not an image"
            image.tensor.shape.extend(_SAMPLE)
            image.tensor.data = row
        else:  # both, the bytes last
            image.tensor.shape.extend(_SAMPLE)
            image.tensor.data = row
            image.encoded = b"not an image"
    if rng.random() < 0.5:
        request.top_k = rng.choice((0, 1, 5, 6, 2**31, 2**32 - 1))
    if rng.random() < 0.2:
        request.version = rng.choice(_TEXTS)
    if rng.random() < 0.1:
        request.model = rng.choice(("", "nope", "m" * 5000))
    data = request.SerializeToString()
    if rng.random() < 0.15:  # top_k of -1, -5 or 2**40 on the wire: uint32 keeps the low bits
        data += b"\x20" + _varint(rng.choice((-1, -5, 2**40)))
    return data


def _mutated_metadata(rng: random.Random) -> tuple[str, bytes]:
    """A KServe metadata call with an odd name and version, or bytes that may not parse."""
    method = rng.choice((
        "ModelMetadata", "ModelConfig", "ModelReady", "ModelStatistics", "RepositoryIndex",
        "ServerLive", "ServerReady", "ServerMetadata",
    ))  # fmt: skip
    name = rng.choice(("tiny", "", "nope", "n" * 20000, "\u00e9"))
    if method == "RepositoryIndex":
        data = kserve_pb2.RepositoryIndexRequest(repository_name=name).SerializeToString()
    elif method.startswith("Model"):
        message = getattr(kserve_pb2, f"{method}Request")
        data = message(name=name, version=rng.choice(_TEXTS)).SerializeToString()
    else:
        data = rng.choice((b"", b"\x0a\x01x", b"\xff"))
    return _KSERVE + method, data


def _reflection_requests(rng: random.Random) -> Iterator[bytes]:
    for _ in range(rng.randint(1, 3)):
        request = reflection_pb2.ServerReflectionRequest(host=rng.choice(("", "h" * 3000)))
        kind = rng.randrange(5)
        if kind == 0:
            request.list_services = rng.choice(("", "*"))
        elif kind == 1:
            request.file_by_filename = rng.choice(("", "nope.proto", "f" * 10000))
        elif kind == 2:
            request.file_containing_symbol = rng.choice(
                ("", ".", "a..b", "inference.GRPCInferenceService.ModelInfer", "s" * 10000)
            )
        elif kind == 3:
            request.file_containing_extension.containing_type = "inference.ModelInferRequest"
            request.file_containing_extension.extension_number = rng.choice((0, -1, 2**31 - 1))
        else:
            request.all_extension_numbers_of_type = rng.choice(("", "nope"))
        yield request.SerializeToString()


def _says_what(details: str) -> bool:
    return "expected" in details and "got" in details


def _fuzz_round(channel: grpc.Channel, rng: random.Random, problems: list[str]) -> None:
    """One hostile call of a random kind; what a client could not act on goes to ``problems``."""
    kind = rng.choice(("infer", "infer", "classify", "classify", "meta", "stream", "other"))
    try:
        if kind == "infer":
            channel.unary_unary(INFER)(_mutated_infer(rng), timeout=30)
        elif kind == "classify":
            channel.unary_unary(_CLASSIFY)(_mutated_classify(rng), timeout=30)
        elif kind == "meta":
            kind, data = _mutated_metadata(rng)
            channel.unary_unary(kind)(data, timeout=30)
        elif kind == "stream":
            messages = [_mutated_infer(rng) for _ in range(rng.randint(1, 4))]
            for reply in channel.stream_stream(_STREAM)(iter(messages), timeout=30):
                error = kserve_pb2.ModelStreamInferResponse.FromString(reply).error_message
                if error and ("internal" in error.lower() or not _says_what(error)):
                    problems.append(f"stream: {error}")
        elif rng.random() < 0.5:
            kind = rng.choice(_REFLECTION)
            for reply in channel.stream_stream(kind)(_reflection_requests(rng), timeout=30):
                answer = reflection_pb2.ServerReflectionResponse.FromString(reply)
                if answer.error_response.error_code in (2, 13):  # UNKNOWN, INTERNAL
                    problems.append(f"{kind}: {answer.error_response}")
        else:
            kind = "/grpc.health.v1.Health/Check"
            service = rng.choice(("", "tiny", "s" * 20000))
            data = health_pb2.HealthCheckRequest(service=service).SerializeToString()
            channel.unary_unary(kind)(rng.choice((data, data, b"\x0a\x01\xff")), timeout=30)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        bad_code = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        # grpc_health's stock Check answers an unknown service NOT_FOUND without a message.
        vague = (
            code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            and not _says_what(details)
            and not kind.startswith("/grpc.health")
        )
        if bad_code or vague:
            problems.append(f"{kind}: {code.name} {details[:200]!r}")


def _good_infer_is_right(
    channel: grpc.Channel, rng: random.Random, model: Path, reference: Callable
) -> None:
    request, batch = _good_infer(rng)
    reply = channel.unary_unary(INFER)(request.SerializeToString(), timeout=30)
    request_id, logits = reply_logits(reply)
    assert request_id == "fuzz"
    np.testing.assert_allclose(
        logits, reference(model, batch.astype(np.float32)), rtol=1e-4, atol=1e-5
    )


def test_hostile_messages_to_every_rpc_get_statuses_that_say_what_to_fix(
    shared_server: BackgroundServer,
    classifier_path: Path,
    reference: Callable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random(20261123)
    caplog.set_level(logging.WARNING)
    problems: list[str] = []
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        for _ in range(12):
            for _ in range(30):
                _fuzz_round(channel, rng, problems)
            _good_infer_is_right(channel, rng, classifier_path, reference)
    assert problems == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_a_unary_call_closed_without_its_message_is_counted_as_invalid(
    shared_server: BackgroundServer,
) -> None:
    # It was answered INVALID_ARGUMENT but left out of serve_requests_total, which every other
    # refused inference call is in (under "_unknown" when it names no model).
    assert shared_server.server is not None
    metrics = shared_server.server.metrics

    def invalid_unknown() -> float:
        return request_counts(metrics.render().decode()).get(("_unknown", "invalid"), 0.0)

    before = invalid_unknown()
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        for method in (INFER, _CLASSIFY, _KSERVE + "ServerLive"):
            with pytest.raises(grpc.RpcError) as caught:
                channel.stream_unary(method)(iter(()), timeout=20)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid_unknown() == before + 2  # the two inference calls; ServerLive is none


def test_refusals_of_calls_whose_deadline_passed_log_no_error(
    shared_server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A request refused just as its deadline passed: grpc.aio found the call already ended
    # when the INVALID_ARGUMENT went out and logged "ExecuteBatchError raised in core" with a
    # traceback, a few times in every thousand such calls. Converting the values takes long
    # enough for deadlines of a millisecond or two to land on it.
    request = kserve_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=[1, *_SAMPLE])
    request.inputs[0].contents.fp32_contents.extend([0.0] * 200_000)  # not 192: refused
    payload = request.SerializeToString()
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        infer = channel.unary_unary(INFER)
        for _ in range(3):
            calls = [infer.future(payload, timeout=0.0003 * (1 + i % 20)) for i in range(2000)]
            for call in calls:
                with pytest.raises(grpc.RpcError):
                    call.result()
        reply = infer(infer_payload("tiny", np.zeros((1, *_SAMPLE), np.float32), "ok"), timeout=30)
    assert reply_logits(reply)[0] == "ok"
    # The refused calls' tasks have ended and logged what they would.
    shared_server.call(lambda: asyncio.sleep(0.5))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
