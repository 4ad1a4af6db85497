"""Open-world data: train and test classes are disjoint, as in the paper.

Each loader returns raw uint8 images and labels for a training split and a test split of disjoint
classes; :func:`load_splits` preprocesses them with the artefact's own :func:`tcm.to_input_tensor`
(so evaluation embeds exactly what the service will) into in-memory tensors. Everything is read
from local files (``data_dir``, default ``../shared/data``) or from scikit-learn's bundled digits;
nothing is downloaded.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tcm import Preprocessing, to_input_tensor
from tcm.exported import tenant_of
from training.config import TrainConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class RawSplit:
    images: list[np.ndarray] | np.ndarray  # uint8/bool (H, W[, C]) each
    labels: np.ndarray  # int64 class ids, unique across train and test
    class_names: dict[int, str]


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) float, preprocessed
    y: torch.Tensor  # (N,) int64 class ids
    class_names: dict[int, str]

    @property
    def num_classes(self) -> int:
        return int(torch.unique(self.y).numel())


@dataclass(frozen=True)
class Splits:
    train: Split
    test: Split
    val: Split | None
    preprocessing: Preprocessing
    description: dict[str, object]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ValueError(
            f"{what} not found at {path}: set data_dir (--data-dir) to the folder "
            "holding the shared data sets"
        )
    return path


def _omniglot(root: Path) -> tuple[RawSplit, RawSplit]:
    folder = _require(root / "omniglot", "Omniglot")
    splits = []
    offset = 0
    for name in ("images_background", "images_evaluation"):
        with np.load(_require(folder / f"{name}.npz", f"Omniglot {name}")) as z:
            images, labels = z["images"], z["labels"]
        n_chars = images.shape[0]
        flat = images.reshape(-1, *images.shape[2:])
        y = labels.reshape(-1).astype(np.int64) + offset
        names = {offset + i: f"{name.split('_')[1]}/{i}" for i in range(n_chars)}
        splits.append(RawSplit(flat, y, names))
        offset += n_chars
    return splits[0], splits[1]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_like(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    folder = _require(root / name, name)
    images = [_idx(folder / "t10k-images-idx3-ubyte.gz")]
    labels = [_idx(folder / "t10k-labels-idx1-ubyte.gz")]
    if (folder / "train-images-idx3-ubyte.gz").exists():
        images.append(_idx(folder / "train-images-idx3-ubyte.gz"))
        labels.append(_idx(folder / "train-labels-idx1-ubyte.gz"))
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB" if img.mode not in ("L", "1") else "L"))


class LazyImages:
    """Encoded images decoded on access: CUB's 5,902 JPEGs are 57 MB encoded but ~0.9 GB as
    pixels, and the frozen-backbone regime only ever needs one batch of pixels at a time."""

    def __init__(self, encoded: list[bytes]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> np.ndarray:
        return _decode(self.encoded[i])

    def take(self, idx) -> LazyImages:
        return LazyImages([self.encoded[i] for i in idx])


def _take(images, idx):
    """``images[idx]`` for arrays, lazily decoded sets and lists alike."""
    if isinstance(images, np.ndarray):
        return images[idx]
    if isinstance(images, LazyImages):
        return images.take(idx)
    return [images[i] for i in idx]


def _cub(root: Path) -> tuple[RawSplit, RawSplit]:
    """CUB-200 subset (100 species): the open-world split of ``classes_cub_map.csv`` (CUB ids
    <= 100 train, > 100 test, as the standard CUB protocol); images stay encoded."""
    folder = _require(root / "cub200_subset100", "CUB-200 subset")
    import csv

    rows = list(csv.DictReader((folder / "classes_cub_map.csv").read_text().splitlines()))
    split = {r["name"]: (int(r["label"]), r["open_world_split"]) for r in rows}
    names = {label: name for name, (label, _) in split.items()}
    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    with zipfile.ZipFile(_require(folder / "bird_dataset.zip", "CUB zip")) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            parts = info.filename.split("/")
            if len(parts) != 4 or parts[1] != "images" or not parts[3].endswith(".jpg"):
                continue
            label, side = split[parts[2]]
            out[side][0].append(z.read(info))
            out[side][1].append(label)
    return tuple(
        RawSplit(LazyImages(out[s][0]), np.asarray(out[s][1], np.int64), names)
        for s in ("train", "test")
    )  # type: ignore[return-value]


def _image_folder(root: Path) -> tuple[list[np.ndarray], np.ndarray, dict[int, str]]:
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist (expected root/<class>/<image>)")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders (root/<class>/<image>)")
    images, labels, names = [], [], {}
    for k, cdir in enumerate(classes):
        files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        names[k] = cdir.name
        for f in files:
            images.append(_decode(f.read_bytes()))
            labels.append(k)
    if not images:
        raise ValueError(f"image folder {root} holds no images ({sorted(IMAGE_SUFFIXES)})")
    return images, np.asarray(labels, np.int64), names


def _att_faces(root: Path) -> tuple[list[np.ndarray], np.ndarray, dict[int, str]]:
    path = _require(root / "att_faces" / "orl_faces.zip", "AT&T/ORL faces")
    images, labels = [], []
    with zipfile.ZipFile(path) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[2].endswith(".pgm"):
                images.append(_decode(z.read(info)))
                labels.append(int(parts[1][1:]) - 1)
    return images, np.asarray(labels, np.int64), {k: f"s{k + 1}" for k in range(40)}


def _lfw(root: Path) -> tuple[RawSplit, RawSplit]:
    """Official View 1: train on peopleDevTrain, test on peopleDevTest (identity-disjoint)."""
    folder = _require(root / "lfw", "LFW")

    def people(fname: str) -> list[str]:
        lines = (folder / fname).read_text().split("\n")[1:]
        return [ln.split("\t")[0] for ln in lines if "\t" in ln]

    train_people, test_people = people("peopleDevTrain.txt"), people("peopleDevTest.txt")
    index = {name: i for i, name in enumerate(train_people + test_people)}
    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    train_set = set(train_people)
    with zipfile.ZipFile(_require(folder / "lfw-deepfunneled-crop160.zip", "LFW zip")) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) != 3 or not parts[2].endswith(".jpg") or parts[1] not in index:
                continue
            side = "train" if parts[1] in train_set else "test"
            out[side][0].append(_decode(z.read(info)))
            out[side][1].append(index[parts[1]])
    names = {i: n for n, i in index.items()}
    return (
        RawSplit(out["train"][0], np.asarray(out["train"][1], np.int64), names),
        RawSplit(out["test"][0], np.asarray(out["test"][1], np.int64), names),
    )


def fixed_validation_classes(labels: np.ndarray, n_val: int, val_seed: int) -> set[int]:
    """The validation classes of a split drawn per seed: ``n_val`` of the classes with at least
    two images (a validation class needs genuine pairs), drawn with ``val_seed`` alone, so they
    are the same for every seed and every seed's test draw can leave them out."""
    if n_val <= 0:
        return set()
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= 2]
    if n_val >= len(eligible) - 1:
        raise ValueError(
            f"val_classes={n_val} leaves too few of the {len(eligible)} classes "
            "with at least 2 images"
        )
    return set(np.random.default_rng(val_seed).permutation(eligible)[:n_val].tolist())


