"""Safe image decoding: size limit from the header, full decode, EXIF rotation, explicit RGB conversion.

Every image mltrack reads (splits, training, checks, inference) goes through :func:`load_rgb`, so the
rules live once:

- The pixel count is read from the header and checked *before* any pixel is decoded. PIL's own
  ``DecompressionBombWarning`` is escalated to an error, and the effective limit never exceeds
  ``PIL.Image.MAX_IMAGE_PIXELS`` (89.5 Mpx), whatever ``max_pixels`` says.
- Pixels are fully decoded (``img.load()``); ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set, so a
  truncated file is an error, never a half-grey picture.
- EXIF orientation is applied, so an image shot in portrait arrives in portrait.
- Modes become RGB explicitly: 16-bit and 32-bit integer greyscale are *scaled* to 0..255 (not clipped);
  images with an alpha channel (RGBA, LA, PA, P with a transparent index) are composited on opaque
  black, i.e. each channel is multiplied by alpha/255, so fully transparent pixels are black whatever
  colour the file stores under them; CMYK uses PIL's conversion (Adobe inverted CMYK handled by PIL).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mltrack.errors import DataError

# Lower-case suffixes of files treated as images; matching is case-insensitive (``.JPG`` counts).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class _BadImage(Exception):
    """Internal: why a file cannot be used; turned into a DataError (load) or a reason (verify)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True for a non-hidden file name with an image suffix (``.DS_Store``, ``._x.jpg`` are hidden)."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_rgb(path: Path, max_pixels: int) -> Image.Image:
    """Decode ``path`` into a fully loaded RGB image detached from the file.

    ``max_pixels`` is the largest width*height accepted (checked from the header, before decoding).
    Raises DataError naming the file and the reason for anything unreadable, too large or corrupt.
    """
    try:
        return _decode(Path(path), max_pixels)
    except _BadImage as bad:
        raise DataError(f"cannot read image {path}: {bad.reason}") from None


def verify(
    path: Path, max_pixels: int, on_decoded: Callable[[Image.Image], None] | None = None
) -> str | None:
    """Return why ``path`` is not a usable image (empty, not an image, too large, truncated, bad CRC), or None.

    Runs the format's integrity check (PNG chunk CRCs, which a plain decode skips for pixel data) and
    then the same full decode as :func:`load_rgb`. Never raises for a bad file. ``on_decoded``, if given,
    receives the decoded RGB image of a good file before it is closed (so a caller such as the dataset
    check can fingerprint the pixels without decoding the file a second time); its errors propagate.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with _open_checked(path, max_pixels) as img:
            try:
                img.verify()
            except Exception as err:  # any failure of the integrity check means a corrupt file
                return f"corrupt: {_describe(err)}"
        rgb = _decode(path, max_pixels)
    except _BadImage as bad:
        return bad.reason
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    with rgb:
        if on_decoded is not None:
            on_decoded(rgb)
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any PIL mode to RGB (rules in the module docstring); may return ``img``."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(img)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """Map 16/32-bit integer or float greyscale to uint8 by scaling, keeping the tonal ramp.

    Integer data is read as 16-bit (0..65535 -> 0..255, rounding); mode ``I`` values outside that range are
    clipped first. Float data is taken as 0..1 when its maximum is <= 1, else as 0..255.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        if arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        return np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _pixel_limit(max_pixels: int) -> int:
    return min(int(max_pixels), int(Image.MAX_IMAGE_PIXELS or max_pixels))


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before anything is decoded.

    PIL checks the header size inside ``Image.open``: above 2x ``MAX_IMAGE_PIXELS`` it raises, above
    ``MAX_IMAGE_PIXELS`` it only warns. The warning is caught here for this call (a process-wide filter
    would be reset by test runners and would change code that is not ours) and turned into a refusal.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except FileNotFoundError:
            raise _BadImage("file not found") from None
        except UnidentifiedImageError:
            empty = path.is_file() and path.stat().st_size == 0
            raise _BadImage("empty file (0 bytes)" if empty else "not an image (unrecognised format)") from None
        except Image.DecompressionBombError as err:
            raise _BadImage(f"too large (decompression bomb): {err}") from None
        except Exception as err:  # a malformed header of a recognised format
            raise _BadImage(f"corrupt header: {_describe(err)}") from None
    bomb = False
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            bomb = True
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    width, height = img.size
    limit = _pixel_limit(max_pixels)
    if bomb or width * height > limit or width <= 0 or height <= 0:
        img.close()
        raise _BadImage(
            f"image size {width}x{height} = {width * height:,} px is outside 1..{limit:,} px "
            "(decompression-bomb limit data.max_image_pixels; raise it only for trusted data)"
        )
    return img


def _decode(path: Path, max_pixels: int) -> Image.Image:
    img = _open_checked(path, max_pixels)
    with img, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img.load()
        except Exception as err:  # truncated data, bad zlib stream, decoder errors: all mean a bad file
            raise _BadImage(f"cannot decode: {_describe(err)}") from None
        try:
            upright = ImageOps.exif_transpose(img)
            rgb = to_rgb(upright if upright is not None else img)
        except Exception as err:
            raise _BadImage(f"cannot convert to RGB: {_describe(err)}") from None
        # ``img`` is closed when the with-block ends; hand back an independent copy.
        return rgb.copy() if rgb is img else rgb


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
