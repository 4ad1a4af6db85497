"""Face verification on LFW's official pair lists: TAR@FAR, pair accuracy, DET curves.

Two lists, both from ``../shared/data/lfw``:

- ``pairsDevTest.txt`` (View 1): 500 genuine + 500 impostor pairs of *peopleDevTest*
  identities, disjoint from the *peopleDevTrain* identities the model trains on. The honest
  development number.
- ``pairs.txt`` (View 2): 10 folds of 300 + 300 pairs for the standard 10-fold accuracy. Its
  identities overlap peopleDevTrain (View 2 is meant for a model trained on other data or on the
  other nine folds), so with a View 1 model its numbers are optimistic; the report says how many
  of its pairs involve a training identity, and gives the accuracy on the disjoint ones too.

A pair is accepted iff its cosine score ``>= tau``, as everywhere in the project.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tcm import (
    Preprocessing,
    accuracy_at,
    best_accuracy_threshold,
    kfold_pair_accuracy,
    roc_points,
    tar_at_far,
    to_input_tensor,
)
from training.data import _decode, _require
from training.evaluate import embed

ZIP = "lfw-deepfunneled-crop160.zip"
ZIP_ROOT = "lfw-deepfunneled-c160"
PAIR_LISTS = ("pairsDevTest", "pairs")
FARS = (1e-2, 1e-3)


@dataclass(frozen=True)
class PairList:
    """Pairs as (name, image number) on each side, with the official folds."""

    a: list[tuple[str, int]]
    b: list[tuple[str, int]]
    same: np.ndarray  # bool (n,)
    folds: np.ndarray  # int (n,)


def parse_pairs(text: str) -> PairList:
    """LFW's pair format: a header ``n`` (one set) or ``folds n``, then per fold ``n`` matched
    lines ``name i j`` followed by ``n`` mismatched lines ``name1 i name2 j``."""
    lines = [ln.split() for ln in text.strip().splitlines()]
    if not lines or not all(t.isdigit() for t in lines[0]) or len(lines[0]) not in (1, 2):
        raise ValueError("not an LFW pairs file: the first line must be 'n' or 'folds n'")
    folds, n = (1, int(lines[0][0])) if len(lines[0]) == 1 else map(int, lines[0])
    body = lines[1:]
    if len(body) != 2 * folds * n:
        raise ValueError(f"expected {2 * folds * n} pair lines, found {len(body)}")
    a, b, same, fold = [], [], [], []
    for i, t in enumerate(body):
        if len(t) == 3:
            a.append((t[0], int(t[1])))
            b.append((t[0], int(t[2])))
            same.append(True)
        elif len(t) == 4:
            a.append((t[0], int(t[1])))
            b.append((t[2], int(t[3])))
            same.append(False)
        else:
            raise ValueError(f"pair line {i + 2} has {len(t)} fields, expected 3 or 4")
        fold.append(i // (2 * n))
    same_arr = np.asarray(same)
    for k in range(folds):  # each fold: n matched lines, then n mismatched
        block = same_arr[k * 2 * n : (k + 1) * 2 * n]
        if not (block[:n].all() and not block[n:].any()):
            raise ValueError(f"fold {k} does not list {n} matched then {n} mismatched pairs")
    return PairList(a, b, same_arr, np.asarray(fold))


def load_pair_images(
    data_dir: str | Path, which: str
) -> tuple[PairList, list[np.ndarray], list[np.ndarray]]:
    if which not in PAIR_LISTS:
        raise ValueError(f"pair list must be one of {PAIR_LISTS}, got {which!r}")
    folder = _require(Path(data_dir) / "lfw", "LFW")
    pairs = parse_pairs(_require(folder / f"{which}.txt", f"LFW {which}.txt").read_text())
    wanted = sorted(set(pairs.a) | set(pairs.b))
    decoded: dict[tuple[str, int], np.ndarray] = {}
    with zipfile.ZipFile(_require(folder / ZIP, "LFW zip")) as z:
        for name, num in wanted:
            member = f"{ZIP_ROOT}/{name}/{name}_{num:04d}.jpg"
            try:
                decoded[(name, num)] = _decode(z.read(member))
            except KeyError as exc:
                raise ValueError(f"{which}.txt names {member}, which the zip lacks") from exc
    return pairs, [decoded[k] for k in pairs.a], [decoded[k] for k in pairs.b]


def pair_scores(
    model: nn.Module,
    pre: Preprocessing,
    images_a: list[np.ndarray],
    images_b: list[np.ndarray],
    device: torch.device | str = "cpu",
) -> np.ndarray:
    ea = embed(model, to_input_tensor(images_a, pre), device=device)
    eb = embed(model, to_input_tensor(images_b, pre), device=device)
    return (ea * eb).sum(dim=1).double().numpy()


def verification_report(
    scores: np.ndarray, pairs: PairList, tau: float, train_people: set[str] | None = None
) -> dict[str, Any]:
    """Everything about one pair list: TAR@FAR, accuracy at the global tau, the best
    accuracy (and k-fold accuracy with official folds), and overlap with training identities."""
    same = pairs.same
    gen, imp = scores[same], scores[~same]
    out: dict[str, Any] = {
        "pairs": len(scores),
        "genuine": int(same.sum()),
        "impostor": int((~same).sum()),
        "tar_at_far": {f"{far:g}": tar_at_far(gen, imp, far) for far in FARS},
        "at_global_tau": {
            "tau": tau,
            "accuracy": accuracy_at(scores, same, tau),
            "far": float((imp >= tau).mean()),
            "frr": float((gen < tau).mean()),
        },
        "best_threshold": dict(
            zip(("tau", "accuracy"), best_accuracy_threshold(scores, same), strict=True)
        ),
        # FAR 1e-3 needs >= 1000 impostor pairs to mean anything: say what resolution there is
        "far_resolution": 1.0 / max(1, int((~same).sum())),
    }
    if len(np.unique(pairs.folds)) > 1:
        out["kfold_accuracy"] = kfold_pair_accuracy(scores, same, pairs.folds).to_dict()
    if train_people is not None:
        seen = np.array(
            [
                a[0] in train_people or b[0] in train_people
                for a, b in zip(pairs.a, pairs.b, strict=True)
            ]
        )
        out["pairs_with_training_identity"] = int(seen.sum())
        if (~seen).any() and len(np.unique(same[~seen])) == 2:
            tau_d, acc_d = best_accuracy_threshold(scores[~seen], same[~seen])
            out["disjoint_pairs"] = {
                "pairs": int((~seen).sum()),
                "genuine": int(same[~seen].sum()),
                "best_accuracy": acc_d,
                "best_tau": tau_d,
                "accuracy_at_global_tau": accuracy_at(scores[~seen], same[~seen], tau),
            }
    return out


def train_people(data_dir: str | Path) -> set[str]:
    text = (Path(data_dir) / "lfw" / "peopleDevTrain.txt").read_text().splitlines()[1:]
    return {ln.split("\t")[0] for ln in text if "\t" in ln}


def lfw_verification(
    model: nn.Module,
    pre: Preprocessing,
    data_dir: str | Path,
    tau: float,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reports for both official lists, and their scores (for plots)."""
    people = train_people(data_dir)
    reports, scores_by = {}, {}
    for which in PAIR_LISTS:
        pairs, ia, ib = load_pair_images(data_dir, which)
        s = pair_scores(model, pre, ia, ib, device)
        reports[which] = verification_report(s, pairs, tau, people)
        scores_by[which] = (s, pairs.same)
    return reports, scores_by


def plot_det(
    scores_by: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str, tau: float
) -> Path:
    """DET curves (FRR against FAR, log-log) of each pair list, with the global tau marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for which, (s, same) in scores_by.items():
        roc = roc_points(s[same], s[~same])
        floor = 0.5 / max(1, int((~same).sum()))
        ax.plot(np.maximum(roc["far"], floor), np.maximum(roc["frr"], floor), label=which)
        far_t, frr_t = float((s[~same] >= tau).mean()), float((s[same] < tau).mean())
        ax.scatter([max(far_t, floor)], [max(frr_t, floor)], marker="o", zorder=3)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="FAR",
        ylabel="FRR",
        title=f"{title}\nDET on LFW pairs (dot: global tau = {tau:.3f})",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
