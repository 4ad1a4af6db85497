"""Detection (dlib HOG), 5-point alignment (``get_face_chip``) and the 128-d ResNet descriptor.

One :class:`FaceFrontEnd` turns a decoded photo into an aligned 150x150 face chip
(:meth:`FaceFrontEnd.locate`) and chips into descriptors (:meth:`FaceFrontEnd.describe`, batched).
The two steps are separate so that a server can run detection in each request's thread and the
descriptor network once per batch of many requests.

Choices (documented in docs/architecture.md and service/README.md):
- several faces: the largest box is used, and the box is reported;
- no face: :class:`NoFaceError`, unless ``fallback="whole_image"``, which aligns inside the whole
  image instead (meant for tight crops such as LFW's, where the face fills the frame);
- small photos are searched again at 2x (the HOG window is 80 px; 2x finds faces down to ~40 px);
  smaller faces are not found;
- photos larger than ``max_side`` are shrunk (block average, then bilinear) before detection, so a
  24-megapixel photo costs what a 1-megapixel one does; boxes are reported in the original pixels;
- grey images are replicated to three channels (the descriptor wants RGB).
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from facekit.models import ModelFilesError, model_paths

DETECTOR = "dlib_hog_frontal_v1"
ALIGNER = "dlib_5pt_face_chip_150"
DESCRIPTOR = "dlib_resnet_v1_128"
DESCRIPTOR_DIM = 128
CHIP_SIZE = 150  # what the descriptor network was trained on
CHIP_PADDING = 0.25


class NoFaceError(ValueError):
    """No face was found in an image (and no fallback was allowed)."""


@dataclass(frozen=True)
class FaceOptions:
    """How faces are found; stored in the artefact so serving does what training did."""

    fallback: str = "none"  # "none" | "whole_image"
    upsample_below: int = 640  # retry at 2x when no face is found and max side <= this
    max_side: int = 1024  # larger photos are shrunk before detection

    def __post_init__(self) -> None:
        if self.fallback not in ("none", "whole_image"):
            raise ValueError(f"fallback must be 'none' or 'whole_image', got {self.fallback!r}")
        if self.max_side < 64 or self.upsample_below < 0:
            raise ValueError("max_side must be >= 64 and upsample_below >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaceOptions:
        return cls(**{k: d[k] for k in ("fallback", "upsample_below", "max_side") if k in d})


@dataclass(frozen=True)
class Face:
    """An aligned face chip and where it came from (box in the original image's pixels)."""

    chip: np.ndarray  # (150, 150, 3) uint8
    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive)
    detected: bool  # False: the whole-image fallback was used
    faces_found: int

    def info(self) -> dict[str, Any]:
        return {"box": list(self.box), "detected": self.detected, "faces_found": self.faces_found}


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> C-contiguous (H, W, 3)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"expected an image (H, W) or (H, W, 3), got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3])


def shrink(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscales so that the longer side is <= max_side; returns (image, scale = new/old)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image, 1.0
    k = math.ceil(max(h, w) / max_side)  # integer block average first (anti-aliasing) ...
    hh, ww = (h // k) * k, (w // k) * k
    small = image[:hh, :ww].reshape(hh // k, k, ww // k, k, 3).mean(axis=(1, 3))
    small = np.ascontiguousarray(small.round().astype(np.uint8))
    return small, small.shape[0] / h


class FaceFrontEnd:
    """Loads the dlib models once; thread-safe (each dlib object behind its own lock)."""

    def __init__(self, options: FaceOptions | None = None) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise ModelFilesError(
                "face models need dlib: pip install '.[faces]' (dlib-bin)"
            ) from exc
        self._dlib = dlib
        self.options = options or FaceOptions()
        paths = model_paths()
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(paths["landmarks"]))
        self._net = dlib.face_recognition_model_v1(str(paths["descriptor"]))
        self._detect_lock = threading.Lock()
        self._net_lock = threading.Lock()

    def _detect(self, img: np.ndarray) -> list[Any]:
        with self._detect_lock:
            rects = list(self._detector(img, 0))
            if not rects and max(img.shape[:2]) <= self.options.upsample_below:
                rects = list(self._detector(img, 1))
        return rects

    def locate(self, image: np.ndarray, *, where: str = "image") -> Face:
        """The largest face, 5-point aligned; :class:`NoFaceError` (naming ``where``) if none."""
        dlib = self._dlib
        rgb = as_rgb(image)
        img, scale = shrink(rgb, self.options.max_side)
        rects = self._detect(img)
        h, w = img.shape[:2]
        if rects:
            rect = max(rects, key=lambda r: r.width() * r.height())
            detected = True
        elif self.options.fallback == "whole_image":
            rect = dlib.rectangle(0, 0, w - 1, h - 1)
            detected = False
        else:
            raise NoFaceError(
                f"no face found in {where} ({rgb.shape[1]}x{rgb.shape[0]} pixels); the detector "
                "finds frontal faces at least ~40 px wide: send a photo with a visible face"
            )
        with self._detect_lock:
            shape = self._predictor(img, rect)
        chip = dlib.get_face_chip(img, shape, size=CHIP_SIZE, padding=CHIP_PADDING)

        def orig(v: float, limit: int) -> int:
            return int(min(max(round(v / scale), 0), limit))

        H, W = rgb.shape[:2]
        box = (
            orig(rect.left(), W),
            orig(rect.top(), H),
            orig(rect.right() + 1, W),
            orig(rect.bottom() + 1, H),
        )
        return Face(np.ascontiguousarray(chip), box, detected, len(rects))

    def describe(self, chips: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Aligned chips (n, 150, 150, 3) uint8 -> descriptors (n, 128) float32 (not normalised;
        dlib's are ~unit length and compared by Euclidean distance 0.6)."""
        batch = [np.ascontiguousarray(c, dtype=np.uint8) for c in chips]
        if not batch:
            return np.zeros((0, DESCRIPTOR_DIM), np.float32)
        with self._net_lock:
            vecs = self._net.compute_face_descriptor(batch)
        return np.asarray([np.asarray(v) for v in vecs], dtype=np.float32)

    def descriptors(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[Face]]:
        faces = [self.locate(im, where=f"image {i}") for i, im in enumerate(images)]
        return self.describe([f.chip for f in faces]), faces
