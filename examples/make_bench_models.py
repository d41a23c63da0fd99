"""Build the benchmark models and export them with `python -m export` (no downloads).

    python examples/make_bench_models.py [OUT_DIR] [--only NAME ...]

Writes OUT_DIR/resnet18-cifar.onnx (3×32×32, workload W1) and OUT_DIR/resnet18.onnx
(3×224×224, workload W2). Weights are random but trained-looking: a few SGD steps on random
images and labels in train mode, so every BatchNorm layer has moved off its initial running
statistics (the exporter warns on untrained statistics). Speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from export.zoo import architectures  # noqa: E402  (after the path set-up above)

MODELS = {"resnet18-cifar": 10, "resnet18": 1000}


def build(arch: str, *, classes: int, steps: int = 3, batch: int = 8, seed: int = 0) -> nn.Module:
    """The zoo network ``arch`` after ``steps`` train-mode SGD steps on random data."""
    torch.manual_seed(seed)
    spec = architectures()[arch]
    model = spec.build(num_classes=classes, in_channels=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, 3, *spec.spatial)
        y = torch.randint(0, classes, (batch,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def make(arch: str, out_dir: Path) -> Path:
    """Train briefly, save ``ARCH.ckpt`` and export it to ``ARCH.onnx`` with the CLI."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build(arch, classes=MODELS[arch])
    checkpoint = out_dir / f"{arch}.ckpt"
    torch.save({"arch": arch, "state_dict": model.state_dict()}, checkpoint)
    output = out_dir / f"{arch}.onnx"
    subprocess.run(
        [sys.executable, "-m", "export", str(checkpoint), "--arch", arch, "-o", str(output)],
        check=True,
        cwd=ROOT,
    )
    return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("bench-models"))
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), help="build only these")
    args = parser.parse_args()
    for arch in args.only or MODELS:
        print(f"wrote {make(arch, args.out_dir.resolve())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
