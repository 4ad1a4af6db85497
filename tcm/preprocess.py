"""Image preprocessing shared by training, evaluation and serving.

One function turns a decoded uint8 image array into the network's input tensor, so the vectors the
service computes are the vectors training evaluated. Decoding (PIL, npz) stays with the callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become the input tensor; stored in every manifest."""

    image_size: tuple[int, int] = (28, 28)  # (height, width)
    channels: int = 1  # 1 = grey, 3 = RGB
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    invert: bool = False  # ink-on-paper sets (Omniglot) are stored inverted so that ink = 1
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (height, width) > 0, got {self.image_size}")

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Preprocessing:
        return cls(
            image_size=tuple(d["image_size"]),  # type: ignore[arg-type]
            channels=int(d["channels"]),  # type: ignore[arg-type]
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[union-attr]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[union-attr]
            invert=bool(d.get("invert", False)),
            extra=dict(d.get("extra", {})),  # type: ignore[arg-type]
        )


def stage_image(image: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """One uint8 (or bool) image ``(H, W)`` / ``(H, W, C)`` -> its pixels ready for the batch,
    before normalisation: the per-image half of :func:`to_input_tensor`.

    An image already at the spec's size that needs no grey conversion stays uint8
    ``(h, w, channels)`` (a quarter of the bytes; no float work): its conversion happens once
    per batch, on the device, in :func:`normalise_staged`. Any other image is converted to the
    spec's channels, scaled to [0, 1] and resized with antialiased bilinear interpolation, as
    float32 ``(channels, h, w)``. Either way the batch's input is bit for bit what per-image
    preprocessing gave (``tests/tcm/test_preprocess.py`` keeps the old function as oracle).
    """
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    size = tuple(arr.shape[:2]) == tuple(spec.image_size)
    if size and arr.shape[2] == spec.channels:
        return np.ascontiguousarray(arr)
    if size and arr.shape[2] == 1:  # grey for a colour model: the same value in each channel
        return np.ascontiguousarray(np.broadcast_to(arr, (*arr.shape[:2], 3)))
    # a writable C-contiguous copy: torch.from_numpy refuses (warns on) read-only buffers
    t = torch.from_numpy(np.array(arr, order="C")).permute(2, 0, 1).float() / 255.0
    if t.shape[0] == 3 and spec.channels == 1:
        t = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]).unsqueeze(0)
    elif t.shape[0] == 1 and spec.channels == 3:
        t = t.expand(3, -1, -1)
    if tuple(t.shape[1:]) != tuple(spec.image_size):
        t = F.interpolate(
            t.unsqueeze(0),
            size=tuple(spec.image_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        ).squeeze(0)
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def normalise_staged(
    staged: Sequence[np.ndarray], spec: Preprocessing, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Staged images (:func:`stage_image`) -> the network's input ``(N, C, h, w)`` on ``device``:
    the per-batch half of :func:`to_input_tensor`. The uint8 images travel to the device as
    one uint8 batch (a quarter of the bytes) and are scaled there; then inversion and
    normalisation run once for the whole batch."""
    if not staged:
        raise ValueError("no images given")
    h, w = spec.image_size
    small = [i for i, s in enumerate(staged) if s.dtype == np.uint8]
    if len(small) == len(staged):
        x = _scaled(np.stack(staged), device)
    else:
        x = torch.empty((len(staged), spec.channels, h, w), dtype=torch.float32, device=device)
        if small:
            x[small] = _scaled(np.stack([staged[i] for i in small]), device)
        big = [i for i, s in enumerate(staged) if s.dtype != np.uint8]
        x[big] = torch.from_numpy(np.stack([staged[i] for i in big])).to(device)
    if spec.invert:
        x = 1.0 - x
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    return (x - mean) / std


def _scaled(pixels: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, h, w, C) -> float (N, C, h, w) in [0, 1], contiguous, computed on ``device``."""
    batch = torch.from_numpy(pixels).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).contiguous().float() / 255.0


def to_input_tensor(images: list[np.ndarray] | np.ndarray, spec: Preprocessing) -> torch.Tensor:
    """uint8 (or bool) arrays ``(H, W)`` / ``(H, W, C)`` -> float tensor ``(N, C, h, w)``.

    Images may differ in size; each is converted to the spec's channels, resized with antialiased
    bilinear interpolation, scaled to [0, 1], optionally inverted and normalised
    (:func:`stage_image` per image, then :func:`normalise_staged` for the batch).
    """
    # one image (H, W) or (H, W, C<=4); anything else is a sequence of images (N, H, W[, C])
    if isinstance(images, np.ndarray) and (
        images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4))
    ):
        images = [images]
    return normalise_staged([stage_image(img, spec) for img in images], spec)
