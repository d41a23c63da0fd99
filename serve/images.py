"""Decode encoded images (PNG, JPEG, ...) and preprocess them with a model's metadata."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from serve.errors import ServeError, invalid, shown
from serve.model_info import ModelInfo

_MODES = {1: "L", 3: "RGB"}
# The formats Classify decodes. Pillow reads many more, but fuzzing its other plugins with
# malformed bytes raised NotImplementedError (DDS, BLP), AttributeError (SPIDER) and TypeError
# (TIFF, whose libtiff also writes to stderr), and EPS runs Ghostscript where it is installed.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
_NAMES = "PNG, JPEG, GIF, BMP or WebP"


def decode(info: ModelInfo, data: bytes, index: int, max_pixels: int) -> np.ndarray:
    """One image as float32 [C, H, W]: resized, channels converted, scaled to [0, 1], normalized.

    The size in the header is checked before any pixel is decoded, so a decompression bomb
    costs nothing. Raises INVALID_ARGUMENT for anything that is not a decodable image.
    """
    shape = info.image_shape
    if shape is None or shape[0] not in _MODES:
        raise invalid(
            f"expected tensors for model {info.name} (input {list(info.sample_shape)} is not an "
            "image with 1 or 3 channels), got encoded image bytes; send Image.tensor instead"
        )
    channels, height, width = shape
    try:
        # Image.open reads only the header; Pillow itself refuses sizes far above its limit.
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        pixels = image.size[0] * image.size[1]
        if pixels > max_pixels:
            raise invalid(
                f"expected images of at most {max_pixels} pixels, got image {index} of "
                f"{image.size[0]}x{image.size[1]}; resize it before sending"
            )
        image = image.convert(_MODES[channels])
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32)
    except Image.DecompressionBombError as e:
        raise invalid(
            f"expected a reasonably sized image, got image {index} refused by Pillow ({e}); "
            "resize it before sending"
        ) from e
    except (ServeError, MemoryError):
        raise
    except UnidentifiedImageError as e:
        raise invalid(
            f"expected image {index} to be a {_NAMES} image, got bytes in none of these "
            "formats; convert it to PNG or JPEG"
        ) from e
    except Exception as e:  # a decoder's error on bytes it cannot read, whatever its type
        raise invalid(
            f"expected image {index} to be a complete {_NAMES} image, got an undecodable one "
            f"({type(e).__name__}: {shown(str(e))}); check the file"
        ) from e
    array = array.reshape(height, width, channels).transpose(2, 0, 1) / np.float32(255.0)
    mean = np.asarray(info.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(info.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((array - mean) / std, dtype=np.float32)
