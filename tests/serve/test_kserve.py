"""serve/kserve.py: the KServe v2 service through the official tritonclient.grpc client."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from protos import kserve_pb2
from serve.background import BackgroundServer
from tests.serve.v2 import request_counts

Reference = Callable[[Path, np.ndarray], np.ndarray]


@pytest.fixture(scope="module")
def triton(shared_server: BackgroundServer) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(f"127.0.0.1:{shared_server.port}")


def _input(array: np.ndarray, name: str = "input", datatype: str = "FP32") -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _status(error: InferenceServerException) -> str:
    return error.status()


def test_server_and_model_metadata(triton: tc.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("tiny")
    assert triton.is_model_ready("tiny", "1")
    assert not triton.is_model_ready("nope")
    server = triton.get_server_metadata()
    # perf_analyzer asks ModelStatistics only of a server listing "statistics".
    assert set(server.extensions) == {"classification", "model_configuration", "statistics"}
    meta = triton.get_model_metadata("tiny")
    assert meta.name == "tiny" and list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 3, 8, 8])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 5])
    ]
    config = triton.get_model_config("tiny").config
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3, 8, 8])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [5])]
    assert config.input[0].data_type == tc.model_config_pb2.TYPE_FP32


def test_infer_raw_fp32_matches_local_onnxruntime(
    triton: tc.InferenceServerClient, classifier_path: Path, reference: Reference
) -> None:
    x = np.random.default_rng(7).normal(size=(5, 3, 8, 8)).astype(np.float32)
    result = triton.infer("tiny", [_input(x)], request_id="req-7")
    assert result.get_response().id == "req-7"
    assert result.get_response().model_version == "1"
    np.testing.assert_allclose(result.as_numpy("logits"), reference(classifier_path, x), atol=1e-5)


def test_infer_more_rows_than_the_max_batch_is_split_and_answered_in_full(
    triton: tc.InferenceServerClient, classifier_path: Path, reference: Reference
) -> None:
    x = np.random.default_rng(8).normal(size=(29, 3, 8, 8)).astype(np.float32)  # max batch 8
    result = triton.infer("tiny", [_input(x)])
    assert result.as_numpy("logits").shape == (29, 5)
    np.testing.assert_allclose(result.as_numpy("logits"), reference(classifier_path, x), atol=1e-5)


def test_classification_extension_matches_local_top_k(
    triton: tc.InferenceServerClient, classifier_path: Path, reference: Reference
) -> None:
    x = np.random.default_rng(9).normal(size=(6, 3, 8, 8)).astype(np.float32)
    k = 3
    output = tc.InferRequestedOutput("logits", class_count=k)
    result = triton.infer("tiny", [_input(x)], outputs=[output])
    strings = result.as_numpy("logits")
    assert strings.shape == (6, k)
    expected = reference(classifier_path, x)
    for row, values in zip(strings, expected, strict=True):
        order = np.argsort(-values, kind="stable")[:k]
        parsed = [s.decode().split(":") for s in row]
        assert [int(p[1]) for p in parsed] == list(order)
        assert [p[2] for p in parsed] == [f"label{i}" for i in order]
        np.testing.assert_allclose([float(p[0]) for p in parsed], values[order], atol=1e-5)


def test_class_count_above_the_classes_is_capped(triton: tc.InferenceServerClient) -> None:
    x = np.zeros((2, 3, 8, 8), dtype=np.float32)
    output = tc.InferRequestedOutput("logits", class_count=50)
    assert triton.infer("tiny", [_input(x)], outputs=[output]).as_numpy("logits").shape == (2, 5)


def test_typed_fp32_contents_are_accepted(
    shared_server: BackgroundServer, classifier_path: Path, reference: Reference
) -> None:
    from protos import kserve_pb2

    x = np.random.default_rng(10).normal(size=(2, 3, 8, 8)).astype(np.float32)
    request = kserve_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=kserve_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=kserve_pb2.ModelInferResponse.FromString,
        )
        response = infer(request, timeout=30)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 5)
    np.testing.assert_allclose(got, reference(classifier_path, x), atol=1e-5)


def test_nan_and_inf_are_served_not_crashed(triton: tc.InferenceServerClient) -> None:
    x = np.zeros((3, 3, 8, 8), dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    x[1, 1, 2, 3] = np.inf
    logits = triton.infer("tiny", [_input(x)]).as_numpy("logits")
    assert logits.shape == (3, 5)
    assert np.isnan(logits[0]).any()
    assert np.isfinite(logits[2]).all()
    output = tc.InferRequestedOutput("logits", class_count=2)
    assert triton.infer("tiny", [_input(x)], outputs=[output]).as_numpy("logits").shape == (3, 2)
    assert triton.is_server_ready()


BAD_REQUESTS = {
    "unknown model": ("StatusCode.NOT_FOUND", dict(model_name="nope")),
    "unknown version": ("StatusCode.NOT_FOUND", dict(model_version="2")),
    "wrong tensor name": ("StatusCode.INVALID_ARGUMENT", dict(name="pixels")),
    "wrong dtype": ("StatusCode.INVALID_ARGUMENT", dict(datatype="FP64")),
    "wrong shape": ("StatusCode.INVALID_ARGUMENT", dict(shape=(2, 3, 8, 9))),
    "zero rows": ("StatusCode.INVALID_ARGUMENT", dict(shape=(0, 3, 8, 8))),
    "byte size": ("StatusCode.INVALID_ARGUMENT", dict(truncate=True)),
    "wrong output": ("StatusCode.INVALID_ARGUMENT", dict(output="probs")),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_their_status(triton: tc.InferenceServerClient, case: str) -> None:
    status, change = BAD_REQUESTS[case]
    shape = change.get("shape", (2, 3, 8, 8))
    datatype = change.get("datatype", "FP32")
    array = np.zeros(shape, dtype=np.float64 if datatype == "FP64" else np.float32)
    tensor = _input(array, change.get("name", "input"), datatype)
    if change.get("truncate"):
        tensor._raw_content = tensor._raw_content[:-4]
    outputs = [tc.InferRequestedOutput(change["output"])] if "output" in change else None
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(
            change.get("model_name", "tiny"),
            [tensor],
            model_version=change.get("model_version", ""),
            outputs=outputs,
        )
    assert _status(caught.value) == status
    assert "expected" in caught.value.message()
    assert triton.is_server_ready()


def test_metadata_of_unknown_model_is_not_found(triton: tc.InferenceServerClient) -> None:
    for call in (triton.get_model_metadata, triton.get_model_config):
        with pytest.raises(InferenceServerException) as caught:
            call("nope")
        assert _status(caught.value) == "StatusCode.NOT_FOUND"
        assert "tiny" in caught.value.message()  # names the models that exist


def test_bytes_that_do_not_parse_are_invalid_argument_unary_and_streamed(
    shared_server: BackgroundServer,
) -> None:
    garbage = b"\xff\xff\xff\x01not a protobuf"
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(garbage, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "do not parse" in caught.value.details()
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        (answer,) = list(stream(iter([garbage]), timeout=10))
        message = kserve_pb2.ModelStreamInferResponse.FromString(answer).error_message
        assert message.startswith("INVALID_ARGUMENT: expected a serialized ModelInferRequest")


@pytest.mark.parametrize(
    "method",
    [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelConfig",
        "RepositoryIndex",
        "ModelStatistics",
    ],
)
def test_bytes_that_do_not_parse_are_invalid_argument_on_every_method(
    shared_server: BackgroundServer, method: str
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff\x01not a protobuf", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"expected a serialized {method}Request" in caught.value.details()
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=10)
        assert kserve_pb2.ServerLiveResponse.FromString(live).live


def _infer_request(**change: object) -> kserve_pb2.ModelInferRequest:
    request = kserve_pb2.ModelInferRequest(model_name=change.get("model", "tiny"))
    request.inputs.add(
        name=change.get("name", "input"),
        datatype=change.get("datatype", "FP32"),
        shape=change.get("shape", [1, 3, 8, 8]),
    )
    request.raw_input_contents.append(np.zeros(192, np.float32).tobytes())
    return request


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"model": "m" * 20_000}, grpc.StatusCode.NOT_FOUND),
        ({"model": "é" * 20_000}, grpc.StatusCode.NOT_FOUND),
        ({"name": "x" * 20_000}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"datatype": "F" * 20_000}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"shape": [1] * 50_000}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["model", "non-ascii-model", "input-name", "datatype", "shape"],
)
def test_long_client_strings_are_cut_in_status_messages(
    shared_server: BackgroundServer, change: dict[str, object], code: grpc.StatusCode
) -> None:
    # Echoed whole, they overflowed gRPC's trailer limit: RESOURCE_EXHAUSTED instead of `code`.
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            call(_infer_request(**change).SerializeToString(), timeout=10)
    assert caught.value.code() == code
    details = caught.value.details()
    assert "characters)" in details and len(details) < 700


def test_raw_and_typed_contents_together_are_named_both(shared_server: BackgroundServer) -> None:
    request = _infer_request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 192)
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            call(request.SerializeToString(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "got 1 raw entries and 192 fp32_contents values" in caught.value.details()


def test_repository_index_lists_the_served_models(triton: tc.InferenceServerClient) -> None:
    expected = [{"name": "tiny", "version": "1", "state": "READY"}]
    assert triton.get_model_repository_index(as_json=True)["models"] == expected
    ready_only = kserve_pb2.RepositoryIndexRequest(ready=True)
    assert [m.name for m in triton._client_stub.RepositoryIndex(ready_only).models] == ["tiny"]


def test_repository_index_says_loading_then_unavailable_when_draining(
    start_server: Callable[..., BackgroundServer],
) -> None:
    bg = start_server()
    assert bg.server is not None
    state = bg.server.state
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/RepositoryIndex",
            request_serializer=kserve_pb2.RepositoryIndexRequest.SerializeToString,
            response_deserializer=kserve_pb2.RepositoryIndexResponse.FromString,
        )

        def index(ready: bool = False) -> list[tuple[str, str]]:
            request = kserve_pb2.RepositoryIndexRequest(ready=ready)
            return [(m.name, m.state) for m in call(request, timeout=10).models]

        assert index() == [("tiny", "READY")]
        state.ready = False  # as while another model still loads
        state.loading = {"tiny", "later"}
        assert index() == [("later", "LOADING"), ("tiny", "LOADING")]
        assert index(ready=True) == []
        state.ready = True
        state.loading = set()

        async def drain() -> None:
            state.drain()

        bg.call(drain)  # on the server's loop, as SIGTERM would
        assert index() == [("tiny", "UNAVAILABLE")]
        assert index(ready=True) == []


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda t: t.load_model("tiny"), "start it with the new files"),
        (lambda t: t.unload_model("tiny"), "start it with the new files"),
        (lambda t: t.get_system_shared_memory_status(), "shared memory is not supported"),
        (lambda t: t.register_system_shared_memory("r", "/k", 64), "shared memory"),
        (lambda t: t.get_cuda_shared_memory_status(), "shared memory is not supported"),
        (lambda t: t.get_trace_settings(), "--log-level debug"),
        (lambda t: t.get_log_settings(), "--log-level and --log-format"),
    ],
    ids=["load", "unload", "shm-status", "shm-register", "cuda-shm", "trace", "log"],
)
def test_triton_methods_this_server_lacks_say_what_to_do(
    triton: tc.InferenceServerClient, call: Callable[[tc.InferenceServerClient], object], words: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(triton)
    assert _status(caught.value) == "StatusCode.UNIMPLEMENTED"
    assert "is not implemented by this server" in caught.value.message()
    assert words in caught.value.message()


def test_shared_memory_tensors_are_refused_by_name(triton: tc.InferenceServerClient) -> None:
    tensor = tc.InferInput("input", [1, 3, 8, 8], "FP32")
    tensor.set_shared_memory("region", 768)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("tiny", [tensor])
    assert _status(caught.value) == "StatusCode.INVALID_ARGUMENT"
    assert "shared memory region, which this server does not support" in caught.value.message()

    output = tc.InferRequestedOutput("logits")
    output.set_shared_memory("region", 20)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("tiny", [_input(np.zeros((1, 3, 8, 8), np.float32))], outputs=[output])
    assert _status(caught.value) == "StatusCode.INVALID_ARGUMENT"
    assert "returned in the response" in caught.value.message()


def test_model_statistics_count_what_was_served(
    start_server: Callable[..., BackgroundServer],
) -> None:
    bg = start_server(max_batch_size=4)
    client = tc.InferenceServerClient(f"127.0.0.1:{bg.port}")
    try:
        started_ms = time.time_ns() // 1_000_000
        for rows in (2, 1, 4, 6):  # one after another; 6 rows go as pieces of 4 and 2
            client.infer("tiny", [_input(np.ones((rows, 3, 8, 8), np.float32))])
        with pytest.raises(InferenceServerException):
            client.infer("tiny", [_input(np.ones((1, 3, 8, 8)), datatype="FP64")])
        (stats,) = client.get_inference_statistics("tiny").model_stats
        assert client.get_inference_statistics().model_stats == [stats]  # "": every model
        assert client.get_inference_statistics("tiny", "01").model_stats == [stats]
        for name, version in (("nope", ""), ("tiny", "2")):
            with pytest.raises(InferenceServerException) as caught:
                client.get_inference_statistics(name, version)
            assert _status(caught.value) == "StatusCode.NOT_FOUND"
    finally:
        client.close()
    assert (stats.name, stats.version) == ("tiny", "1")
    assert (stats.inference_count, stats.execution_count) == (13, 5)
    assert started_ms <= stats.last_inference <= time.time_ns() // 1_000_000
    infer = stats.inference_stats
    assert (infer.success.count, infer.fail.count) == (4, 1)
    # Per answered request, as Triton counts them (perf_analyzer divides by success.count):
    # the split request counts once.
    for part in (infer.queue, infer.compute_input, infer.compute_infer, infer.compute_output):
        assert part.count == 4
    assert infer.success.ns > infer.queue.ns + infer.compute_infer.ns > 0
    sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert sizes == {1: 1, 2: 2, 4: 2}
    # Each batch belongs to one request here: the same seconds, summed in another order.
    batch_ns = sum(b.compute_infer.ns for b in stats.batch_stats)
    assert batch_ns == pytest.approx(infer.compute_infer.ns, abs=10)


def test_model_statistics_fail_only_requests_that_reached_the_model(
    start_server: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    # Triton counts a failure against a model version only once a request reached it: a wrong
    # version, a missing token or a server not taking requests never does. They used to count
    # in the served version's `fail`, so any caller without the token could inflate it.
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    bg = start_server(auth_token_file=token)
    auth = {"authorization": "Bearer s3cret"}
    client = tc.InferenceServerClient(f"127.0.0.1:{bg.port}")
    x = np.ones((1, 3, 8, 8), np.float32)
    fp64 = _input(x.astype(np.float64), datatype="FP64")
    try:
        client.infer("tiny", [_input(x)], headers=auth)
        statuses = []
        for call in (
            lambda: client.infer("tiny", [_input(x)], model_version="2", headers=auth),
            lambda: client.infer("tiny", [_input(x)]),  # no token
            lambda: client.infer("tiny", [fp64], headers=auth),
        ):
            with pytest.raises(InferenceServerException) as caught:
                call()
            statuses.append(_status(caught.value))
        (stats,) = client.get_inference_statistics("tiny", headers=auth).model_stats
    finally:
        client.close()
    assert statuses == [
        "StatusCode.NOT_FOUND",
        "StatusCode.UNAUTHENTICATED",
        "StatusCode.INVALID_ARGUMENT",
    ]
    infer = stats.inference_stats
    assert (infer.success.count, infer.fail.count) == (1, 1)  # the FP64 request reached it
    assert bg.server is not None
    text = bg.server.metrics.render().decode()
    counts = {key: n for key, n in request_counts(text).items() if n}
    assert counts == {
        ("tiny", "success"): 1,
        ("tiny", "not_found"): 1,
        ("tiny", "unauthenticated"): 1,
        ("tiny", "invalid"): 1,
    }
