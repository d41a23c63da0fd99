"""Fixtures shared by every test package: a real trained and exported digits classifier."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DigitsModel:
    """resnet18-cifar trained on sklearn digits, exported by `export` with labels "0".."9"."""

    checkpoint: Path
    onnx: Path
    labels: Path


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> DigitsModel:
    """Train (seeded, ~10 s on 2 cores) and export once per test session."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_digits
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from export import ExportConfig, export_checkpoint

    out = tmp_path_factory.mktemp("digits")
    model = train_digits.train(train_digits.load_digits_split())
    checkpoint, labels = train_digits.save(model, out)
    result = export_checkpoint(ExportConfig(checkpoint=checkpoint, labels_file=labels))
    return DigitsModel(checkpoint=checkpoint, onnx=result.output, labels=labels)
