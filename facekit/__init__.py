"""The face front-end shared by ``training`` and ``service``: find the face, align it, describe it.

``tcm`` stays torch + numpy only and ``training``/``service`` never import each other, yet both need
the same detection and alignment (training to cache descriptors of its data, the service to embed
uploaded photos), so that the vectors the service computes are the vectors training evaluated.
This package sits beside ``tcm`` at the bottom of the one-way graph: it imports numpy (and dlib,
lazily, from the optional ``faces`` extra), never ``training`` or ``service``.
"""

from facekit.frontend import (
    ALIGNER,
    CHIP_SIZE,
    DESCRIPTOR,
    DESCRIPTOR_DIM,
    DETECTOR,
    Face,
    FaceFrontEnd,
    FaceOptions,
    NoFaceError,
)
from facekit.models import ModelFilesError, check_model_files, model_checksums, model_paths

__all__ = [
    "ALIGNER",
    "CHIP_SIZE",
    "DESCRIPTOR",
    "DESCRIPTOR_DIM",
    "DETECTOR",
    "Face",
    "FaceFrontEnd",
    "FaceOptions",
    "ModelFilesError",
    "NoFaceError",
    "check_model_files",
    "model_checksums",
    "model_paths",
]
