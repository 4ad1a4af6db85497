"""The run configuration: one frozen dataclass, loadable from YAML, with ``key=value`` overrides.

The resolved config is saved in every run folder and inside every checkpoint (as a plain dict), so
a run can be reproduced and a resume from another config is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

DATASETS = (
    "omniglot",
    "digits",
    "mnist",
    "fashion_mnist",
    "imagefolder",
    "att_faces",
    "lfw",
    "cub",
)
LOSSES = ("multi_similarity", "contrastive", "proxy_anchor", "arcface", "supcon")
DISTANCES = ("cosine", "euclidean")
OPTIMIZERS = ("adamw", "sgd")
NORMS = ("batch", "group")


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = "omniglot"
    data_dir: str = "../shared/data"
    image_size: int = 28
    max_train_classes: int = 0  # 0 = all; a subset keeps tests and sweeps small
    max_test_classes: int = 0
    val_classes: int = 0  # carve this many training classes out as a validation split
    # data sets without an official split (att_faces, imagefolder) draw their validation classes
    # once with val_seed, whatever the seed, and every seed's test classes avoid them: margins
    # chosen on them are then never judged on them
    val_seed: int = 0
    # main runs after a sweep: the (fixed) validation classes join training; still kept out of
    # every seed's test classes
    val_in_train: bool = False
    test_fraction: float = 0.5  # class share held out for sets without an official split
    augment: bool = True
    # model
    arch: str = "small_cnn"
    embedding_dim: int = 128
    width: int = 32
    norm: str = "batch"  # "group": batch-independent, exact DDP on CPU (no SyncBatchNorm)
    # a local weights file (.safetensors, or a .pt/.pth state dict) or an artefact folder to
    # start from; nothing is ever downloaded
    pretrained: str = ""
    # a pretrained backbone (efficientnet_lite0..2) kept frozen: its features are extracted once,
    # cached on disk under feature_cache, and only the embedding head trains on them
    freeze_backbone: bool = False
    feature_cache: str = "runs/features"
    # partial fine-tuning (training.partial, issue 27's regime (b)): with freeze_backbone, the
    # last tune_blocks blocks of the backbone train too, on cached feature maps at their input,
    # at lr x tune_lr_factor; 0 keeps the whole backbone frozen
    tune_blocks: int = 0
    tune_lr_factor: float = 0.1
    # loss
    loss: str = "multi_similarity"
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.5
    contrastive_pos_margin: float = 1.0  # cosine similarity: positives pulled above this
    contrastive_neg_margin: float = 0.3  # negatives pushed below this
    # euclidean: PML's own default (distance, pos 0 / neg 1), whose positive term pulls every
    # positive pair (no margin), so the loss is not itself a TCM; cosine with margins is one
    contrastive_distance: str = "cosine"
    supcon_temperature: float = 0.1
    proxy_margin: float = 0.1
    proxy_alpha: float = 32.0
    arcface_margin: float = 28.6  # degrees
    arcface_scale: float = 64.0
    tcm: bool = True
    m_plus: float = 0.8
    m_minus: float = 0.5  # m_plus/m_minus: chosen on Omniglot validation classes (make study)
    lambda_plus: float = 1.0
    lambda_minus: float = 1.0
    # optimisation
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    epochs: int = 6
    steps_per_epoch: int = 150
    batch_size: int = 128
    m_per_class: int = 4
    lr: float = 1e-3
    proxy_lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # used on CUDA only
    # evaluation
    target_far: float = 1e-2
    # 1:N open-set calibration (tcm.openset): which target the one tau honours, "far" (the
    # pair FAR above) or "fpir" (FPIR target_fpir at a gallery of reference_gallery_size)
    threshold_target: str = "far"
    target_fpir: float = 1e-2
    reference_gallery_size: int = 1000
    # serve-time AS-norm (tcm.asnorm): export a cohort of this many training-class images
    # (0: none, raw cosine) and calibrate tau on AS-normalised scores with this top-k
    cohort_size: int = 0
    cohort_top_k: int = 200
    far_lo: float = 1e-3
    far_hi: float = 1e-1
    num_thresholds: int = 101
    beta: float = 1.0
    eps: float = 0.05

    def __post_init__(self) -> None:
        problems = []
        if self.dataset not in DATASETS:
            problems.append(f"dataset {self.dataset!r} is not one of {list(DATASETS)}")
        if self.loss not in LOSSES:
            problems.append(f"loss {self.loss!r} is not one of {list(LOSSES)}")
        from tcm.embedders import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            problems.append(f"arch {self.arch!r} is not one of {sorted(ARCHITECTURES)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if self.contrastive_distance not in DISTANCES:
            problems.append(
                f"contrastive_distance {self.contrastive_distance!r} is not one of "
                f"{list(DISTANCES)}"
            )
        from tcm.embedders import PRETRAINED

        if self.freeze_backbone and self.arch not in PRETRAINED:
            problems.append(f"freeze_backbone needs a pretrained arch ({sorted(PRETRAINED)})")
        if self.tune_blocks < 0 or (self.tune_blocks and not self.freeze_backbone):
            problems.append(
                "tune_blocks (the backbone's last blocks that train on cached maps) must be >= 0 "
                "and needs freeze_backbone=true"
            )
        if not 0 < self.tune_lr_factor <= 1:
            problems.append(f"tune_lr_factor must be in (0, 1], got {self.tune_lr_factor}")
        if self.dataset == "cub" and not self.freeze_backbone:
            problems.append(
                "dataset=cub trains on cached backbone features: set "
                "freeze_backbone=true and a pretrained arch"
            )
        if self.norm not in NORMS:
            problems.append(f"norm {self.norm!r} is not one of {list(NORMS)}")
        if self.batch_size % self.m_per_class or self.batch_size < 2 * self.m_per_class:
            problems.append("batch_size must be a multiple of m_per_class holding >= 2 classes")
        if self.m_per_class < 2:
            problems.append("m_per_class must be >= 2 (positives need two samples of a class)")
        for name in ("epochs", "steps_per_epoch", "embedding_dim", "width", "image_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not (-1 <= self.m_minus <= 1 and -1 <= self.m_plus <= 1):
            problems.append("TCM margins m_plus and m_minus must lie in [-1, 1]")
        if self.threshold_target not in ("far", "fpir"):
            problems.append("threshold_target must be 'far' or 'fpir'")
        if not (0 < self.target_fpir < 1):
            problems.append("target_fpir must lie in (0, 1)")
        if self.reference_gallery_size < 1:
            problems.append("reference_gallery_size must be >= 1 (photos in a gallery)")
        if not 0 <= self.cohort_size <= 2000:
            problems.append("cohort_size must lie in 0..2000 (0: no AS-norm cohort)")
        elif self.cohort_size and not 1 <= self.cohort_top_k <= self.cohort_size:
            problems.append("cohort_top_k must lie in 1..cohort_size")
        if self.cohort_size and self.threshold_target != "far":
            problems.append(
                "a cohort (AS-norm) calibrates tau for target_far: set threshold_target=far"
            )
        if not (0 < self.far_lo < self.target_far < self.far_hi < 1):
            problems.append("need 0 < far_lo < target_far < far_hi < 1")
        if not (0 < self.test_fraction < 1):
            problems.append("test_fraction must lie in (0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append("device must be auto, cpu or cuda")
        if self.pretrained and not Path(self.pretrained).exists():
            problems.append(
                f"pretrained weights {self.pretrained!r} do not exist (give a local "
                ".safetensors/.pt file or an artefact folder; nothing downloads)"
            )
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, raw: Any) -> Any:
    """Converts a YAML value or a CLI string to the field's type."""
    field = next(f for f in fields(TrainConfig) if f.name == name)
    kind = field.type if isinstance(field.type, type) else str(field.type)
    if not isinstance(raw, str):
        return raw
    if kind in (bool, "bool"):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} expects true/false, got {raw!r}")
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} expects a {kind}, got {raw!r}") from exc
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: TrainConfig | None = None,
) -> TrainConfig:
    """YAML file (optional) then ``key=value`` overrides; unknown keys stop with a message."""
    values: dict[str, Any] = (base or TrainConfig()).to_dict()
    known = set(values)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p} must hold a mapping of config keys")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys in {p}: {unknown}; known keys: {sorted(known)}")
        values.update({k: _coerce(k, v) for k, v in data.items()})
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in known:
            raise ValueError(f"unknown config key {key!r}; known keys: {sorted(known)}")
        values[key] = _coerce(key, raw)
    return TrainConfig(**values)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))
