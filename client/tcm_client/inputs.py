"""What the client takes as an image or a vector, and how it goes over the wire.

Images: ``bytes`` (a file's content), a path (``pathlib.Path``, or a ``str`` naming a file that
exists), a PIL image (sent as PNG, lossless), or base64 text (optionally a ``data:`` URL), as
the API takes it. A ``str`` that is neither an existing file nor base64 is refused here, naming
it, rather than sent for the service to refuse as "not valid base64".

Vectors: numpy arrays or sequences of numbers, sent as base64 of little-endian float32 (4/3
byte per byte instead of ~20 for JSON numbers, and no float parsing on either side) where the
API takes that form; JSON numbers where it does not, and for a vector whose values a float32
cannot hold (the service normalises huge finite values; float32 would make them infinite).
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Vector = np.ndarray | Sequence[float]
# an image: bytes (a file's content), a path (str or os.PathLike), a PIL image, or base64 text
ImageInput = Any

_BASE64 = re.compile(
    r"(data:[^,]*,)?([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)"
)


def _is_pil(image: Any) -> bool:
    pil = sys.modules.get("PIL.Image")  # a PIL image exists only once PIL is imported
    return pil is not None and isinstance(image, pil.Image)


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and os.path.isfile(text)
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def image_bytes(image: ImageInput, *, where: str = "image") -> bytes:
    """The image's file bytes (for the multipart upload routes)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, os.PathLike):
        return Path(image).read_bytes()
    if _is_pil(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(image, str):
        if _is_file(image):
            return Path(image).read_bytes()
        if _BASE64.fullmatch(image):
            return base64.b64decode(image.partition(",")[2] if image.startswith("data:") else image)
    raise _not_an_image(image, where)


def image_b64(image: ImageInput, *, where: str = "image") -> str:
    """The image as the JSON routes take it: base64 text (given base64 is passed through)."""
    if isinstance(image, str) and not _is_file(image):
        if _BASE64.fullmatch(image):
            return image
        raise _not_an_image(image, where)
    return base64.b64encode(image_bytes(image, where=where)).decode("ascii")


def _not_an_image(image: Any, where: str) -> Exception:
    if isinstance(image, str):
        shown = image if len(image) <= 80 else image[:77] + "..."
        return FileNotFoundError(
            f"{where}: {shown!r} is neither an existing file nor base64 image data"
        )
    return TypeError(
        f"{where}: an image is bytes, a path, a PIL image or base64 text, not "
        f"{type(image).__name__}"
    )


def vector_json(v: Vector) -> list[float]:
    """A vector as JSON numbers."""
    return np.asarray(v, dtype=np.float64).reshape(-1).tolist()


def vector_field(v: Vector) -> tuple[str, Any]:
    """``("embedding_b64", text)``, or ``("embedding", numbers)`` for a vector float32 cannot
    hold (finite values that float32 would make infinite)."""
    arr = np.asarray(v)
    with np.errstate(over="ignore"):  # an overflow is looked for just below
        f32 = arr.astype("<f4", copy=False).reshape(-1)
    if arr.dtype != np.float32 and not np.isfinite(f32).all() and np.isfinite(arr).all():
        return "embedding", vector_json(arr)
    return "embedding_b64", base64.b64encode(np.ascontiguousarray(f32).tobytes()).decode("ascii")


def matrix_b64(rows: np.ndarray) -> str:
    """An (n, d) matrix as base64 of row-major little-endian float32 (the columnar body)."""
    return base64.b64encode(np.ascontiguousarray(rows, dtype="<f4").tobytes()).decode("ascii")
