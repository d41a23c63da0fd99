"""The demo leaves the sample images that README's client commands send."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import demo
import train_digits


def test_demo_writes_one_png_per_digit(tmp_path) -> None:
    split = train_digits.load_digits_split()
    paths = demo.step_write_pngs(tmp_path, split)
    assert [p.name for p in paths] == [f"digit{d}.png" for d in range(10)]
    for digit, path in enumerate(paths):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
            pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255
        # The server's preprocessing of the file (/255, mean 0, std 1) gives a held-out image
        # of that digit, as the model was trained to see it.
        matches = [
            i
            for i in np.flatnonzero(split.test_labels == digit)
            if np.abs(train_digits.preprocess(split.test_images[i : i + 1])[0] - pixels).max()
            <= 0.5 / 255 + 1e-6
        ]
        assert matches, f"{path.name} is not a held-out image of {digit}"
