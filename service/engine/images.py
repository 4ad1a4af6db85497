"""Turning client-supplied image bytes into uint8 arrays, safely.

The pixel count is checked from the header before any pixel is decoded (a 100 kB PNG can claim
50,000 x 50,000 pixels), only common still-image formats are accepted, and every decoding
failure becomes an :class:`InvalidInputError` naming the offending image.

Images far larger than the model's input are shrunk while they are decoded: a JPEG is decoded
at a reduced DCT scale (``Image.draft``), other formats are box-reduced (``Image.reduce``) right
after decoding, before any conversion or copy. Both stop at ``SHRINK_MARGIN`` times the model's
input size, so the final antialiased resize in :func:`tcm.to_input_tensor` still averages at
least that many source pixels per output pixel in each direction, and images up to twice that
size (every image of the training sets) are decoded exactly as training decoded them.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInputError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")


def decode_base64(data: str, *, where: str) -> bytes:
    """Standard base64 (a ``data:image/...;base64,`` prefix is allowed)."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(
            f"{where} is not valid base64: {exc}", code="invalid_image", detail={"where": where}
        ) from exc
    if not raw:
        raise InvalidInputError(f"{where} is empty", code="invalid_image", detail={"where": where})
    return raw


SHRINK_MARGIN = 4
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "I", "F")


def header_pixels(raw: bytes) -> int | None:
    """width x height as the image's header claims it, without decoding a pixel (None when
    the bytes are not an image this module reads: :func:`decode_image` says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=FORMATS) as img:
                width, height = img.size
    except Exception:  # any failure is reported by decode_image, image by image
        return None
    return max(0, width) * max(0, height)


def decode_image(
    raw: bytes, *, channels: int, max_pixels: int, where: str, target: tuple[int, int] | None = None
) -> np.ndarray:
    """Image bytes -> uint8 array (H, W) for grey models, (H, W, 3) for colour ones.

    The conversion matches PIL's ``convert("L")`` / ``convert("RGB")``, what image loaders in
    training commonly use. ``target`` (height, width), the model's input size, lets a much
    larger image be shrunk while it is decoded (see the module's docstring).
    """
    if not raw:
        raise InvalidInputError(f"{where} is empty", code="invalid_image", detail={"where": where})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise InvalidInputError(
                    f"{where} has no pixels", code="invalid_image", detail={"where": where}
                )
            if width * height > max_pixels:
                raise InvalidInputError(
                    f"{where} has {width}x{height} pixels, more than the limit of {max_pixels}",
                    code="image_too_large",
                    detail={
                        "where": where,
                        "width": width,
                        "height": height,
                        "max_pixels": max_pixels,
                    },
                )
            img.seek(0)
            mode = "L" if channels == 1 else "RGB"
            if target is not None:
                img = _shrunk(img, mode, target)
            img = img.convert(mode)
            arr = np.array(img, dtype=np.uint8)  # a writable copy, as torch wants
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(
            f"{where} claims too many pixels: {exc}",
            code="image_too_large",
            detail={"where": where, "max_pixels": max_pixels},
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidInputError(
            f"{where} is not a decodable image ({'/'.join(FORMATS)}): {exc}",
            code="invalid_image",
            detail={"where": where},
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidInputError(
            f"{where} could not be decoded: {exc}", code="invalid_image", detail={"where": where}
        ) from exc
    return np.ascontiguousarray(arr)


def _shrunk(img: Image.Image, mode: str, target: tuple[int, int]) -> Image.Image:
    """Decodes ``img`` at no less than ``SHRINK_MARGIN`` x ``target`` where it is larger."""
    want_w, want_h = SHRINK_MARGIN * target[1], SHRINK_MARGIN * target[0]
    if img.format == "JPEG" and img.width >= 2 * want_w and img.height >= 2 * want_h:
        # DCT scaling (1/2, 1/4 or 1/8 size, never below the size asked for); the mode is
        # kept, so the colour conversion stays the one training used
        img.draft(img.mode, (want_w, want_h))
    img.load()
    factor = min(img.width // want_w, img.height // want_h)
    if factor < 2:
        return img
    if img.mode not in _REDUCIBLE:
        img = img.convert(mode)  # palette, 1-bit, CMYK...: reduce works on plain modes
    return img.reduce(factor)
