"""The ONNX conventions the server relies on, and the graph checks on their own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import user_models

from export import ExportConfig, export_checkpoint
from export.onnx_export import check_graph, read_metadata, training_mode_ops

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def exported(small_ckpt, tmp_path_factory: pytest.TempPathFactory):
    path, _ = small_ckpt
    out = tmp_path_factory.mktemp("onnx") / "conv.onnx"
    labels = out.with_name("labels.txt")
    labels.write_text("ant\nbee\ncat\ndog\n")
    return export_checkpoint(ExportConfig(checkpoint=path, output=out, labels_file=labels))


def test_io_names_shapes_and_opset(exported) -> None:
    model = onnx.load(str(exported.output))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32]
    out_dims = [
        d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim
    ]
    assert out_dims == ["batch", 4]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_every_batch_size_up_to_256_runs(exported) -> None:
    session = ort.InferenceSession(str(exported.output), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((256, 3, 32, 32)).astype(np.float32)
    full = session.run(None, {"input": x})[0]
    assert full.shape == (256, 4)
    for n in (1, 5, 64, 129):
        part = session.run(None, {"input": x[:n]})[0]
        np.testing.assert_allclose(part, full[:n], atol=1e-4, rtol=1e-3)


def test_metadata(exported) -> None:
    meta = read_metadata(exported.output)
    assert set(meta) >= {"arch", "num_classes", "input_shape", "labels", "mean", "std",
                         "checkpoint_sha256", "torch_version", "parity"}  # fmt: skip
    assert meta["arch"] == "resnet18-cifar"
    assert meta["num_classes"] == "4"
    assert meta["input_shape"] == "3,32,32"
    assert json.loads(meta["labels"]) == ["ant", "bee", "cat", "dog"]
    assert json.loads(meta["mean"]) == [0.0, 0.0, 0.0]
    assert json.loads(meta["std"]) == [1.0, 1.0, 1.0]
    assert len(meta["checkpoint_sha256"]) == 64
    assert json.loads(meta["parity"])["verdict"] == "pass"


def test_mean_std_defaults_and_overrides(tmp_path: Path) -> None:
    from export.zoo.resnet import resnet18

    path = tmp_path / "r18.ckpt"
    torch.save(resnet18(num_classes=2, in_channels=3).state_dict(), path)
    common = {"checkpoint": path, "input_shape": (3, 32, 32)}
    meta = export_checkpoint(ExportConfig(**common)).metadata
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(meta["std"]) == [0.229, 0.224, 0.225]
    meta = export_checkpoint(ExportConfig(**common, mean=(0.5,), std=(0.1, 0.2, 0.3))).metadata
    assert json.loads(meta["mean"]) == [0.5, 0.5, 0.5]
    assert json.loads(meta["std"]) == [0.1, 0.2, 0.3]


def test_dynamo_exporter_option(small_ckpt, tmp_path: Path) -> None:
    path, _ = small_ckpt
    result = export_checkpoint(ExportConfig(checkpoint=path, output=tmp_path / "d.onnx",
                                            exporter="dynamo"))  # fmt: skip
    assert result.exporter == "dynamo"
    assert result.parity.passed
    assert json.loads(result.metadata["parity"])["exporter"] == "dynamo"


def test_graph_check_finds_batchnorm_exported_in_training_mode(tmp_path: Path) -> None:
    # Built on purpose with the legacy exporter's TRAINING mode, bypassing our pipeline.
    model = user_models.TinyNet()
    user_models.trained_state(model)
    path = tmp_path / "train_mode.onnx"
    torch.onnx.export(model.train(), (torch.randn(2, 3, 8, 8),), str(path), dynamo=False,
                      training=torch.onnx.TrainingMode.TRAINING, opset_version=18,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    problems = training_mode_ops(onnx.load(str(path)))
    assert any("BatchNormalization" in p and "training mode" in p for p in problems)
    assert any(
        "training mode" in p
        for p in check_graph(onnx.load(str(path)), (3, 8, 8), path.stat().st_size)
    )


def _dropout_model(training: bool) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    ratio = helper.make_tensor("r", TensorProto.FLOAT, [], [0.5])
    flag = helper.make_tensor("t", TensorProto.BOOL, [], [training])
    nodes = [
        helper.make_node("Constant", [], ["ratio"], value=ratio),
        helper.make_node("Constant", [], ["on"], value=flag),
        helper.make_node("Dropout", ["input", "ratio", "on"], ["logits"], name="drop"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_graph_check_finds_training_dropout() -> None:
    assert any("Dropout node 'drop'" in p for p in training_mode_ops(_dropout_model(True)))
    assert not training_mode_ops(_dropout_model(False))


def test_op_no_exporter_can_express_is_named(run_main, tmp_path: Path) -> None:
    # Both exporters fail; the message used to be the dynamo exporter's generic "step 3/3
    # failed. Next steps:", naming neither the op nor the legacy exporter's reason.
    path = tmp_path / "eig.ckpt"
    torch.save(user_models.trained_state(user_models.TinyNet()), path)
    done = run_main(path, "--arch", "user_models:Eigenvalues", "--input-shape", "3,8,8",
                    extra_path=HERE)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "legacy exporter: Exporting the operator 'aten::linalg_eigvals'" in done.stderr
    assert "aten.linalg_eig" in done.stderr.split("dynamo exporter:")[1]
    assert "Next steps" not in done.stderr
