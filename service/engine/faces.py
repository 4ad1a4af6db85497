"""Face artefacts in the service: the dlib front-end in front of the trained head.

A face artefact's network (:class:`tcm.embedders.FaceHead`) maps descriptors, not pixels. Here it
is put behind ``facekit``: each request's thread finds and aligns the face
(:meth:`FacePreparer.__call__`, the request's preprocessing step, so a photo without a face
fails its own request with a 422 naming it), and the batcher's single forward pass computes the
descriptors of the whole batch of aligned chips and applies the head (:class:`FaceModel`).

Before any of that, :func:`load_served_model` refuses an artefact whose dlib model files hash
differently from the installed ones: its head and threshold were fitted to other descriptors;
and where the ``faces`` extra is not installed (the default Docker image), it refuses a face
artefact with :class:`FacesExtraMissing`, one message saying which extra or image to install.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.engine.preparing import PixelPreparer, Preparer
from service.errors import InvalidInputError
from tcm import Manifest, load_artefact

# which face each image of the current request used (see :func:`face_report`)
_FACES: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "faces", default=None
)


FACES_EXTRA_HINT = (
    "install the faces extra: pip install '.[serve,pretrained,faces]' (dlib-bin, "
    "face-recognition-models), or run the Docker image's faces target "
    "(docker build -f deploy/docker/Dockerfile --target faces -t tcm-service-faces:local .)"
)


class FacesExtraMissing(RuntimeError):
    """A face artefact where the ``faces`` extra (dlib, the model files) is not installed."""


def require_faces_extra(path: str | Path) -> None:
    """Raises :class:`FacesExtraMissing` naming what is missing, unless ``facekit``, ``dlib``
    and the face model files (``face_recognition_models``, or ``TCM_FACE_MODELS_DIR``) are
    all there."""
    missing = []
    for module in ("facekit", "dlib", "face_recognition_models"):
        if module == "face_recognition_models" and os.environ.get("TCM_FACE_MODELS_DIR"):
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise FacesExtraMissing(
            f"{path} is a face model, and this installation has no face front-end "
            f"({', '.join(missing)} not installed): {FACES_EXTRA_HINT}"
        )


class FaceModel(nn.Module):
    """Aligned chips (n, 3, 150, 150) float in [0, 1] -> head(descriptor), L2-normalised."""

    def __init__(self, front: Any, head: nn.Module) -> None:
        super().__init__()
        self.front = front
        self.head = head

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        pixels = (chips.detach().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8)
        arrays = list(pixels.permute(0, 2, 3, 1).contiguous().numpy())
        desc = torch.from_numpy(self.front.describe(arrays))
        return self.head(desc.to(next(self.head.parameters(), desc).device))


class FacePreparer:
    """Photos, decoded whole -> aligned chips as the model's input, and the face used in each
    (a ``service.engine.preparing.Preparer``)."""

    channels = 3
    decode_target: tuple[int, int] | None = None  # the face may be a small part of the photo

    def __init__(self, front: Any) -> None:
        self.front = front

    def stage(
        self, images: Sequence[np.ndarray], wheres: Sequence[str] | None = None
    ) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        from facekit import NoFaceError

        chips, infos = [], []
        for i, img in enumerate(images):
            where = wheres[i] if wheres is not None else f"image {i}"
            try:
                face = self.front.locate(img, where=where)
            except NoFaceError as exc:
                raise InvalidInputError(str(exc), code="no_face", detail={"where": where}) from exc
            except ValueError as exc:
                raise InvalidInputError(
                    f"{where}: {exc}", code="invalid_image", detail={"where": where}
                ) from exc
            chips.append(face.chip)
            infos.append({"where": where, **face.info()})
        return chips, infos

    def ready(self, image: np.ndarray) -> bool:
        return False  # a photo always needs its face found

    def to_device(self, staged: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
        """The chips stay on the CPU: :class:`FaceModel`'s descriptor (dlib) runs there."""
        return torch.from_numpy(np.stack(staged)).permute(0, 3, 1, 2).float() / 255.0


def load_served_model(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Manifest, Preparer]:
    """:func:`tcm.load_artefact`, and the preparer of its inputs: the artefact's preprocessing,
    or the face front-end for face artefacts.

    Raises ValueError / RuntimeError (``facekit.ModelFilesError``, :class:`FacesExtraMissing`)
    with a message saying what to do when the artefact cannot be served here.
    """
    model, manifest = load_artefact(path, device=device)
    if manifest.face is None:
        return model, manifest, PixelPreparer(manifest.preprocessing)
    require_faces_extra(path)
    from facekit import FaceFrontEnd, FaceOptions, check_model_files

    files = manifest.face.get("model_files")
    if not files:
        raise ValueError(f"{path}: a face artefact must list its model files' sha256")
    check_model_files(dict(files))
    front = FaceFrontEnd(FaceOptions.from_dict(manifest.face.get("options", {})))
    return FaceModel(front, model).eval(), manifest, FacePreparer(front)


@contextlib.contextmanager
def face_report() -> Iterator[list[dict[str, Any]]]:
    """Collects the faces used by the images embedded inside the block (this request only)."""
    faces: list[dict[str, Any]] = []
    token = _FACES.set(faces)
    try:
        yield faces
    finally:
        _FACES.reset(token)


def record_faces(infos: list[dict[str, Any]]) -> None:
    faces = _FACES.get()
    if faces is not None:
        faces.extend(infos)
