"""Expected FPIR for a gallery of subjects (``tcm.openset.fpir_gallery``) against galleries
drawn from the bird default's held-out species, and against the photo model it refines.

The committed bird default (``artefacts/default``) held out 42 CUB species (2,474 photos). This
command embeds them with the artefact's own weights (the backbone features are cached as
``tcm-train openset`` caches them), then draws galleries the way a tenant enrols: G species x
P photos each, and stranger probes from S other species (6 photos each). Per shape and draw:
the measured FPIR (share of probes whose best gallery score reaches tau), the species-bootstrap
95% interval (stranger species resampled: photos of one species are accepted together), and
whether each model's expected FPIR lies in it:

* the photo model, ``fpir(tails, tau, G * P)``: G * P photos of G * P strangers;
* the gallery model, ``fpir_gallery(tails, tau, {P: G})``: G strangers of P photos each;
* the same gallery model computed for draws *without* replacement from the 41 other species
  (what these finite draws do; a real tenant's subjects come from an open population, which
  the with-replacement model describes).

    python -m studies.openset_gallery --data-dir ../shared/data   # minutes: features cached

Writes ``<docs>/openset_gallery.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import gammaln

from studies.common import machine
from tcm import load_openset
from tcm.openset import fpir, fpir_gallery
from training.artefact_data import held_out_embeddings

SHAPES = [(15, 8, 15), (20, 6, 20), (12, 10, 20), (10, 8, 20)]  # (G, P, stranger species S)
PROBES_PER_SPECIES = 6


def _lcomb(n: np.ndarray, k: int) -> np.ndarray:
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def fpir_finite_draws(s: np.ndarray, y: np.ndarray, tau: float, g: int, p: int) -> float:
    """Exact expected FPIR for G distinct species drawn without replacement from the other
    held-out species, P photos each without replacement, probes weighted per species."""
    classes = np.unique(y)
    code = np.searchsorted(classes, y)
    sizes = np.bincount(code)
    exceed = np.stack([(s[:, code == c] >= tau).sum(axis=1) for c in range(len(classes))], 1)
    miss = np.exp(_lcomb(sizes[None, :] - exceed, p) - _lcomb(sizes[None, :], p))
    miss = np.where(sizes[None, :] - exceed < p, 0.0, miss)
    per_probe = []
    for i in range(len(y)):
        x = np.delete(miss[i], code[i])
        e = np.zeros(g + 1)  # elementary symmetric polynomials: mean product over G-subsets
        e[0] = 1.0
        for v in x:
            e[1:] = e[1:] + v * e[:-1]
        per_probe.append(1.0 - e[g] / np.exp(_lcomb(np.array(len(x)), g)))
    f = np.array(per_probe)
    return float(np.mean([f[code == c].mean() for c in range(len(classes))]))


def species_interval(hits: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> tuple:
    pick = rng.integers(0, len(hits), size=(2000, len(hits)))
    rates = hits[pick].sum(axis=1) / sizes[pick].sum(axis=1)
    return tuple(float(q) for q in np.quantile(rates, [0.025, 0.975]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artefact", type=Path, default=Path("artefacts/default"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--docs", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    emb_t, y, manifest, _ = held_out_embeddings(
        args.artefact, [f"data_dir={args.data_dir}"] if args.data_dir else []
    )
    emb = emb_t.numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    tau = manifest.calibration.tau
    tails = load_openset(args.artefact, manifest)
    assert tails is not None and tails.resolved(tau), "re-run tcm-train openset on the artefact"
    s = emb @ emb.T
    classes = np.unique(y)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for g, p, n_strangers in SHAPES:
        models = {
            "photo_model": fpir(tails, tau, g * p),
            "gallery_model": fpir_gallery(tails, tau, {p: g}),
            "gallery_model_finite_draws": fpir_finite_draws(s, y, tau, g, p),
        }
        measured, inside = [], dict.fromkeys(models, 0)
        for _ in range(args.draws):
            perm = rng.permutation(classes)
            gallery = np.concatenate(
                [rng.choice(np.flatnonzero(y == c), p, replace=False) for c in perm[:g]]
            )
            strangers = perm[g : g + n_strangers]
            hits, sizes = [], []
            for c in strangers:
                probes = rng.choice(np.flatnonzero(y == c), PROBES_PER_SPECIES, replace=False)
                hits.append(int((s[np.ix_(probes, gallery)].max(axis=1) >= tau).sum()))
                sizes.append(PROBES_PER_SPECIES)
            h, z = np.array(hits, float), np.array(sizes, float)
            measured.append(float(h.sum() / z.sum()))
            lo, hi = species_interval(h, z, rng)
            for name, value in models.items():
                inside[name] += lo <= value <= hi
        m = np.array(measured)
        rows.append(
            {
                "subjects": g,
                "photos_per_subject": p,
                "stranger_species": n_strangers,
                "probes_per_species": PROBES_PER_SPECIES,
                "draws": args.draws,
                "measured_mean": float(m.mean()),
                "measured_sd": float(m.std()),
                "measured_mean_se": float(m.std() / np.sqrt(len(m))),
                **{k: float(v) for k, v in models.items()},
                **{f"{k}_in_interval": inside[k] / args.draws for k in models},
            }
        )
        print(rows[-1])
    out = {
        "artefact": str(args.artefact),
        "model_version": manifest.model_version,
        "tau": tau,
        "held_out_species": len(classes),
        "held_out_photos": len(y),
        "tails_k": tails.k,
        # the manifest's reference gallery (1,000 photos) read both ways
        "reference_photos": 1000,
        "reference_photo_model": fpir(tails, tau, 1000),
        "reference_gallery_model_125x8": fpir_gallery(tails, tau, {8: 125}),
        "machine": machine(),
        "shapes": rows,
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "openset_gallery.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