def export_groups(names: Mapping[int, str], classes: Iterable[int]) -> dict[int, str] | None:
    """Each class's tenant when every class folder has an export's name ``<tenant>__...``
    (:mod:`tcm.exported`) and there are at least two tenants; else None (a data set that is
    not an export)."""
    groups = {}
    for c in classes:
        tenant = tenant_of(names.get(int(c), ""))
        if tenant is None:
            return None
        groups[int(c)] = tenant
    return groups if len(set(groups.values())) >= 2 else None


def _class_disjoint(
    images,
    labels: np.ndarray,
    names: dict[int, str],
    test_fraction: float,
    seed: int,
    keep_out: set[int] | frozenset[int] = frozenset(),
) -> tuple[RawSplit, RawSplit]:
    """Draws ``test_fraction`` of all classes as test classes with ``seed``, never one of
    ``keep_out`` (the fixed validation classes; they stay on the training side). Classes of a
    service's export (folders ``<tenant>__<subject>``, :func:`export_groups`) are drawn within
    each tenant: every tenant keeps classes on both sides, so a retrain learns from each
    tenant's photos and calibrates on each tenant's unseen subjects (a draw over all classes
    could leave a drifting tenant wholly on the test side, where the retrain cannot help it)."""
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    free = np.array([c for c in classes if c not in keep_out], np.int64)
    n_test = max(1, round(len(classes) * test_fraction))
    if n_test >= len(free):
        raise ValueError(
            f"test_fraction={test_fraction} leaves no training classes beside the "
            f"{len(keep_out)} validation classes"
        )
    groups = export_groups(names, free)
    if groups is not None:
        test_classes: set[int] = set()
        for g in sorted(set(groups.values())):
            members = rng.permutation(np.array([c for c in free if groups[c] == g], np.int64))
            n = min(round(len(members) * test_fraction), len(members) - 1)
            test_classes.update(members[:n].tolist())
        if not test_classes:  # every tenant too small to give one up: one class overall
            test_classes = {int(rng.choice(free))}
    else:
        test_classes = set(rng.permutation(free)[:n_test].tolist())
    pick = np.array([lab in test_classes for lab in labels])
    whole = RawSplit(images, labels, names)
    return _subset(whole, ~pick), _subset(whole, pick)


