"""Evaluation on held-out classes: accuracy and threshold consistency side by side.

The report carries everything the artefact needs (tau at the target FAR, the calibration range,
baseline OPIS/eps-OPIS, R@1, MAP@R) plus the per-class FAR/FRR spread at tau, and the plots a
person would rather look at: per-class utility-vs-threshold curves over the calibration range,
genuine vs impostor score histograms and, for small sets, a 2-D view of the embedding space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tcm import (
    calibrate_threshold,
    consistency_report,
    impostor_pairs_needed,
    retrieval_metrics,
)
from tcm.drift import bootstrap_interval
from tcm.openset import (
    ProbeTails,
    fnir,
    fpir,
    fpir_from_pair_far,
    probe_tails,
    tau_at_fpir,
)
from training.config import TrainConfig

# The artefact's drift reference (tcm.drift): class-bootstrap resamples of the baseline OPIS,
# and the held-out embeddings kept for the service to re-measure it at its galleries' class
# sizes, capped (at 128-d float16: 300 x 20 x 128 x 2 bytes = 1.5 MB).
BOOTSTRAP_RESAMPLES = 1000
INTERVAL_LEVEL = 0.9
REFERENCE_MAX_CLASSES = 300
REFERENCE_MAX_PER_CLASS = 20


def reference_subsample(
    emb: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    max_classes: int = REFERENCE_MAX_CLASSES,
    max_per_class: int = REFERENCE_MAX_PER_CLASS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_classes`` held-out classes with 2+ images, up to ``max_per_class`` images
    each (seeded), for the artefact's reference file."""
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    classes = classes[counts >= 2]
    classes = classes[torch.randperm(len(classes), generator=g)[:max_classes]]
    keep = []
    for k in classes.sort().values:
        members = torch.nonzero(labels == k).flatten()
        keep.append(members[torch.randperm(len(members), generator=g)[:max_per_class]])
    idx = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    return emb[idx], labels[idx]


def report_name(split: str) -> str:
    """``report.json`` for the held-out test classes, ``report_<split>.json`` otherwise."""
    return "report.json" if split == "test" else f"report_{split}.json"


