"""Decode encoded images (PNG, JPEG, ...) and preprocess them with a model's metadata."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator

import grpc
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
# 16-bit grey PNGs open as I;16 (older Pillow opened them as I). Pillow's convert to L or RGB
# clips their values at 255, which turns every pixel above 255/65535 white; they are scaled.
_DEEP_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_DEEP_MAX = np.float32(65535.0)
_ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation → the transpose that shows the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def use_own_pixel_limit() -> None:
    """Turn off Pillow's process-wide decompression-bomb limit (a warning above ~89M pixels,
    an error above ~179M), since ``decode`` checks every header against the server's
    ``--max-image-pixels`` first: with Pillow's on, a limit set above Pillow's was refused
    anyway and a size between the two logged a warning per image. ``python -m serve`` calls
    it; an application that embeds ``Server`` keeps Pillow's limit unless it calls it."""
    Image.MAX_IMAGE_PIXELS = None


def decode(
    info: ModelInfo,
    data: bytes,
    index: int,
    max_pixels: int,
    spend: Callable[[int], None] | None = None,
) -> np.ndarray:
    """One image as float32 [C, H, W]: turned upright (EXIF orientation), channels converted,
    resized, scaled to [0, 1], normalized.

    The size in the header is checked before any pixel is decoded, so a decompression bomb
    costs nothing; ``spend`` is then given width x height, and what it raises ends the decode.
    Raises INVALID_ARGUMENT for anything that is not a decodable image.
    """
    channels, height, width = _check_takes_images(info)
    with _reading(index):
        image = _open(data, index, max_pixels)
        if spend is not None:  # the call's bound on source pixels (serve/classify.py)
            spend(image.size[0] * image.size[1])
        image.load()  # the first frame of an animation; errors in the pixel data end here
        array = _pixels(image, channels, (width, height))
    mean = np.asarray(info.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(info.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((array.transpose(2, 0, 1) - mean) / std, dtype=np.float32)


def _check_takes_images(info: ModelInfo) -> tuple[int, int, int]:
    """The model's (C, H, W); INVALID_ARGUMENT unless it takes 1- or 3-channel images."""
    shape = info.image_shape
    if shape is None or shape[0] not in _MODES:
        raise invalid(
            f"expected tensors for model {info.name} (input {list(info.sample_shape)} is not an "
            "image with 1 or 3 channels), got encoded image bytes; send Image.tensor instead"
        )
    return shape


def _open(data: bytes, index: int, max_pixels: int) -> Image.Image:
    """Image ``index`` with only its header read, refused when empty or above ``max_pixels``."""
    if not data:  # an empty file read, or the wrong variable sent
        raise invalid(
            f"expected image {index} to be a {_NAMES} image, got 0 bytes; send the file's bytes"
        )
    # Image.open reads only the header (python -m serve turns Pillow's own limit off).
    image = Image.open(io.BytesIO(data), formats=FORMATS)
    if image.size[0] * image.size[1] > max_pixels:
        raise invalid(
            f"expected images of at most {max_pixels} pixels, got image {index} of "
            f"{image.size[0]}x{image.size[1]}; resize it before sending"
        )
    return image


@contextlib.contextmanager
def _reading(index: int) -> Iterator[None]:
    """Pillow's errors while reading image ``index`` as the status they deserve."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise invalid(
            f"expected a reasonably sized image, got image {index} refused by Pillow ({e}); "
            "resize it before sending"
        ) from e
    except ServeError:
        raise
    except MemoryError as e:
        # A bug it is not (the answer said INTERNAL, "please report it"): a busy or small
        # server, a big image. Other calls go on; this one may succeed later.
        raise ServeError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"expected memory to decode image {index}, got none left on the server; retry with "
            "backoff, or send smaller images or fewer per call",
        ) from e
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


def _pixels(image: Image.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A loaded ``image`` as float32 [H, W, channels] in [0, 1], upright and resized to
    ``size`` (width, height). Alpha is dropped, as torchvision's loader (``convert("RGB")``)
    drops it."""
    orientation = _orientation(image)
    if image.mode in _DEEP_GREY:
        image, scale = image.convert("F"), _DEEP_MAX
    else:
        if image.mode == "P" and "transparency" in image.info:
            # The same pixels as convert("RGB"), without Pillow's UserWarning in the log.
            image = image.convert("RGBA")
        image, scale = image.convert(_MODES[channels]), np.float32(255.0)
    upright = _UPRIGHT.get(orientation)
    if upright is not None:
        image = image.transpose(upright)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    width, height = size
    array = np.asarray(image, dtype=np.float32).reshape(height, width, -1) / scale
    if array.shape[2] != channels:  # deep grey for an RGB model: grey in every channel
        array = np.repeat(array, channels, axis=2)
    return array


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright) of a loaded ``image``."""
    try:
        return int(image.getexif().get(_ORIENTATION, 1))
    except Exception:  # a camera's malformed EXIF: use the pixels as stored rather than fail
        return 1