def _subset(raw: RawSplit, mask: np.ndarray) -> RawSplit:
    idx = np.flatnonzero(mask)
    return RawSplit(_take(raw.images, idx), raw.labels[idx], raw.class_names)


def _fixed_digit_split(images: np.ndarray, labels: np.ndarray) -> tuple[RawSplit, RawSplit]:
    # the paper's toy protocol: digits 0-4 to train, 5-9 held out
    names = {k: str(k) for k in range(10)}
    train = labels < 5
    return (
        RawSplit(images[train], labels[train], names),
        RawSplit(images[~train], labels[~train], names),
    )


def preprocessing_for(config: TrainConfig) -> Preprocessing:
    from tcm.embedders import PRETRAINED

    if config.arch in PRETRAINED:
        # an ImageNet backbone sees what it was trained on: its resolution and normalisation
        b = PRETRAINED[config.arch]
        return Preprocessing(
            image_size=(b.image_size, b.image_size), channels=3, mean=b.mean, std=b.std
        )
    pretrained = Path(config.pretrained) if config.pretrained else None
    if pretrained is not None and (pretrained / "manifest.json").is_file():
        # fine-tuning an exported artefact: its network expects its own input format
        from tcm import read_manifest

        return read_manifest(pretrained).preprocessing
    size = (config.image_size, config.image_size)
    if config.dataset == "omniglot":
        return Preprocessing(image_size=size, channels=1, mean=(0.5,), std=(0.5,), invert=True)
    if config.dataset == "lfw":
        return Preprocessing(image_size=size, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    if config.dataset == "imagefolder":
        return Preprocessing(image_size=size, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    return Preprocessing(image_size=size, channels=1, mean=(0.5,), std=(0.5,))


# data sets without an official split: the class-disjoint split is drawn per seed
SEEDED_SPLITS = ("att_faces", "imagefolder")


def load_raw(config: TrainConfig) -> tuple[RawSplit, RawSplit]:
    root = Path(config.data_dir)
    if config.dataset == "omniglot":
        return _omniglot(root)
    if config.dataset == "lfw":
        return _lfw(root)
    if config.dataset == "cub":
        return _cub(root)
    if config.dataset == "digits":
        return _fixed_digit_split(*_digits())
    if config.dataset in ("mnist", "fashion_mnist"):
        return _fixed_digit_split(*_mnist_like(root, config.dataset))
    load = _att_faces if config.dataset == "att_faces" else _image_folder
    images, labels, names = load(root)
    keep_out = fixed_validation_classes(labels, config.val_classes, config.val_seed)
    return _class_disjoint(images, labels, names, config.test_fraction, config.seed, keep_out)


def _limit(raw: RawSplit, max_classes: int, seed: int) -> RawSplit:
    classes = np.unique(raw.labels)
    if max_classes <= 0 or max_classes >= len(classes):
        return raw
    keep = set(np.random.default_rng(seed).permutation(classes)[:max_classes].tolist())
    return _subset(raw, np.array([lab in keep for lab in raw.labels]))


def _check(raw: RawSplit, side: str, dataset: str) -> None:
    if len(raw.labels) == 0:
        raise ValueError(f"the {side} split of {dataset!r} is empty")
    classes, counts = np.unique(raw.labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(
            f"the {side} split of {dataset!r} has fewer than 2 classes: add classes "
            "(root/<class>/<image>) or lower test_fraction"
        )
    if (counts < 2).all():
        need = (
            "metric learning needs at least 2 images per class"
            if side == "train"
            else "held-out classes need at least 2 images each to form genuine pairs"
        )
        raise ValueError(
            f"every {side} class of {dataset!r} has a single image: {need}; add "
            "images or merge the data into classes with several images each"
        )


def _to_split(
    raw: RawSplit, spec: Preprocessing, chunk: int = 4096, features: bool = False
) -> Split:
    if features:  # already the backbone's features (N, F)
        return Split(
            torch.as_tensor(np.asarray(raw.images, np.float32)),
            torch.as_tensor(raw.labels, dtype=torch.int64),
            raw.class_names,
        )
    parts = [
        to_input_tensor(raw.images[i : i + chunk], spec) for i in range(0, len(raw.labels), chunk)
    ]
    return Split(torch.cat(parts), torch.as_tensor(raw.labels, dtype=torch.int64), raw.class_names)


def load_splits(config: TrainConfig) -> Splits:
    """Raw images -> preprocessed, class-disjoint train / (val) / test tensors."""
    train_raw, test_raw = load_raw(config)
    # load_raw's two sides hold every class, so this is the very set its test draw left out
    val_set = (
        fixed_validation_classes(
            np.concatenate([train_raw.labels, test_raw.labels]), config.val_classes, config.val_seed
        )
        if config.dataset in SEEDED_SPLITS
        else set()
    )
    train_raw = _limit(train_raw, config.max_train_classes, config.seed)
    test_raw = _limit(test_raw, config.max_test_classes, config.seed + 1)
    overlap = set(np.unique(train_raw.labels)) & set(np.unique(test_raw.labels))
    assert not overlap, "train and test classes must be disjoint"
    _check(train_raw, "train", config.dataset)
    _check(test_raw, "test", config.dataset)
    spec = preprocessing_for(config)
    if config.freeze_backbone:
        # from here on each "image" is its backbone feature vector (with tune_blocks, the
        # feature maps at the tuned blocks' input), cached across runs
        from training.features import cached_features

        train_raw, test_raw = (
            RawSplit(
                cached_features(
                    config.arch,
                    raw.images,
                    raw.labels,
                    spec,
                    config.feature_cache,
                    description=f"{side} features",
                    tune_blocks=config.tune_blocks,
                ),
                raw.labels,
                raw.class_names,
            )
            for raw, side in ((train_raw, "train"), (test_raw, "test"))
        )
    # single-image training classes have no positives and cannot fill an m-per-class batch: they
    # are dropped (and counted); in the test split they stay, as impostors for the other classes
    classes, counts = np.unique(train_raw.labels, return_counts=True)
    dropped = int((counts < 2).sum())
    if dropped:
        keep = set(classes[counts >= 2].tolist())
        train_raw = _subset(train_raw, np.array([lab in keep for lab in train_raw.labels]))
    val_raw = None
    if config.val_classes > 0 and not config.val_in_train:
        n_train_classes = len(np.unique(train_raw.labels))
        if config.val_classes >= n_train_classes - 1:
            raise ValueError(
                f"val_classes={config.val_classes} leaves too few of the "
                f"{n_train_classes} training classes"
            )
        if config.dataset in SEEDED_SPLITS:
            # the fixed validation classes load_raw kept out of this seed's test draw
            pick = np.array([lab in val_set for lab in train_raw.labels])
            train_raw, val_raw = _subset(train_raw, ~pick), _subset(train_raw, pick)
        else:
            # an official split: validation classes come from the training classes, which no
            # seed's test classes ever meet; CUB's are also the same for every seed (seed 2),
            # so the CUB study chooses its margins once
            fraction = config.val_classes / n_train_classes
            val_seed = 2 if config.dataset == "cub" else config.seed + 2
            train_raw, val_raw = _class_disjoint(
                train_raw.images, train_raw.labels, train_raw.class_names, fraction, val_seed
            )
    feats = config.freeze_backbone
    train = _to_split(train_raw, spec, features=feats)
    test = _to_split(test_raw, spec, features=feats)
    val = _to_split(val_raw, spec, features=feats) if val_raw is not None else None
    description = {
        "dataset": config.dataset,
        "train_classes": train.num_classes,
        "train_images": len(train.y),
        "test_classes": test.num_classes,
        "test_images": len(test.y),
        "val_classes": val.num_classes if val else 0,
        "val_images": len(val.y) if val else 0,
        "dropped_single_image_train_classes": dropped,
        "fixed_val_classes": sorted(int(c) for c in val_set),
        "protocol": _protocol(config.dataset),
    }
    return Splits(train=train, test=test, val=val, preprocessing=spec, description=description)


def _protocol(dataset: str) -> str:
    return {
        "omniglot": "background classes train, evaluation classes test (class-disjoint)",
        "digits": "digits 0-4 train, 5-9 test",
        "mnist": "digits 0-4 train, 5-9 test",
        "fashion_mnist": "labels 0-4 train, 5-9 test",
        "lfw": "View 1: peopleDevTrain train, peopleDevTest test (identity-disjoint)",
        "cub": "classes_cub_map.csv: CUB ids 1-100 train, 101-200 test (class-disjoint)",
    }.get(
        dataset,
        "class-disjoint: fixed validation classes (val_seed), the rest split into "
        "train/test by seed",
    )