@torch.no_grad()
def embed(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 512, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """L2-normalised embeddings on the CPU; the model stays in eval mode on ``device``."""
    model.eval().to(device)
    out = [
        model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out)


def evaluate_embeddings(
    emb: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    fallback_tau: float | None = None,
) -> dict[str, Any]:
    """All report numbers for one labelled embedding set, with the parameters they used.
    ``fallback_tau`` (a retrain: the tau of the artefact it started from) is kept, and every
    number measured at it, when the set's impostor pairs are too few to support a tau at the
    target FAR (:func:`tcm.impostor_pairs_needed`); without one, an unsupported tau is still
    calibrated and the report says so (``calibration.tau_source``)."""
    cal = calibrate_threshold(emb, labels, target_far=config.target_far)
    needed = impostor_pairs_needed(config.target_far)
    source = "calibrated" if cal.num_impostor >= needed else "unsupported"
    # for a pair-FAR tau the tails are kept to it at once; an FPIR tau is chosen from them
    fpir_target = config.threshold_target == "fpir"
    tails = probe_tails(emb, labels, resolve_at=None if fpir_target else cal.tau)
    n_ref = config.reference_gallery_size
    if fpir_target:
        try:
            tau = tau_at_fpir(tails, config.target_fpir, n_ref)
            cal = calibrate_threshold(emb, labels, target_far=config.target_far, tau=tau)
            source = "fpir"
        except ValueError:
            if fallback_tau is None:
                raise
            source = "unsupported"
    if source == "unsupported" and fallback_tau is not None:
        cal = calibrate_threshold(emb, labels, target_far=config.target_far, tau=fallback_tau)
        source = "inherited"
    if not tails.resolved(cal.tau):  # keep every impostor score at or above the served tau
        tails = probe_tails(emb, labels, resolve_at=cal.tau)
    cons = consistency_report(
        emb,
        labels,
        far_range=(config.far_lo, config.far_hi),
        num_thresholds=config.num_thresholds,
        beta=config.beta,
        eps=config.eps,
        tau=cal.tau,
    )
    ret = retrieval_metrics(emb, labels, ks=(1, 2, 4, 8))
    at = cons.at_tau
    assert at is not None
    level = INTERVAL_LEVEL
    opis_ci = bootstrap_interval(cons.utility, resamples=BOOTSTRAP_RESAMPLES, level=level)
    eps_ci = bootstrap_interval(
        cons.utility, resamples=BOOTSTRAP_RESAMPLES, level=level, eps=config.eps
    )
    return {
        "num_images": len(labels),
        "num_classes": len(cons.classes),
        "excluded_classes": len(cons.excluded_classes),
        "recall_at_1": ret["recall_at_1"],
        "recall_at_2": ret["recall_at_2"],
        "recall_at_4": ret["recall_at_4"],
        "recall_at_8": ret["recall_at_8"],
        "map_at_r": ret["map_at_r"],
        "opis": cons.opis,
        "eps_opis": cons.eps_opis,
        "opis_interval": list(opis_ci),
        "eps_opis_interval": list(eps_ci),
        "interval_level": level,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "calibration": {
            "tau": cal.tau,
            "target_far": cal.target_far,
            "far": cal.far,
            "frr": cal.frr,
            "tar": cal.tar,
            "tau_lo": cons.tau_lo,
            "tau_hi": cons.tau_hi,
            "far_range": [config.far_lo, config.far_hi],
            "num_thresholds": config.num_thresholds,
            "beta": config.beta,
            "eps": config.eps,
            "tau_source": source,
            "impostor_pairs": cal.num_impostor,
            "impostor_pairs_needed": needed,
        },
        "per_class_at_tau": {
            "far_min": float(at.far.min()),
            "far_max": float(at.far.max()),
            "far_std": float(at.far.std()),
            "frr_min": float(at.frr.min()),
            "frr_max": float(at.frr.max()),
            "frr_std": float(at.frr.std()),
            "far_spread": float(np.ptp(at.far)),
            "frr_spread": float(np.ptp(at.frr)),
            "far_over_2x_target": int((at.far > 2 * config.target_far).sum()),
        },
        "openset": openset_summary(
            tails,
            cal.tau,
            cal.far,
            threshold_target=config.threshold_target,
            target_fpir=config.target_fpir,
            reference_gallery_size=config.reference_gallery_size,
        ),
        "_openset": tails,  # not serialised: for the artefact
        "_curves": cons,  # not serialised: used for plots
        "_reference": reference_subsample(emb, labels),  # not serialised: for the artefact
    }


def openset_summary(
    tails: ProbeTails,
    tau: float,
    pair_far: float,
    *,
    threshold_target: str,
    target_fpir: float,
    reference_gallery_size: int,
) -> dict[str, Any]:
    """The manifest's ``openset`` numbers (all but the file name) at ``tau``."""
    n_ref = reference_gallery_size
    return {
        "threshold_target": threshold_target,
        "target_fpir": target_fpir,
        "reference_gallery_size": n_ref,
        "fpir_at_tau": fpir(tails, tau, n_ref),
        "fnir_at_tau": fnir(tails, tau, n_ref),
        # what the pooled pair FAR would imply if every comparison were independent
        "fpir_from_pair_far": fpir_from_pair_far(pair_far, n_ref),
        "probes": int(tails.top.shape[0]),
        "k": tails.k,
    }


def write_report(
    result: dict[str, Any], run_dir: Path, *, extra: dict[str, Any], split: str = "test"
) -> Path:
    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    clean.update(extra)
    path = run_dir / report_name(split)
    path.write_text(json.dumps(clean, indent=2, sort_keys=True))
    return path


def _score_samples(
    emb: torch.Tensor, labels: torch.Tensor, max_pairs: int = 200_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    i = torch.randint(0, n, (max_pairs,), generator=g)
    j = torch.randint(0, n, (max_pairs,), generator=g)
    keep = i != j
    i, j = i[keep], j[keep]
    s = (emb[i] * emb[j]).sum(1).numpy()
    same = (labels[i] == labels[j]).numpy()
    # genuine pairs are rare among random ones: add every within-class pair of up to 200 classes
    gen = [s[same]]
    for k in torch.unique(labels)[:200]:
        members = emb[labels == k]
        sim = members @ members.T
        iu = torch.triu_indices(len(members), len(members), 1)
        gen.append(sim[iu[0], iu[1]].numpy())
    return np.concatenate(gen), s[~same]


def plot_report(
    result: dict[str, Any],
    emb: torch.Tensor,
    labels: torch.Tensor,
    run_dir: Path,
    title: str,
    prefix: str = "",
) -> list[Path]:
    """Writes ``<prefix>utility_curves.png``, ``<prefix>score_histogram.png`` and, for small sets,
    ``<prefix>embedding_2d.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cons = result["_curves"]
    tau = result["calibration"]["tau"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    alpha = float(np.clip(6.0 / max(1, len(cons.utility)), 0.05, 0.7))
    for row in cons.utility:
        ax.plot(cons.thresholds, row, color="tab:blue", alpha=alpha, linewidth=0.8)
    ax.plot(
        cons.thresholds,
        cons.utility.mean(axis=0),
        color="black",
        linewidth=2,
        label="mean over classes",
    )
    ax.axvline(tau, color="tab:red", linestyle="--", label=f"tau = {tau:.3f}")
    ax.set(
        xlabel="threshold (cosine)",
        ylabel="utility (F1 of TPR, TNR)",
        title=f"{title}\nOPIS={cons.opis:.4g}  eps-OPIS={cons.eps_opis:.4g}",
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower left")
    paths.append(run_dir / f"{prefix}utility_curves.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    gen, imp = _score_samples(emb, labels)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-1, 1, 161)
    ax.hist(imp, bins=bins, density=True, alpha=0.55, label="impostor pairs")
    ax.hist(gen, bins=bins, density=True, alpha=0.55, label="genuine pairs")
    ax.axvline(tau, color="tab:red", linestyle="--", label="tau")
    ax.axvspan(cons.tau_lo, cons.tau_hi, color="grey", alpha=0.15, label="calibration range")
    ax.set(xlabel="cosine score", ylabel="density", title=title)
    ax.legend()
    paths.append(run_dir / f"{prefix}score_histogram.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    classes = torch.unique(labels)
    if len(classes) <= 12 or len(labels) <= 3000:
        chosen = classes[:12]
        mask = torch.isin(labels, chosen)
        x = emb[mask].numpy()
        x = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T
        fig, ax = plt.subplots(figsize=(5.5, 5))
        lab = labels[mask].numpy()
        for k in np.unique(lab):
            ax.scatter(*xy[lab == k].T, s=8, label=str(k))
        ax.set(title=f"{title}: 2-D PCA of held-out embeddings", xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=2, ncol=2)
        paths.append(run_dir / f"{prefix}embedding_2d.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
