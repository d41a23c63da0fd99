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


def test_bad_labels_fall_back_and_bad_stats_are_refused(
    make_classifier: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    path = make_classifier(tmp_path / "a.onnx", classes=2, metadata={"labels": '["only one"]'})
    assert read_model_info("a", path).labels == ("class_0", "class_1")
    # It said "not a JSON list of 2 strings" for a list of the wrong length.
    assert "list of 2 names, one per class, got 1 names" in caplog.text
    # A lone surrogate escape made every Classify answer INTERNAL (UnicodeEncodeError).
    path = make_classifier(tmp_path / "s.onnx", classes=2, metadata={"labels": '["a", "\\ud800"]'})
    assert read_model_info("s", path).labels == ("class_0", "class_1")
    assert "not valid Unicode" in caplog.text
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


def _pooling_model(path: Path, metadata: dict[str, str]) -> Path:
    """input [n, 3, h, w] (H and W symbolic) → GlobalAveragePool → Flatten → logits [n, 3]."""
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
         helper.make_node("Flatten", ["p"], ["y"], axis=1)],
        "g",
        [vi("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [vi("y", TensorProto.FLOAT, ["n", 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "shape", ["3,-1,4", "3,0,4", "[3, null, 4]", "[[3], 4, 4]", "[3, 4.5, 4]", "[3, true, 4]"]
)
def test_input_shape_metadata_must_be_positive_integers(tmp_path: Path, shape: str) -> None:
    # H and W come from the metadata alone: a zero dim was served, -1 and null failed later.
    path = _pooling_model(tmp_path / "m.onnx", {"input_shape": shape})
    with pytest.raises(ValueError, match=r"input_shape .* positive integers") as refused:
        read_model_info("m", path)
    assert str(path) in str(refused.value)
    ok = _pooling_model(tmp_path / "ok.onnx", {"input_shape": "[3, 6, 4]"})
    assert read_model_info("ok", ok).sample_shape == (3, 6, 4)


def test_files_that_are_no_model_say_what_they_are(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="got 0 bytes without a graph; copy the model file"):
        read_model_info("empty", empty)
    pointer = tmp_path / "lfs.onnx"
    pointer.write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 9\n"
    )
    with pytest.raises(ValueError, match=r"Git LFS pointer .* git lfs pull") as refused:
        read_model_info("lfs", pointer)
    assert str(pointer) in str(refused.value)


@pytest.mark.parametrize("dtype", [TensorProto.INT64, TensorProto.BOOL])
def test_an_output_that_is_not_scores_is_refused(tmp_path: Path, dtype: int) -> None:
    # e.g. a graph ending in ArgMax or a Cast: its values would be served as FP32 logits.
    vi = helper.make_tensor_value_info
    path = _identity_model(
        tmp_path / "m.onnx",
        [vi("x", TensorProto.FLOAT, ["n", 4])],
        [vi("y", dtype, ["n", 4])],
        [helper.make_node("Cast", ["x"], ["y"], to=dtype)],
    )
    with pytest.raises(ValueError, match=r"expected float32 logits .* got (INT64|BOOL)"):
        read_model_info("m", path)
    half = _identity_model(
        tmp_path / "half.onnx",
        [vi("x", TensorProto.FLOAT, ["n", 4])],
        [vi("y", TensorProto.FLOAT16, ["n", 4])],
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)],
    )
    assert read_model_info("half", half).num_classes == 4  # sent as FP32, as before


def test_channels_last_input_is_named_when_its_channel_stats_do_not_fit(tmp_path: Path) -> None:
    # mean/std of 3 values used to be refused as needing "8 values" for an [8, 8, 3] input.
    path = _identity_model(
        tmp_path / "nhwc.onnx",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 192])],
        [helper.make_node("Flatten", ["x"], ["y"])],
    )
    model = onnx.load(str(path))
    helper.set_model_props(model, {"mean": "[0.5, 0.5, 0.5]"})
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match=r"looks channels-last .* export the model with channels"):
        read_model_info("nhwc", path)


def test_external_data_files_are_checked_with_the_graph(make_classifier: Make, tmp_path: Path):
    # Found by ONNX Runtime only when it opened the model, after the models before it warmed up.
    model = onnx.load(str(make_classifier(tmp_path / "m.onnx")))
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    assert read_model_info("m", path).num_classes == 5
    (tmp_path / "sub" / "w.bin").rename(tmp_path / "w.bin")
    with pytest.raises(ValueError, match=r"external data file .*w\.bin of .*m\.onnx \(weights"):
        read_model_info("m", path)


@pytest.mark.parametrize("suffix", [".onnxtxt", ".textproto", ".json"])
def test_model_files_are_read_as_onnx_runtime_reads_them(
    make_classifier: Make, tmp_path: Path, suffix: str
) -> None:
    # onnx.load picks text formats by suffix, which ONNX Runtime cannot read: such a file passed
    # the check and was refused only after the models before it had been warmed up.
    path = tmp_path / f"m{suffix}"
    onnx.save(onnx.load(str(make_classifier(tmp_path / "m.onnx"))), str(path))
    with pytest.raises(ValueError, match=r"expected a readable ONNX model at .* got DecodeError"):
        read_model_info("m", path)
    (tmp_path / "m.onnx").rename(path)  # binary ONNX under any name is still served
    assert read_model_info("m", path).num_classes == 5
