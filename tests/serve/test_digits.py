"""Served results equal the exporter's torch reference, for the digits example model."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from serve.background import BackgroundServer
from serve.client import Client
from serve.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]

torch = pytest.importorskip("torch")
pytest.importorskip("export.zoo.resnet")
sys.path.insert(0, str(ROOT / "examples"))
train_digits = pytest.importorskip("train_digits")


def test_served_logits_equal_torch(tmp_path: Path, base_config: ServerConfig) -> None:
    split = train_digits.load_digits_split()
    model = train_digits.train(split, epochs=1, seconds=60)
    checkpoint, labels = train_digits.save(model, tmp_path)
    expected = train_digits.predict(model, split.test_images)
    done = subprocess.run(
        [sys.executable, "-m", "export", str(checkpoint), "--labels", str(labels)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    onnx_path = checkpoint.with_suffix(".onnx")
    config = replace(base_config, models=(onnx_path,), max_batch_size=32)
    with BackgroundServer(config) as server, Client(f"127.0.0.1:{server.port}") as client:
        inputs = train_digits.preprocess(split.test_images)
        logits = client.infer(onnx_path.stem, inputs)  # 450 rows: split across batches
        tops = client.classify_arrays(onnx_path.stem, inputs[:40], top_k=1)
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-3)
    assert (logits.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert [top[0].index for top in tops] == list(expected[:40].argmax(axis=1))
    assert [top[0].label for top in tops] == [str(i) for i in expected[:40].argmax(axis=1)]
