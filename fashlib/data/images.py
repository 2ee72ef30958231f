"""The one way fashlib opens an image file: decoded fully, EXIF orientation applied, converted to RGB.

Every reader of pixels in the package (the torch dataset, the plots, the analysis of image sizes)
goes through `open_rgb` / `oriented_size`, so a photo is seen the same way everywhere:

- EXIF orientation (tag 0x0112, set by phones instead of rotating the pixels) is applied with
  PIL.ImageOps.exif_transpose, so width/height and box coordinates refer to the image as displayed;
- every PIL mode becomes 8-bit RGB: palette (P) and grey (L, 1) by PIL's conversion; 16/32-bit
  integer grey (I;16, I;16B, I;16L, I) by scaling 0..65535 to 0..255 (PIL's own conversion clips
  at 255, which turns a 16-bit photo white); 32-bit float grey (F) by its range (0..1 times 255, which
  PIL's conversion would truncate to black); CMYK and YCbCr by PIL's conversion;
- transparency (modes RGBA, LA, PA, La, RGBa, or a palette/grey/RGB image with a `transparency`
  entry) is composited on WHITE, the usual background of shop photos (PIL's convert("RGB") would
  keep the hidden colour, often black).

A file that cannot be decoded raises UndecodableImageError naming the file; tables are cleaned of
such rows beforehand by fashlib.data.drop_undecodable.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["open_rgb", "oriented_size", "to_rgb", "UndecodableImageError", "DECODE_ERRORS", "EXIF_ORIENTATION"]

EXIF_ORIENTATION = 0x0112  # orientation values 5..8 swap width and height
# what PIL raises on broken or hostile files (truncated data, unknown format, decompression bomb)
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
WHITE = (255, 255, 255)


class UndecodableImageError(OSError):
    """An image file could not be decoded (message names the file, the reason and the fix)."""


def _float_grey_to_8bit(grey: np.ndarray) -> np.ndarray:
    """32-bit float grey (mode F) -> uint8 by its range: 0..1 (the usual float convention) times 255, up to
    255 as is, wider ranges as 16-bit (/257). PIL's own conversion truncates, turning a 0..1 image black."""
    finite = grey[np.isfinite(grey)]
    top = float(finite.max()) if finite.size else 0.0
    scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else 1 / 257.0
    return np.clip(np.rint(np.nan_to_num(grey * scale, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency composited on `background`; wide grey scaled to 8 bits."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _WIDE_GREY_MODES:
        grey = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(_float_grey_to_8bit(np.asarray(img, dtype=np.float64)), mode="L")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(path: str | os.PathLike, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `path` fully into an oriented 8-bit RGB image (see the module docstring for the rules).

    draft_size: let JPEG decoding shrink by a power of two to no less than this (w, h) (fast; used to
    check that a file decodes); None decodes at full size. Raises UndecodableImageError (an OSError)
    naming the file when it is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            if draft_size is not None:
                img.draft("RGB", draft_size)
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except DECODE_ERRORS as err:
        raise UndecodableImageError(
            f"cannot decode image {path}: {type(err).__name__}: {err}. Remove such rows before computing with "
            "fashlib.data.drop_undecodable(table) (fashlib.data.protocols.load_table does it)."
        ) from err


def oriented_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), read from the header only."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
