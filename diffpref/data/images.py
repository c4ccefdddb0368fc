"""Decode and validate images into 8-bit RGB, converting odd modes instead of dropping them."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffpref.data.errors import ImageRejected

# 16.7 megapixels: far above any diffusion training resolution, far below what
# would exhaust memory when a batch of such images is decoded.
DEFAULT_MAX_PIXELS = 4096 * 4096

ImageSource = bytes | bytearray | memoryview | str | os.PathLike


def decode_image(data: ImageSource | None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes or an image file into an 8-bit RGB PIL image.

    Grayscale, palette, alpha (composited on white), CMYK and 16/32-bit images are
    converted, not rejected. Raises ``ImageRejected`` whose ``reason`` is one of
    ``missing_image`` (None or empty bytes), ``missing_file`` (path does not
    exist), ``too_large`` (more than ``max_pixels`` pixels; checked from the header
    before the pixels are decoded; None disables the check) or ``undecodable_image``.
    """
    if data is None:
        raise ImageRejected("missing_image", "no image data")
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageRejected("missing_image", "empty image data")
        fp: io.BytesIO | Path = io.BytesIO(bytes(data))
        what = f"{len(data)} bytes"
    else:
        fp = Path(data).expanduser()
        what = str(fp)
        if not fp.is_file():
            raise ImageRejected("missing_file", f"no such file: {fp}")

    try:
        # Our own max_pixels check below replaces PIL's global bomb warning; PIL's
        # hard DecompressionBombError (over twice Image.MAX_IMAGE_PIXELS) still
        # fires inside open() and is mapped to too_large.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                width, height = image.size  # read from the header; no pixels decoded yet
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageRejected("too_large", f"{width}x{height} exceeds max_pixels={max_pixels} ({what})")
                if width == 0 or height == 0:
                    raise ImageRejected("undecodable_image", f"image has size {width}x{height} ({what})")
                image.load()
                return to_rgb(image)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", f"{exc} ({what})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        # PIL reports truncated or corrupt data through several exception types.
        raise ImageRejected("undecodable_image", f"{type(exc).__name__}: {exc} ({what})") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image``: transparency goes on white, high bit depths are rescaled."""
    # Photos from phones store their rotation in EXIF; show the model what the rater saw.
    # exif_transpose returns a new image (a plain copy when there is no rotation),
    # so the result never shares pixels or a file handle with the caller's image.
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        image = _high_depth_to_l(image)
        mode = "L"
    has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        # Composite on white: transparent regions would otherwise become whatever
        # colour the hidden RGB values happen to hold (often black).
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Rescale a 16-bit, 32-bit integer or float grayscale image to 8-bit "L".

    PIL's own convert("L") clips such values at 255 instead of scaling them, which
    turns most 16-bit images pure white.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        # Float images are usually normalised to [0, 1]; otherwise assume 0..255.
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    elif image.mode == "I" and (values.size == 0 or values.max() <= 255):
        # A 32-bit integer image holding 8-bit values: keep them as they are.
        scale = 1.0
    else:
        # 16-bit data: 65535 / 257 = 255 exactly.
        scale = 1.0 / 257.0
    scaled = np.nan_to_num(values * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
