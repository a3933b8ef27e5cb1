"""Image files → the ViT tower's pixels: uint8[S, S, 3], as open_clip's eval transform makes them.

open_clip (`image_transform(S, is_train=False)`, resize mode "shortest") resizes the shorter
side to S with PIL's bicubic filter (the longer side to int(S · long / short)), center-crops
S × S (offsets round((size − S) / 2)) and then converts to RGB; ToTensor / Normalize happen in
the tower (models/vit.normalize_pixels), so what is stored and batched stays uint8. The order
is open_clip's, so a converted open_clip checkpoint sees the values open_clip's own
preprocessing would give it (tests/test_images.py checks this on PNG and JPEG files).

Where open_clip would silently produce garbage, files are converted first: 16-bit and 32-bit
grayscale (PIL modes I;16*, I, F) are scaled to 8 bits (PIL's own RGB conversion clips them to
white). A file that is not an image, is truncated, is empty or larger than `max_pixels` raises
`BadImageError` naming the file and what was seen, before any training step runs.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldot_jax.core import paths

Source = Union[str, os.PathLike, bytes]

# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): ~89.5M pixels, 9459² px.
MAX_PIXELS = 89_478_485

# Modes whose values are not 8-bit: scaled to 8 bits before open_clip's steps.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadImageError(ValueError):
    """A file that cannot become pixels: not an image, truncated, empty or too large."""


def _describe(source: Source) -> str:
    return f"{len(source)} bytes" if isinstance(source, bytes) else os.fspath(source)


def decode(source: Source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A fully decoded PIL image (its own mode; the first frame of an animation) from a path
    (local or an object store, core/paths) or the file's bytes; BadImageError naming the
    file for anything that is not a whole image of at most `max_pixels` pixels."""
    what = _describe(source)
    if not isinstance(source, bytes):
        try:
            source = paths.read_bytes(source)
        except FileNotFoundError as e:
            raise BadImageError(f"{what}: no such image file") from e
    if not source:
        raise BadImageError(f"{what}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            # PIL warns above its bomb limit and raises above twice it; ours is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(f"{what}: {width} × {height} = {width * height:,} pixels "
                                    f"exceeds max_pixels={max_pixels:,} (a decompression "
                                    f"bomb or an unusually large picture; raise max_pixels "
                                    f"to accept it)")
            image.load()
    except BadImageError:
        raise
    except UnidentifiedImageError as e:
        raise BadImageError(f"{what}: not an image file PIL can read "
                            f"(starts with {source[:8]!r})") from e
    except Image.DecompressionBombError as e:
        # PIL refuses above twice its own limit before our check can run.
        raise BadImageError(f"{what}: larger than max_pixels={max_pixels:,} ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncated or corrupt data as OSError ("image file is truncated"),
        # SyntaxError (broken PNG chunks) or EOFError.
        raise BadImageError(f"{what}: corrupt or truncated image ({type(e).__name__}: "
                            f"{e})") from e
    if min(image.size) == 0:
        raise BadImageError(f"{what}: image of size {image.size[0]} × {image.size[1]}")
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """Modes with wider values → 8-bit "L", so RGB conversion does not clip them to white:
    16-bit ranges (I;16*, and "I" within [0, 65535]) / 257, floats within [0, 1] × 255,
    anything else stretched min → 0, max → 255."""
    if image.mode not in _WIDE_MODES:
        return image
    values = np.asarray(image, np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def resize_shortest(image: Image.Image, size: int) -> Image.Image:
    """The shorter side → size, bicubic, the longer → int(size · long / short) (torchvision's
    Resize(size) on a PIL image)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if width <= height else (new_long, new_short)
    return image if new == image.size else image.resize(new, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central size × size window (torchvision's CenterCrop on a PIL image: offsets
    round((side − size) / 2); sides shorter than size are padded with zeros around)."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
        image, (width, height) = padded, padded.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """A decoded PIL image → uint8[size, size, 3]: open_clip's eval steps without Normalize."""
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    image = center_crop(resize_shortest(_eight_bit(image), size), size).convert("RGB")
    return np.asarray(image, np.uint8)


def load_pixels(source: Source, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file (path or bytes) → uint8[size, size, 3] (decode, then to_pixels)."""
    return to_pixels(decode(source, max_pixels), size)
