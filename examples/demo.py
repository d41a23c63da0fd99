"""End-to-end demo (`make demo`): train on digits → export with the real CLI → compare accuracy
→ serve with `python -m serve` → classify the held-out digits over gRPC → stop with SIGTERM.

Each step is one function taking and returning plain values. Everything lands in `demo-out/`:
the checkpoint, `resnet18.onnx` with its parity report, `serve.log`, and `digit0.png` ..
`digit9.png` (one held-out image of each digit) for trying `python -m serve.client` by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_digits  # noqa: E402  (the examples directory is put on the path above)

OUT_DIR = ROOT / "demo-out"


@dataclass(frozen=True)
class Trained:
    checkpoint: Path
    labels: Path
    torch_accuracy: float
    torch_top1: np.ndarray  # held-out predictions of the trained model, before export


def step_train(out_dir: Path, split: train_digits.Split) -> Trained:
    print("1. training resnet18-cifar on scikit-learn digits ...", flush=True)
    model = train_digits.train(split)
    checkpoint, labels = train_digits.save(model, out_dir)
    logits = train_digits.predict(model, split.test_images)
    accuracy = train_digits.accuracy(logits, split.test_labels)
    return Trained(checkpoint, labels, accuracy, logits.argmax(axis=1))


def step_export(trained: Trained) -> Path:
    checkpoint, labels = trained.checkpoint.relative_to(ROOT), trained.labels.relative_to(ROOT)
    print(f"2. python -m export {checkpoint} --labels {labels}", flush=True)
    command = [sys.executable, "-m", "export", str(checkpoint), "--labels", str(labels)]
    result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"export failed with exit code {result.returncode}")
    return trained.checkpoint.with_suffix(".onnx")


def step_onnx_accuracy(onnx_path: Path, split: train_digits.Split) -> float:
    # Here, after train_digits imported export and with it serve, which turns onnxruntime's
    # telemetry off before onnxruntime is first imported (docs/serving.md, "Telemetry").
    import onnxruntime as ort

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


def step_serve_and_classify(trained: Trained, onnx_path: Path, split: train_digits.Split) -> None:
    """Serve the model with `python -m serve`, classify the held-out digits over gRPC, stop."""
    import signal

    from serve.benchenv import free_port
    from serve.client import Client, ClientError

    port = free_port()
    target = f"127.0.0.1:{port}"
    flags = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    print(f"4. python -m serve {onnx_path.relative_to(ROOT)} {' '.join(flags)}", flush=True)
    log = (OUT_DIR / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "serve", str(onnx_path), *flags], cwd=ROOT, stdout=log, stderr=log
    )
    try:
        with Client(target, timeout=60) as client:
            client.wait_ready(onnx_path.stem, timeout=120)
            inputs = train_digits.preprocess(split.test_images)
            served = np.concatenate([
                [top[0].index for top in client.classify_arrays(onnx_path.stem, chunk, top_k=1)]
                for chunk in np.array_split(inputs, max(1, len(inputs) // 64))
            ])  # fmt: skip
            pngs = [_png(image) for image in train_digits.to_uint8_images(split.test_images)]
            from_png = [top[0].index for top in client.classify(onnx_path.stem, pngs, top_k=1)]
    except ClientError as e:
        raise SystemExit(f"serving failed: {e} (server log: {log.name})") from e
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        log.close()
    served_accuracy = float((served == split.test_labels).mean())
    png_accuracy = float((np.asarray(from_png) == split.test_labels).mean())
    print("5. served over gRPC (classifier.v1.Classify)")
    print(f"   held-out accuracy   torch {trained.torch_accuracy:.4f}   "
          f"served {served_accuracy:.4f}   (from PNG files {png_accuracy:.4f})")  # fmt: skip
    print(f"   server stopped with SIGTERM, exit code {code}")
    disagree = int((served != trained.torch_top1).sum())
    if disagree:
        raise SystemExit(f"expected the served top-1 to equal torch's on every image, got "
                         f"{disagree} of {len(served)} different")  # fmt: skip
    if code != 0:
        raise SystemExit(f"expected the server to exit 0 after SIGTERM, got {code}")


def step_write_pngs(out_dir: Path, split: train_digits.Split) -> list[Path]:
    """`digit<d>.png` for d = 0..9: the first held-out image of each digit, as the server
    would receive a file (32×32 RGB), so README's client commands have something to send."""
    pixels = train_digits.to_uint8_images(split.test_images)
    paths = []
    for digit in range(len(train_digits.LABELS)):
        first = int(np.flatnonzero(split.test_labels == digit)[0])
        path = out_dir / f"digit{digit}.png"
        path.write_bytes(_png(pixels[first]))
        paths.append(path)
    return paths


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    split = train_digits.load_digits_split()
    trained = step_train(OUT_DIR, split)
    onnx_path = step_export(trained)
    step_report(trained, onnx_path, step_onnx_accuracy(onnx_path, split))
    step_serve_and_classify(trained, onnx_path, split)
    pngs = step_write_pngs(OUT_DIR, split)
    print(f"6. wrote {pngs[0].relative_to(ROOT)} .. {pngs[-1].name} (a held-out image of each "
          "digit); by hand:")  # fmt: skip
    print(f"   python -m serve {onnx_path.relative_to(ROOT)}")
    print(f"   python -m serve.client localhost:8001 --model {onnx_path.stem} "
          f"{pngs[0].relative_to(ROOT)} {pngs[1].relative_to(ROOT)} --top-k 3")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
