"""Descriptors of a data set's face images, extracted once and cached on disk.

The frozen dlib descriptor is the expensive part of the face model (~0.1 s per image on one core);
the trainable head on top takes seconds. So descriptors are computed once per image and kept under
``<root>/<key>/`` in chunk files, where ``key`` hashes the model files' sha256, the front-end
options and the source archive (its size and sha256): new model files or new data give a new
key, never a stale hit. Chunks are written atomically as they complete, so an interrupted run
resumes where it stopped.

Every image is cached with the whole-image fallback (and a ``detected`` flag): consumers that
require a detected face filter on the flag; the chip of a detected face does not depend on the
fallback setting.

    python -m training.face_cache --data-dir ../shared/data --what lfw orl   # niced, background
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from facekit import DESCRIPTOR, FaceFrontEnd, FaceOptions, model_checksums
from tcm.embedders import file_sha256

DEFAULT_ROOT = Path("runs/face_cache")
LFW_ZIP = "lfw/lfw-deepfunneled-crop160.zip"
ORL_ZIP = "att_faces/orl_faces.zip"


@dataclass(frozen=True)
class Descriptors:
    names: list[str]  # archive member names
    vectors: np.ndarray  # (n, 128) float32, raw dlib descriptors
    boxes: np.ndarray  # (n, 4) int32
    detected: np.ndarray  # (n,) bool

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def take(self, names: Iterable[str]) -> Descriptors:
        idx = self.index()
        rows = [idx[n] for n in names]
        return Descriptors(
            [self.names[i] for i in rows], self.vectors[rows], self.boxes[rows], self.detected[rows]
        )


def cache_key(source: Path, options: FaceOptions) -> str:
    opts = replace(options, fallback="whole_image")
    blob = json.dumps(
        {
            "models": model_checksums(),
            "descriptor": DESCRIPTOR,
            "options": opts.to_dict(),
            "source": file_sha256(source),
            "source_size": source.stat().st_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _decode(raw: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


def load(folder: Path) -> Descriptors:
    names: list[str] = []
    vecs, boxes, det = [], [], []
    for f in sorted(folder.glob("chunk-*.npz")):
        with np.load(f) as z:
            names += [str(n) for n in z["names"]]
            vecs.append(z["vectors"])
            boxes.append(z["boxes"])
            det.append(z["detected"])
    if not names:
        return Descriptors(
            [], np.zeros((0, 128), np.float32), np.zeros((0, 4), np.int32), np.zeros(0, bool)
        )
    return Descriptors(names, np.concatenate(vecs), np.concatenate(boxes), np.concatenate(det))


def _write_chunk(folder: Path, names: list[str], vecs: np.ndarray, boxes: list, det: list) -> None:
    stamp = f"{time.time_ns()}-{os.getpid()}"
    tmp = folder / f".chunk-{stamp}.npz"
    np.savez(
        tmp,
        names=np.asarray(names),
        vectors=vecs.astype(np.float32),
        boxes=np.asarray(boxes, np.int32).reshape(-1, 4),
        detected=np.asarray(det, bool),
    )
    os.replace(tmp, folder / f"chunk-{stamp}.npz")


def cached(
    source: Path, options: FaceOptions | None = None, root: Path = DEFAULT_ROOT
) -> Descriptors:
    """Whatever is cached for ``source`` (nothing is extracted)."""
    options = replace(options or FaceOptions(), fallback="whole_image")
    return load(root / cache_key(source, options))


def descriptors(
    source: Path,
    members: list[str],
    *,
    root: Path = DEFAULT_ROOT,
    options: FaceOptions | None = None,
    chunk: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Descriptors:
    """Descriptors of ``members`` of the zip ``source``, extracting only the uncached ones."""
    options = replace(options or FaceOptions(), fallback="whole_image")
    folder = root / cache_key(source, options)
    folder.mkdir(parents=True, exist_ok=True)
    have = load(folder)
    done = set(have.names)
    todo = [m for m in dict.fromkeys(members) if m not in done]
    if todo:
        front = FaceFrontEnd(options)
        with zipfile.ZipFile(source) as z:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                faces = [front.locate(_decode(z.read(m)), where=m) for m in part]
                vecs = front.describe([f.chip for f in faces])
                _write_chunk(
                    folder, part, vecs, [f.box for f in faces], [f.detected for f in faces]
                )
                if progress:
                    progress(start + len(part), len(todo))
        have = load(folder)
    return have.take(dict.fromkeys(members))


# --- the data sets' member lists --------------------------------------------------------------
def lfw_member(name: str, num: int) -> str:
    return f"lfw-deepfunneled-c160/{name}/{name}_{num:04d}.jpg"


def lfw_counts(data_dir: Path) -> dict[str, int]:
    rows = (data_dir / "lfw" / "lfw-names.txt").read_text().split("\n")
    return {r.split("\t")[0]: int(r.split("\t")[1]) for r in rows if "\t" in r}


def lfw_pair_members(data_dir: Path, which: str = "pairs") -> list[str]:
    from training.faces import parse_pairs

    pairs = parse_pairs((data_dir / "lfw" / f"{which}.txt").read_text())
    both = [k for a, b in zip(pairs.a, pairs.b, strict=True) for k in (a, b)]  # fold by fold
    return [lfw_member(*k) for k in dict.fromkeys(both)]


def lfw_identity_members(
    data_dir: Path, people: Iterable[str] | None = None, cap: int = 10
) -> list[str]:
    """The first ``cap`` images of every person (of ``people``) with >= 2 images.

    Capped because a few people dominate LFW (George_W_Bush has 530 images): ten images per
    identity are plenty of genuine pairs for a head and for per-identity error rates, and the
    cap saves a fifth of the extraction.
    """
    counts = lfw_counts(data_dir)
    names = counts if people is None else [p for p in people if p in counts]
    return [
        lfw_member(n, i) for n in names if counts[n] >= 2 for i in range(1, min(counts[n], cap) + 1)
    ]


def lfw_study_members(data_dir: Path) -> list[str]:
    """The descriptor study's images: every image named in pairs.txt (View 2; its people are
    the 10 folds of people.txt, so each fold's head trains on the other folds' images)."""
    return lfw_pair_members(data_dir)


def orl_members() -> list[str]:
    return [f"orl_faces/s{k}/{n}.pgm" for k in range(1, 41) for n in range(1, 11)]


def dev_train_people(data_dir: Path) -> list[str]:
    rows = (data_dir / "lfw" / "peopleDevTrain.txt").read_text().split("\n")[1:]
    return [r.split("\t")[0] for r in rows if "\t" in r]


def served_split(
    data_dir: Path, seed: int = 0, val_share: float = 0.15, cap: int = 4
) -> tuple[list[str], list[str]]:
    """The served face model's images (``training.face_model``): (training images, validation
    images): up to ``cap`` images of every peopleDevTrain
    person with >= 2, ``val_share`` of those people held out (chosen from the names alone, so
    a head-less model only extracts the validation images)."""
    counts = lfw_counts(data_dir)
    ids = sorted(p for p in dev_train_people(data_dir) if counts.get(p, 0) >= 2)
    rng = np.random.default_rng(seed)
    val = set(rng.choice(ids, size=int(val_share * len(ids)), replace=False))
    train = lfw_identity_members(data_dir, [p for p in ids if p not in val], cap=cap)
    return train, lfw_identity_members(data_dir, sorted(val), cap=cap)


def served_members(data_dir: Path) -> list[str]:
    train, val = served_split(data_dir)
    return val + train


def main() -> None:
    p = argparse.ArgumentParser(description="Extract and cache face descriptors.")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--what", nargs="+", default=["orl", "lfw"], choices=["orl", "lfw"])
    p.add_argument("--shard", default="0/1", help="i/n: this process takes every n-th image")
    p.add_argument("--reverse", action="store_true", help="work from the end of the list")
    args = p.parse_args()
    started = time.perf_counter()
    i, n = map(int, args.shard.split("/"))

    def report(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        print(f"{done}/{total} images, {rate:.1f} img/s", flush=True)

    for what in args.what:
        if what == "orl":
            d = descriptors(
                args.data_dir / ORL_ZIP, orl_members()[i::n], root=args.root, progress=report
            )
        else:  # the study's images, then the served model's (training/face_model.py)
            members = list(
                dict.fromkeys(lfw_study_members(args.data_dir) + served_members(args.data_dir))
            )
            d = descriptors(
                args.data_dir / LFW_ZIP, members[i::n], root=args.root, progress=report, chunk=16
            )
        print(f"{what}: {len(d.names)} images, {int(d.detected.sum())} faces detected", flush=True)


if __name__ == "__main__":
    main()
