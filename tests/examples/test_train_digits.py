"""The digits example trains a usable classifier, and its export agrees with torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from export.onnx_export import read_metadata
from export.zoo.resnet import resnet18_cifar

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import train_digits


@pytest.fixture(scope="module")
def split() -> train_digits.Split:
    return train_digits.load_digits_split()


def test_exported_digits_model_is_accurate(digits_model, split) -> None:
    model = resnet18_cifar(num_classes=10, in_channels=3)
    model.load_state_dict(torch.load(digits_model.checkpoint, weights_only=True))
    torch_acc = train_digits.accuracy(train_digits.predict(model, split.test_images),
                                      split.test_labels)  # fmt: skip
    session = ort.InferenceSession(str(digits_model.onnx), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": train_digits.preprocess(split.test_images)})[0]
    onnx_acc = train_digits.accuracy(logits, split.test_labels)
    assert torch_acc >= 0.9
    assert onnx_acc == pytest.approx(torch_acc, abs=1 / len(split.test_labels))
    meta = read_metadata(digits_model.onnx)
    assert json.loads(meta["labels"]) == [str(d) for d in range(10)]
    assert meta["input_shape"] == "3,32,32"


def test_preprocess_matches_png_pixels(split) -> None:
    # The server decodes PNGs to [0, 1] via /255 and applies mean 0 / std 1 from the metadata.
    pixels = train_digits.to_uint8_images(split.test_images[:4])
    assert pixels.shape == (4, 32, 32, 3)
    again = pixels.transpose(0, 3, 1, 2).astype("float32") / 255
    assert abs(again - train_digits.preprocess(split.test_images[:4])).max() <= 0.5 / 255 + 1e-6
