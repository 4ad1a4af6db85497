"""Turning client-supplied image bytes into uint8 arrays, safely.

The pixel count is checked from the header before any pixel is decoded (a 100 kB PNG can claim
50,000 x 50,000 pixels), only common still-image formats are accepted, and every decoding
failure becomes an :class:`InvalidInputError` naming the offending image.
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
        raise InvalidInputError(f"{where} is not valid base64: {exc}", code="invalid_image",
                                detail={"where": where}) from exc
    if not raw:
        raise InvalidInputError(f"{where} is empty", code="invalid_image",
                                detail={"where": where})
    return raw


def decode_image(raw: bytes, *, channels: int, max_pixels: int, where: str) -> np.ndarray:
    """Image bytes -> uint8 array (H, W) for grey models, (H, W, 3) for colour ones.

    The conversion matches PIL's ``convert("L")`` / ``convert("RGB")``, what image loaders in
    training commonly use.
    """
    if not raw:
        raise InvalidInputError(f"{where} is empty", code="invalid_image",
                                detail={"where": where})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise InvalidInputError(f"{where} has no pixels", code="invalid_image",
                                        detail={"where": where})
            if width * height > max_pixels:
                raise InvalidInputError(
                    f"{where} has {width}x{height} pixels, more than the limit of {max_pixels}",
                    code="image_too_large",
                    detail={"where": where, "width": width, "height": height,
                            "max_pixels": max_pixels})
            img.seek(0)
            img = img.convert("L" if channels == 1 else "RGB")
            arr = np.array(img, dtype=np.uint8)  # a writable copy, as torch wants
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"{where} claims too many pixels: {exc}",
                                code="image_too_large",
                                detail={"where": where, "max_pixels": max_pixels}) from exc
    except UnidentifiedImageError as exc:
        raise InvalidInputError(f"{where} is not a decodable image ({'/'.join(FORMATS)}): "
                                f"{exc}", code="invalid_image", detail={"where": where}
                                ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidInputError(f"{where} could not be decoded: {exc}", code="invalid_image",
                                detail={"where": where}) from exc
    return np.ascontiguousarray(arr)
