"""Where dlib's model files are, and their checksums.

The files come from the ``face-recognition-models`` distribution (the ``faces`` extra). Its
``__init__`` imports ``pkg_resources``, which current setuptools no longer ships, so the package is
located with :func:`importlib.util.find_spec` (which does not execute it). ``TCM_FACE_MODELS_DIR``
points elsewhere (a directory holding the same file names) for installs without that package.

Only the 5-point landmark predictor is used: the 68-point one's training data (iBUG 300-W) forbid
commercial use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

# role -> file name, as installed by face-recognition-models 0.3.0
FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
}
ENV_DIR = "TCM_FACE_MODELS_DIR"


class ModelFilesError(RuntimeError):
    """The face model files are missing or differ from what an artefact was built with."""


def models_dir() -> Path:
    override = os.environ.get(ENV_DIR)
    if override:
        return Path(override)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(
            "the face model files are not installed: pip install '.[faces]' "
            f"(face-recognition-models), or set {ENV_DIR} to a directory holding "
            f"{', '.join(FILES.values())}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_paths() -> dict[str, Path]:
    """role -> path of each model file; raises :class:`ModelFilesError` if one is missing."""
    folder = models_dir()
    paths = {role: folder / name for role, name in FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ModelFilesError(f"face model files missing: {', '.join(missing)}")
    return paths


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_checksums() -> dict[str, str]:
    """file name -> sha256 of every model file the front-end loads (cached per size/mtime)."""
    out = {}
    for path in model_paths().values():
        st = path.stat()
        out[path.name] = _sha256(str(path), st.st_size, st.st_mtime_ns)
    return out


def check_model_files(expected: dict[str, str]) -> None:
    """Raises :class:`ModelFilesError` unless the installed files hash to ``expected``.

    An artefact's head was trained on the descriptors of particular model files: other files
    (another release, a corrupted download) give vectors in another space, and every decision at
    the artefact's threshold would be wrong without any error.
    """
    actual = model_checksums()
    wrong = [
        f"{name} (artefact {sha[:12]}…, installed {actual.get(name, 'missing')[:12]}…)"
        for name, sha in sorted(expected.items())
        if actual.get(name) != sha
    ]
    if wrong:
        raise ModelFilesError(
            "the installed face model files differ from the ones this artefact was built with: "
            + "; ".join(wrong)
            + ". Install face-recognition-models==0.3.0 or rebuild the model"
        )
