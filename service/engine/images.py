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
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInputError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
_READABLE = ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]
# what users send instead of an image, by the bytes it starts with: named in the 422 so that
# they know what to change (PIL's own message names a BytesIO object at a memory address)
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"%PDF", 0, "a PDF document"),
    (b"ftypheic", 4, "a HEIC photo (convert it to JPEG)"),
    (b"ftypheix", 4, "a HEIC photo (convert it to JPEG)"),
    (b"ftypmif1", 4, "a HEIF photo (convert it to JPEG)"),
    (b"ftypavif", 4, "an AVIF image (convert it to JPEG or PNG)"),
    (b"PK\x03\x04", 0, "a ZIP archive"),
    (b"\x1f\x8b", 0, "gzip-compressed data"),
    (b"<svg", 0, "an SVG drawing (rasterise it to PNG)"),
    (b"<?xml", 0, "XML text"),
    (b"<!DOCTYPE", 0, "an HTML page"),
    (b"<html", 0, "an HTML page"),
)
_BASE64_TEXT = re.compile(rb"^[A-Za-z0-9+/]+={0,2}\s*$")
_OBJECT_AT = re.compile(r"<[^<>]* object at 0x[0-9A-Fa-f]+>")


def what_it_looks_like(raw: bytes) -> str:
    """A short description of bytes that are not an image: what they look like, else their
    first bytes in hex."""
    head = raw[:32]
    for sig, offset, name in _SIGNATURES:
        if head[offset : offset + len(sig)].lower() == sig.lower():
            return name
    if _BASE64_TEXT.match(raw[:4096]) and len(raw.strip()) % 4 == 0:
        return "base64 text (was the image base64-encoded twice?)"
    if head[:1] in (b"{", b"["):
        return "JSON text"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "plain text"
    return f"bytes starting {head[:8].hex(' ')}"


def _plain(exc: BaseException) -> str:
    """An exception's message without Python object reprs (``<_io.BytesIO object at 0x...>``)."""
    return _OBJECT_AT.sub("the image", str(exc))


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
            f"{where} claims too many pixels: {_plain(exc)}",
            code="image_too_large",
            detail={"where": where, "max_pixels": max_pixels},
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidInputError(
            f"{where} is not an image the service reads: {_READABLE} are; these bytes look like "
            f"{what_it_looks_like(raw)}",
            code="invalid_image",
            detail={"where": where, "formats": list(FORMATS)},
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidInputError(
            f"{where} could not be decoded (truncated or corrupt?): {_plain(exc)}",
            code="invalid_image",
            detail={"where": where},
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
