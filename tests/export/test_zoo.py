"""Every zoo architecture, briefly trained, exported, and checked against eval-mode torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import ExportConfig, export_checkpoint
from export.zoo import architectures
from tests.export.conftest import train_briefly

# (arch, input shape, classes, via CLI). Heavy nets use small spatial sizes their adaptive
# pooling allows, so the suite stays fast on two busy cores.
CASES = [
    ("lenet5", (3, 32, 32), 10, True),
    ("mlp", (1, 28, 28), 10, False),
    ("nin", (1, 96, 96), 6, False),
    ("resnet18-cifar", (3, 32, 32), 5, True),
    ("resnet18", (3, 64, 64), 7, False),
    ("googlenet", (3, 64, 64), 4, True),
    ("alexnet", (3, 64, 64), 3, False),
    ("vgg11", (3, 32, 32), 3, False),
    ("vgg16", (3, 32, 32), 3, False),
]
WITH_BATCHNORM = {"resnet18", "resnet18-cifar", "googlenet"}


def test_cases_cover_the_zoo() -> None:
    # vgg11_bn is an optional extra layout; it is covered by detection in test_resolve.py.
    assert {c[0] for c in CASES} == set(architectures()) - {"vgg11_bn"}


@pytest.mark.parametrize(("arch", "shape", "classes", "via_cli"), CASES, ids=[c[0] for c in CASES])
def test_zoo_export_matches_torch(
    arch: str,
    shape: tuple[int, int, int],
    classes: int,
    via_cli: bool,
    tmp_path: Path,
    run_cli,
) -> None:
    torch.manual_seed(0)
    model = architectures()[arch].build(num_classes=classes, in_channels=shape[0])
    model = train_briefly(model, shape)
    if arch in WITH_BATCHNORM:
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert not torch.all(bn.running_mean == 0), "training should move BatchNorm statistics"
    ckpt = tmp_path / f"{arch}.ckpt"
    torch.save(model.state_dict(), ckpt)
    shape_arg = ",".join(map(str, shape))

    if via_cli:
        done = run_cli(ckpt, "--input-shape", shape_arg)
        assert done.returncode == 0, done.stderr
        assert f"exported {arch}" in done.stdout
        assert "parity" in done.stdout
        assert "tracer" not in done.stderr  # the zoo branches on no tensor value
    else:
        result = export_checkpoint(ExportConfig(checkpoint=ckpt, input_shape=shape))
        assert result.arch == arch
        assert result.parity.passed
        assert not [w for w in result.warnings if "tracer" in w]
        del result
    onnx_path = ckpt.with_suffix(".onnx")

    meta = {
        p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props
    }
    assert meta["arch"] == arch
    assert meta["num_classes"] == str(classes)
    assert meta["input_shape"] == shape_arg
    assert json.loads(meta["labels"]) == [f"class_{i}" for i in range(classes)]
    assert len(json.loads(meta["mean"])) == len(json.loads(meta["std"])) == shape[0]
    assert json.loads(meta["parity"])["verdict"] == "pass"
    report = json.loads(ckpt.with_suffix("").with_suffix(".parity.json").read_text())
    assert report["verdict"] == "pass"

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(123)
    for batch in (1, 3, 17):
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        got = session.run(None, {"input": x})[0]
        assert got.shape == (batch, classes)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
        assert (got.argmax(1) == expected.argmax(1)).all()
