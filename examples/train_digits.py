"""Train the zoo's `resnet18-cifar` on scikit-learn's bundled digits and save a checkpoint.

    python examples/train_digits.py [OUT_DIR] [--epochs N] [--seconds S]   # OUT_DIR: demo-out

The 8×8 digits (pixel values 0..16) are scaled to [0, 1], upscaled to 32×32 and repeated over
3 channels, which is what the exported model's metadata describes (mean 0, std 1 per channel),
so a server that decodes a PNG of a digit preprocesses it the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from export.zoo.resnet import resnet18_cifar  # noqa: E402  (after the path set-up above)

IMAGE_SIZE = 32
LABELS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class Split:
    """Raw 8×8 images (0..16) and labels, split into train and held-out parts."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The digits data set, shuffled with `seed` and split; images as float32 N×8×8 in 0..16."""
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    images = data.images[order].astype(np.float32)
    labels = data.target[order].astype(np.int64)
    cut = int(len(labels) * (1 - test_fraction))
    return Split(images[:cut], labels[:cut], images[cut:], labels[cut:])


def preprocess(images: np.ndarray) -> np.ndarray:
    """N×8×8 digits (0..16) → float32 N×3×32×32 in [0, 1] (nearest-neighbour upscaling)."""
    scale = IMAGE_SIZE // images.shape[-1]
    x = np.asarray(images, dtype=np.float32) / 16.0
    x = x.repeat(scale, axis=-2).repeat(scale, axis=-1)
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))


def to_uint8_images(images: np.ndarray) -> np.ndarray:
    """N×8×8 digits → uint8 N×32×32×3 RGB pixels, for encoding as PNG (255 ↔ 1.0 after /255)."""
    x = preprocess(images).transpose(0, 2, 3, 1)
    return np.round(x * 255).astype(np.uint8)


def train(
    split: Split, *, epochs: int = 3, seconds: float | None = None, seed: int = 0
) -> nn.Module:
    """Train resnet18-cifar in train mode (BatchNorm statistics move); seeded, so the same
    weights every run unless `seconds` cuts training short (3 epochs: ~98% held out)."""
    torch.manual_seed(seed)
    model = resnet18_cifar(num_classes=len(LABELS), in_channels=3)
    x = torch.from_numpy(preprocess(split.train_images))
    y = torch.from_numpy(split.train_labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    deadline = time.monotonic() + seconds if seconds is not None else float("inf")
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            if time.monotonic() > deadline:
                return model.eval()
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())


def predict(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Eval-mode logits of the torch model for raw digits images."""
    model.eval()
    with torch.inference_mode():
        return model(torch.from_numpy(preprocess(images))).numpy()


def save(model: nn.Module, out_dir: Path) -> tuple[Path, Path]:
    """Write `resnet18.ckpt` (a plain state_dict) and `labels.txt` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "resnet18.ckpt"
    torch.save(model.state_dict(), checkpoint)
    labels = out_dir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return checkpoint, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("demo-out"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seconds", type=float, help="optional cap on training time")
    args = parser.parse_args()
    split = load_digits_split()
    model = train(split, epochs=args.epochs, seconds=args.seconds)
    checkpoint, _ = save(model, args.out_dir)
    acc = accuracy(predict(model, split.test_images), split.test_labels)
    print(f"saved {checkpoint}; held-out accuracy {acc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
