"""End-to-end demo (`make demo`): train on digits → export with the real CLI → compare accuracy.

Each step is one function taking and returning plain values, so later steps (start the server,
classify over gRPC, stop it) can be added to `main` without touching the others.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_digits  # noqa: E402  (the examples directory is put on the path above)

OUT_DIR = ROOT / "demo-out"


@dataclass(frozen=True)
class Trained:
    checkpoint: Path
    labels: Path
    torch_accuracy: float


def step_train(out_dir: Path, split: train_digits.Split) -> Trained:
    print("1. training resnet18-cifar on scikit-learn digits ...", flush=True)
    model = train_digits.train(split)
    checkpoint, labels = train_digits.save(model, out_dir)
    logits = train_digits.predict(model, split.test_images)
    return Trained(checkpoint, labels, train_digits.accuracy(logits, split.test_labels))


def step_export(trained: Trained) -> Path:
    print(f"2. python -m export {trained.checkpoint.relative_to(ROOT)}", flush=True)
    command = [sys.executable, "-m", "export", str(trained.checkpoint),
               "--labels", str(trained.labels)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"export failed with exit code {result.returncode}")
    return trained.checkpoint.with_suffix(".onnx")


def step_onnx_accuracy(onnx_path: Path, split: train_digits.Split) -> float:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": train_digits.preprocess(split.test_images)})[0]
    return train_digits.accuracy(logits, split.test_labels)


def step_report(trained: Trained, onnx_path: Path, onnx_accuracy: float) -> None:
    report = json.loads(onnx_path.with_name(onnx_path.stem + ".parity.json").read_text())
    print("3. results")
    print(f"   parity verdict      {report['verdict']} (max abs err {report['max_abs_err']:.2e})")
    print(f"   held-out accuracy   torch {trained.torch_accuracy:.4f}   onnx {onnx_accuracy:.4f}")
    if not np.isclose(trained.torch_accuracy, onnx_accuracy):
        raise SystemExit("expected equal accuracy from torch and ONNX, got different values")


def main() -> int:
    split = train_digits.load_digits_split()
    trained = step_train(OUT_DIR, split)
    onnx_path = step_export(trained)
    step_report(trained, onnx_path, step_onnx_accuracy(onnx_path, split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
