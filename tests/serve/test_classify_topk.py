"""Classify's top-k against the KServe classification extension, rows with NaN included."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import tritonclient.grpc as tc
from onnx import TensorProto, helper

from protos import classifier_pb2, classifier_pb2_grpc
from serve.background import BackgroundServer


def _flatten_model(path: Path) -> Path:
    """Input [batch, 1, 1, 4] → logits [batch, 4] unchanged: each logit is one input value."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["logits"], axis=1)],
        "flatten",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, {"labels": json.dumps(["a", "b", "c", "d"])})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


ROWS = np.array(
    [
        [1.0, np.nan, 3.0, 2.0],  # NaN beside numbers: argmax ranked it first, argsort last
        [0.5, 2.0, 2.0, -1.0],  # a tie: the lower index first
        [-np.inf, 0.0, np.inf, 1.0],
    ],
    dtype=np.float32,
).reshape(3, 1, 1, 4)


def test_the_best_class_does_not_depend_on_k_and_matches_kserve(
    start_server: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    server = start_server(models=(_flatten_model(tmp_path / "flat.onnx"),))
    target = f"127.0.0.1:{server.port}"
    request = classifier_pb2.ClassifyRequest(model="flat")
    for row in ROWS:
        request.images.add(tensor=classifier_pb2.Tensor(shape=row.shape, data=row.tobytes()))
    triton = tc.InferenceServerClient(target)
    inp = tc.InferInput("input", list(ROWS.shape), "FP32")
    inp.set_data_from_numpy(ROWS)
    tops: dict[int, list[list[tuple[int, str]]]] = {}
    with grpc.insecure_channel(target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        for k in (1, 2, 4):
            request.top_k = k
            answer = stub.Classify(request, timeout=30)
            mine = [[(lab.index, lab.label) for lab in r.labels] for r in answer.results]
            output = tc.InferRequestedOutput("logits", class_count=k)
            strings = triton.infer("flat", [inp], outputs=[output]).as_numpy("logits")
            theirs = [
                [(int(s.split(b":")[1]), s.split(b":")[2].decode()) for s in r] for r in strings
            ]
            assert mine == theirs, k
            for result, row in zip(answer.results, ROWS.reshape(3, 4), strict=True):
                # the logit is the raw output, the score KServe's strings carry
                np.testing.assert_array_equal(
                    [lab.logit for lab in result.labels], row[[lab.index for lab in result.labels]]
                )
            tops[k] = mine
    triton.close()
    assert [r[0] for r in tops[1]] == [r[0] for r in tops[2]] == [r[0] for r in tops[4]]
    assert tops[4][0] == [(2, "c"), (3, "d"), (0, "a"), (1, "b")]
    assert tops[2][1] == [(1, "b"), (2, "c")]
    assert tops[1][2] == [(2, "c")]
