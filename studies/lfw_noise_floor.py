"""OPIS's noise floor on LFW's test split: what a model whose identities all behave alike gets.

OPIS is a variance of per-identity utility curves, and 45% of LFW peopleDevTest's eligible
identities (>= 2 images) have exactly 2 images: one genuine pair, so their TPR at any threshold
is 0 or 1 and their curves differ by chance alone. This simulation measures that chance part.
Embeddings of a *homogeneous* model: one random unit centre per identity in 128-d and, for every
image, the centre plus isotropic noise of one common scale sigma (then L2-normalised), so every
identity has the same genuine and impostor score distributions. The identities and their image
counts are LFW peopleDevTest's own (read from the data's zip, exactly as the loader reads it).
For each arm of the committed face study (``docs/results/faces_study.json``) sigma is set, by
bisection, so that the global FRR at the calibrated tau (FAR 1e-2) matches that arm's mean
over seeds; OPIS and eps-OPIS are then measured by the same code as the study
(:func:`training.evaluate.evaluate_embeddings`) over ``--sims`` simulation seeds. An arm whose
OPIS sits at or below this floor shows no identity-dependent inconsistency that this test split
can resolve.

    python -m studies.lfw_noise_floor --data-dir ../shared/data   # 39 min on the shared 2-core VM

Writes ``<docs>/lfw_noise_floor.json`` (read by ``python -m studies.derived``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import TrainConfig
from training.evaluate import evaluate_embeddings

DIM = 128


def test_class_sizes(data_dir: Path) -> np.ndarray:
    """Images per peopleDevTest identity, counted in the zip as the LFW loader counts them."""
    folder = data_dir / "lfw"
    lines = (folder / "peopleDevTest.txt").read_text().split("\n")[1:]
    people = {ln.split("\t")[0] for ln in lines if "\t" in ln}
    counts: dict[str, int] = {}
    with zipfile.ZipFile(folder / "lfw-deepfunneled-crop160.zip") as z:
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[2].endswith(".jpg") and parts[1] in people:
                counts[parts[1]] = counts.get(parts[1], 0) + 1
    return np.array([counts[p] for p in sorted(counts)], np.int64)


def homogeneous_embeddings(
    sizes: np.ndarray, sigma: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every identity alike: a random unit centre plus noise of one scale for every image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes))
    centres = torch.nn.functional.normalize(torch.randn(len(sizes), DIM, generator=g), dim=1)
    noise = torch.randn(len(labels), DIM, generator=g) * (sigma / DIM**0.5)
    return torch.nn.functional.normalize(centres[labels] + noise, dim=1), labels


def sigma_for_frr(
    sizes: np.ndarray, target_frr: float, config: TrainConfig, seed: int = 0, steps: int = 12
) -> float:
    """Bisection on log sigma: the global FRR at the calibrated tau grows with the noise."""
    from tcm import calibrate_threshold

    lo, hi = np.log(0.05), np.log(20.0)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        emb, labels = homogeneous_embeddings(sizes, float(np.exp(mid)), seed)
        frr = calibrate_threshold(emb, labels, target_far=config.target_far).frr
        lo, hi = (mid, hi) if frr < target_frr else (lo, mid)
    return float(np.exp(0.5 * (lo + hi)))


def floor_for(
    sizes: np.ndarray, target_frr: float, sims: int, config: TrainConfig
) -> dict[str, Any]:
    sigma = sigma_for_frr(sizes, target_frr, config)
    rows = []
    for seed in range(1, sims + 1):  # seed 0 chose sigma; the floor is measured on fresh draws
        emb, labels = homogeneous_embeddings(sizes, sigma, seed)
        r = evaluate_embeddings(emb, labels, config)
        rows.append(
            {
                "seed": seed,
                "opis": r["opis"],
                "eps_opis": r["eps_opis"],
                "frr_at_tau": r["calibration"]["frr"],
                "tau": r["calibration"]["tau"],
                "frr_spread": r["per_class_at_tau"]["frr_spread"],
                "far_spread": r["per_class_at_tau"]["far_spread"],
            }
        )

    def ms(key: str) -> list[float]:
        vals = [row[key] for row in rows]
        return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]

    return {
        "sigma": sigma,
        "target_frr": target_frr,
        "sims": rows,
        **{k: ms(k) for k in ("opis", "eps_opis", "frr_at_tau", "far_spread")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--docs", type=Path, default=Path("docs/results"))
    p.add_argument("--sims", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    sizes = test_class_sizes(args.data_dir)
    eligible = sizes[sizes >= 2]
    study = json.loads((args.docs / "faces_study.json").read_text())
    config = TrainConfig()  # the study's evaluation settings (FAR range, eps, beta) are defaults
    arms: dict[str, list[float]] = {}
    for run in study["runs"]:
        arms.setdefault(run["loss"], []).append(run["frr_at_tau"])
    out: dict[str, Any] = {
        "identities": len(sizes),
        "images": int(sizes.sum()),
        "eligible_identities": len(eligible),
        "eligible_with_2_images": int((eligible == 2).sum()),
        "eligible_with_4_or_more": int((eligible >= 4).sum()),
        "model": f"homogeneous: random unit centres in {DIM}-d + isotropic noise of one scale, "
        "matched to each arm's mean global FRR at tau (FAR 1e-2)",
        "arms": {},
    }
    for arm, frrs in arms.items():
        target = statistics.fmean(frrs)
        out["arms"][arm] = floor_for(sizes, target, args.sims, config)
        f = out["arms"][arm]
        print(
            f"{arm}: FRR target {target:.3f} -> sigma {f['sigma']:.3f}; floor OPIS "
            f"{f['opis'][0] * 1e3:.1f} ± {f['opis'][1] * 1e3:.1f} e-3, eps-OPIS "
            f"{f['eps_opis'][0]:.3f} ± {f['eps_opis'][1]:.3f}",
            flush=True,
        )
    (args.docs / "lfw_noise_floor.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
