"""serve/model_info.py: the graph interface and metadata conventions the server relies on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from serve.model_info import read_model_info

Make = Callable[..., Path]


def test_metadata_is_read(make_classifier: Make, tmp_path: Path) -> None:
    info = read_model_info("m", make_classifier(tmp_path / "m.onnx", classes=3))
    assert (info.input_name, info.output_name) == ("input", "logits")
    assert info.sample_shape == (3, 8, 8) and info.image_shape == (3, 8, 8)
    assert info.num_classes == 3 and info.labels == ("label0", "label1", "label2")
    assert info.mean == (0.5,) * 3 and info.std == (0.25,) * 3
    assert info.fixed_batch is None and info.metadata["arch"] == "tiny"


@pytest.mark.parametrize("shape", ["1,5,5", "[1, 5, 5]", " 1, 5, 5 "])
def test_input_shape_as_text_or_json(make_classifier: Make, tmp_path: Path, shape: str) -> None:
    path = make_classifier(tmp_path / "m.onnx", channels=1, size=5, metadata={"input_shape": shape})
    assert read_model_info("m", path).sample_shape == (1, 5, 5)


def test_defaults_without_metadata(make_classifier: Make, tmp_path: Path) -> None:
    info = read_model_info("m", make_classifier(tmp_path / "m.onnx", classes=2, metadata={}))
    assert info.labels == ("class_0", "class_1")
    assert info.mean == (0.0,) * 3 and info.std == (1.0,) * 3


def test_bad_labels_fall_back_and_bad_stats_are_refused(make_classifier: Make, tmp_path: Path):
    path = make_classifier(tmp_path / "a.onnx", classes=2, metadata={"labels": '["only one"]'})
    assert read_model_info("a", path).labels == ("class_0", "class_1")
    path = make_classifier(tmp_path / "b.onnx", metadata={"std": "[1, 0, 1]"})
    with pytest.raises(ValueError, match="std"):
        read_model_info("b", path)
    path = make_classifier(tmp_path / "c.onnx", metadata={"input_shape": "3,9,9"})
    with pytest.raises(ValueError, match="input_shape"):
        read_model_info("c", path)


def _identity_model(path: Path, inputs: list, outputs: list, nodes: list) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_models_that_are_not_servable_classifiers(tmp_path: Path) -> None:
    vi = helper.make_tensor_value_info
    two_inputs = _identity_model(
        tmp_path / "two.onnx",
        [vi("a", TensorProto.FLOAT, ["n", 4]), vi("b", TensorProto.FLOAT, ["n", 4])],
        [vi("y", TensorProto.FLOAT, ["n", 4])],
        [helper.make_node("Add", ["a", "b"], ["y"])],
    )
    ints = _identity_model(
        tmp_path / "ints.onnx",
        [vi("x", TensorProto.INT64, ["n", 4])],
        [vi("y", TensorProto.INT64, ["n", 4])],
        [helper.make_node("Identity", ["x"], ["y"])],
    )
    dynamic = _identity_model(
        tmp_path / "dyn.onnx",
        [vi("x", TensorProto.FLOAT, ["n", "k"])],
        [vi("y", TensorProto.FLOAT, ["n", "k"])],
        [helper.make_node("Identity", ["x"], ["y"])],
    )
    for path, fragment in [(two_inputs, "one input"), (ints, "float32"), (dynamic, "fixed")]:
        with pytest.raises(ValueError, match=fragment):
            read_model_info("m", path)


def test_fixed_batch_and_flat_inputs(tmp_path: Path) -> None:
    vi = helper.make_tensor_value_info
    path = _identity_model(
        tmp_path / "flat.onnx",
        [vi("x", TensorProto.FLOAT, [2, 4])],
        [vi("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_node("Identity", ["x"], ["y"])],
    )
    info = read_model_info("flat", path)
    assert info.fixed_batch == 2 and info.sample_shape == (4,) and info.image_shape is None


@pytest.mark.parametrize("text", ["ten", "0", "-3", ""])
def test_bad_num_classes_metadata_names_the_file_and_key(tmp_path: Path, text: str) -> None:
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [vi("x", TensorProto.FLOAT, ["n", 4])],
        [vi("y", TensorProto.FLOAT, ["n", "k"])],  # classes only from metadata num_classes
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, {"num_classes": text})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="'num_classes'") as refused:
        read_model_info("m", path)
    assert str(path) in str(refused.value) and "metadata_props" in str(refused.value)


@pytest.mark.parametrize(
    ("key", "text"),
    [("mean", "NaN"), ("mean", "[0.5, 1e999, 0.5]"), ("std", "[0.2, NaN, 0.2]"),
     ("std", "Infinity"), ("std", "[0.2, -Infinity, 0.2]")],
)  # fmt: skip
def test_non_finite_mean_or_std_is_refused(
    make_classifier: Make, tmp_path: Path, key: str, text: str
) -> None:
    path = make_classifier(tmp_path / "m.onnx", metadata={key: text})
    with pytest.raises(ValueError, match=f"metadata '{key}' .* finite") as refused:
        read_model_info("m", path)
    assert str(path) in str(refused.value)
