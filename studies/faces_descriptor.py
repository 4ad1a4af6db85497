"""The face descriptor study (`make study-faces-descriptor`): dlib's pretrained descriptor, a head
on it without TCM, and the head with TCM, on LFW View 2 and on ORL.

Protocol (LFW "unrestricted", identity-disjoint throughout):

- For each of the 10 folds of ``people.txt`` (those whose descriptors are cached), the head
  trains on the people of the other folds (their images named in ``pairs.txt``; people with
  >= 2 of them: 1,153-1,214 per fold, ``train_identities`` in each sweep record), minus 15% of
  the other folds' people (drawn from all of them, single-image people included) held out as
  *validation identities*. TCM margins
  are chosen on the validation identities (lowest validation OPIS among TCM runs within 0.005
  R@1 of the head without TCM); the global threshold tau is calibrated there too (FAR 1e-3
  over all validation pairs). The test fold is never looked at.
- Test, per fold: the fold's 600 pairs of ``pairs.txt`` (k-fold accuracy: tau picked on the other
  nine folds' pairs, scored by the same head, the standard protocol); accuracy at the validation
  tau; TAR at FAR 1e-3 / 1e-2 over all pairs of the fold's images in pairs.txt (737-813 images:
  270,000-329,000 impostor pairs, against the 300 that pairs.txt lists; each record's
  ``images`` and ``impostor_pairs``); OPIS, eps-OPIS and the per-identity FAR/FRR spread at
  tau over the fold's identities with >= 4 images only (the others are left out of those
  figures, impostor pairs included).
- ORL (all 40 people x 10 images, never trained on): the same metrics for every fold's head.
- Seeds 0, 1, 2 for the heads; the raw descriptor has no seed. Paired differences per fold
  (seed-averaged), mean and 95% t-interval over the folds.

Descriptors come from the on-disk cache, which ``python -m training.face_cache`` fills (~0.1 s
per image per core on a quiet machine); this module extracts nothing and uses the folds whose
pair images are all cached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facekit import FaceOptions
from studies.common import console, machine
from tcm import (
    best_accuracy_threshold,
    calibrate_threshold,
    consistency_report,
    recall_at_k,
    roc_points,
)
from training import face_cache as fc
from training.face_head import HeadConfig, embed_descriptors, train_head
from training.faces import parse_pairs

VARIANTS = ("raw descriptor", "head", "head + TCM")
TARGET_FAR = 1e-3
# two-sided 95% Student t quantiles by degrees of freedom (folds - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def people_folds(data_dir: Path) -> list[list[str]]:
    lines = (data_dir / "lfw" / "people.txt").read_text().split("\n")
    folds, i = [], 1
    for _ in range(int(lines[0])):
        n = int(lines[i])
        folds.append([ln.split("\t")[0] for ln in lines[i + 1 : i + 1 + n]])
        i += 1 + n
    return folds


def person(member: str) -> str:
    return member.split("/")[-2]


def study_descriptors(desc: fc.Descriptors, members: set[str]) -> fc.Descriptors:
    """The study's images in sorted name order, whatever order the cache holds them in.

    The cache's order is the order its chunks were extracted (shards, reruns); the heads'
    labels and batches follow the row order, so without sorting the same descriptors gave
    different heads and different numbers from one extraction to the next.
    """
    return desc.take(sorted(set(desc.names) & members))


def labelled(desc: fc.Descriptors, members: list[str]) -> tuple[np.ndarray, np.ndarray]:
    sub = desc.take(members)
    names = [person(m) for m in sub.names]
    ids = {n: i for i, n in enumerate(dict.fromkeys(names))}
    return sub.vectors, np.array([ids[n] for n in names])


def with_min_images(labels: np.ndarray, min_images: int) -> np.ndarray:
    """Mask of the samples whose label occurs >= ``min_images`` times.

    Compares label *values*: an earlier version compared them with positions in the unique
    array, which is only right for labels 0..n-1 and dropped ORL's person s40 (labels 1..40).
    """
    values, counts = np.unique(labels, return_counts=True)
    return np.isin(labels, values[counts >= min_images])


def evaluate_set(
    emb: np.ndarray, labels: np.ndarray, tau: float, min_images: int
) -> dict[str, float]:
    """R@1 and TAR@FAR over all images; OPIS/eps-OPIS and the per-identity FAR/FRR at tau over
    the images of identities with >= ``min_images`` only (the others are left out of those
    figures altogether, impostor pairs included)."""
    out: dict[str, float] = {"recall_at_1": recall_at_k(emb, labels, 1)}
    for far in (1e-3, 1e-2):
        out[f"tar_far_{far:g}"] = calibrate_threshold(emb, labels, target_far=far).tar
    _, counts = np.unique(labels, return_counts=True)
    keep = with_min_images(labels, min_images)
    rep = consistency_report(emb[keep], labels[keep], tau=tau)
    a = rep.at_tau
    assert a is not None
    out.update(
        opis=rep.opis,
        eps_opis=rep.eps_opis,
        far_at_tau=a.global_far,
        frr_at_tau=a.global_frr,
        far_spread=float(np.ptp(a.far)),
        frr_spread=float(np.ptp(a.frr)),
        far_std=float(a.far.std()),
        frr_std=float(a.frr.std()),
        identities=len(rep.classes),
        images=len(labels),
        impostor_pairs=int(
            len(labels) * (len(labels) - 1) // 2 - (counts * (counts - 1) // 2).sum()
        ),
    )
    return out


def margin_choice(
    xtr, ytr, xval, yval, base: HeadConfig, grid: list[tuple[float, float]], slack: float
) -> tuple[dict[str, Any], list[dict[str, Any]], dict]:
    """Head without TCM and with TCM at each (m_plus, m_minus), judged on validation identities;
    returns the pick, the table and the trained heads (reused as the seed-0 runs)."""
    rows, heads = [], {}
    for tcm_on, (mp, mm) in [(False, (base.m_plus, base.m_minus))] + [(True, g) for g in grid]:
        cfg = replace(base, tcm=tcm_on, m_plus=mp, m_minus=mm)
        head = train_head(xtr, ytr, cfg)
        heads[(tcm_on, mp, mm)] = head
        emb = embed_descriptors(head, xval)
        rep = consistency_report(emb, yval)
        rows.append(
            {
                "tcm": tcm_on,
                "m_plus": mp,
                "m_minus": mm,
                "opis": rep.opis,
                "eps_opis": rep.eps_opis,
                "recall_at_1": recall_at_k(emb, yval, 1),
            }
        )
    ref = rows[0]
    ok = [r for r in rows[1:] if r["recall_at_1"] >= ref["recall_at_1"] - slack]
    pick = min(ok, key=lambda r: r["opis"]) if ok else max(rows[1:], key=lambda r: r["recall_at_1"])
    return pick, rows, heads


def ci(diffs: list[float]) -> dict[str, float]:
    m = statistics.fmean(diffs)
    half = (
        T95[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    )
    return {"mean": m, "lo": m - half, "hi": m + half}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--cache", type=Path, default=fc.DEFAULT_ROOT)
    p.add_argument("--docs", type=Path, default=Path("docs/results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--folds",
        type=int,
        nargs="*",
        default=None,
        help="View 2 folds to use (default: every fold whose images are cached)",
    )
    p.add_argument("--kind", default="linear", choices=["linear", "mlp"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--m-plus", default="0.8,0.9")
    p.add_argument("--m-minus", default="0.5,0.7")
    p.add_argument("--slack", type=float, default=0.005)
    p.add_argument("--val-share", type=float, default=0.15)
    args = p.parse_args()
    started = time.perf_counter()
    data = args.data_dir
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared CPU
    opts = FaceOptions(fallback="whole_image")
    lfw = fc.cached(data / fc.LFW_ZIP, opts, args.cache)
    orl = fc.cached(data / fc.ORL_ZIP, opts, args.cache).take(fc.orl_members())
    orl_y = np.array([int(person(m)[1:]) for m in orl.names])
    pairs = parse_pairs((data / "lfw" / "pairs.txt").read_text())
    have = set(lfw.names)
    complete = [
        k
        for k in range(10)
        if all(
            fc.lfw_member(*x) in have
            for x, f in zip(pairs.a + pairs.b, np.tile(pairs.folds, 2), strict=True)
            if f == k
        )
    ]
    used = [k for k in (args.folds or range(10)) if k in complete]
    if len(used) < 2:
        raise SystemExit(
            f"descriptors cached for folds {complete} only: run python -m training.face_cache first"
        )
    console.print(f"folds with every pair image cached: {complete}; using {used}")
    keep = np.isin(pairs.folds, used)
    pairs = type(pairs)(
        [a for a, m in zip(pairs.a, keep, strict=True) if m],
        [b for b, m in zip(pairs.b, keep, strict=True) if m],
        pairs.same[keep],
        pairs.folds[keep],
    )
    pa = lfw.take([fc.lfw_member(*k) for k in pairs.a]).vectors
    pb = lfw.take([fc.lfw_member(*k) for k in pairs.b]).vectors
    study = set(fc.lfw_member(*x) for x in pairs.a + pairs.b)
    lfw = study_descriptors(lfw, study)
    folds = people_folds(data)
    base = HeadConfig(kind=args.kind, steps=args.steps)
    grid = [(float(a), float(b)) for a in args.m_plus.split(",") for b in args.m_minus.split(",")]
    records: list[dict[str, Any]] = []
    sweeps, pooled = [], {v: [] for v in VARIANTS}  # pooled: seed-0 pair scores for the plots
    for k in used:
        rng = np.random.default_rng(1000 + k)
        train_people = {n for j in used if j != k for n in folds[j]}
        members = [m for m in lfw.names if person(m) in train_people]
        ids = sorted({person(m) for m in members})
        val_ids = set(rng.choice(ids, size=int(args.val_share * len(ids)), replace=False))
        xtr, ytr = labelled(lfw, [m for m in members if person(m) not in val_ids])
        xval, yval = labelled(lfw, [m for m in members if person(m) in val_ids])
        test_people = set(folds[k])
        xte, yte = labelled(lfw, [m for m in lfw.names if person(m) in test_people])
        pick, rows, swept = margin_choice(xtr, ytr, xval, yval, base, grid, args.slack)
        trained = int((np.unique(ytr, return_counts=True)[1] >= 2).sum())  # the head's batches
        sweeps.append(
            {
                "fold": k,
                "rows": rows,
                "picked": pick,
                "train_identities": trained,
                "train_identities_listed": len(set(ytr.tolist())),
                "val_identities": len(val_ids),
            }
        )
        console.print(
            f"fold {k}: {trained} train (>= 2 images) / {len(val_ids)} val identities, "
            f"margins m+={pick['m_plus']} m-={pick['m_minus']} "
            f"({(time.perf_counter() - started) / 60:.1f} min)"
        )
        test = pairs.folds == k
        for variant in VARIANTS:
            for seed in [0] if variant == VARIANTS[0] else args.seeds:
                tcm_on = variant == VARIANTS[2]
                cfg = replace(
                    base,
                    seed=seed,
                    kind="none" if variant == VARIANTS[0] else base.kind,
                    tcm=tcm_on,
                    m_plus=pick["m_plus"],
                    m_minus=pick["m_minus"],
                )
                key = (
                    (tcm_on, cfg.m_plus, cfg.m_minus)
                    if tcm_on
                    else (False, base.m_plus, base.m_minus)
                )
                reuse = variant != VARIANTS[0] and seed == base.seed
                head = swept[key] if reuse else train_head(xtr, ytr, cfg)
                tau = calibrate_threshold(
                    embed_descriptors(head, xval), yval, target_far=TARGET_FAR
                ).tau
                s = (embed_descriptors(head, pa) * embed_descriptors(head, pb)).sum(1)
                t_best, _ = best_accuracy_threshold(s[~test], pairs.same[~test])
                rec: dict[str, Any] = {
                    "fold": k,
                    "variant": variant,
                    "seed": seed,
                    "tau": tau,
                    "margins": [pick["m_plus"], pick["m_minus"]] if tcm_on else None,
                    "acc_10fold": float(((s[test] >= t_best) == pairs.same[test]).mean()),
                    "acc_at_tau": float(((s[test] >= tau) == pairs.same[test]).mean()),
                    "lfw": evaluate_set(embed_descriptors(head, xte), yte, tau, 4),
                    "orl": evaluate_set(embed_descriptors(head, orl.vectors), orl_y, tau, 4),
                }
                records.append(rec)
                if seed == base.seed:
                    pooled[variant].append((s[test], pairs.same[test]))
    write_report(args, records, sweeps, pooled, started)


METRICS = [
    ("acc_10fold", "LFW k-fold acc.", ".4f"),
    ("acc_at_tau", "LFW acc. at τ", ".4f"),
    ("lfw.tar_far_0.001", "LFW TAR@FAR 1e-3", ".4f"),
    ("lfw.tar_far_0.01", "LFW TAR@FAR 1e-2", ".4f"),
    ("lfw.opis", "LFW OPIS ×1e-3", ".3f"),
    ("lfw.eps_opis", "LFW ε-OPIS", ".4f"),
    ("lfw.far_spread", "LFW FAR spread at τ", ".4f"),
    ("lfw.frr_spread", "LFW FRR spread at τ", ".3f"),
    ("lfw.frr_std", "LFW FRR std at τ", ".4f"),
    ("orl.tar_far_0.001", "ORL TAR@FAR 1e-3", ".4f"),
    ("orl.opis", "ORL OPIS ×1e-3", ".3f"),
    ("orl.eps_opis", "ORL ε-OPIS", ".4f"),
    ("orl.far_at_tau", "ORL FAR at τ", ".4f"),
    ("orl.frr_at_tau", "ORL FRR at τ", ".4f"),
    ("orl.frr_spread", "ORL FRR spread at τ", ".3f"),
]


def value(rec: dict[str, Any], key: str) -> float:
    v: Any = rec
    for part in key.split(".", 1):
        v = v[part]
    return float(v) * (1e3 if key.endswith(".opis") else 1.0)


def fold_means(records: list[dict[str, Any]], variant: str, key: str) -> list[float]:
    by_fold: dict[int, list[float]] = {}
    for r in records:
        if r["variant"] == variant:
            by_fold.setdefault(r["fold"], []).append(value(r, key))
    return [statistics.fmean(by_fold[f]) for f in sorted(by_fold)]


def plot(pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]], path: Path, folds: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roc_ax, det_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for variant, parts in pooled.items():
        s = np.concatenate([p[0] for p in parts])
        same = np.concatenate([p[1] for p in parts])
        roc = roc_points(s[same], s[~same])
        floor = 0.5 / int((~same).sum())
        roc_ax.plot(np.maximum(roc["far"], floor), 1 - roc["frr"], label=variant)
        det_ax.plot(np.maximum(roc["far"], floor), np.maximum(roc["frr"], floor), label=variant)
    roc_ax.set(
        xscale="log",
        xlabel="FAR",
        ylabel="TAR",
        title=f"ROC, LFW pairs.txt (test folds {folds}, pooled)",
    )
    det_ax.set(xscale="log", yscale="log", xlabel="FAR", ylabel="FRR", title="DET")
    for ax in (roc_ax, det_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args, records, sweeps, pooled, started) -> None:
    args.docs.mkdir(parents=True, exist_ok=True)
    lines = [
        "| metric | " + " | ".join(VARIANTS) + " | head − raw (95% CI) | TCM − head (95% CI) |",
        "|---" * (len(VARIANTS) + 3) + "|",
    ]
    summary: dict[str, Any] = {}
    for key, title, spec in METRICS:
        cells, per = [], {}
        for v in VARIANTS:
            fm = fold_means(records, v, key)
            per[v] = fm
            cells.append(f"{statistics.fmean(fm):{spec}} ± {statistics.stdev(fm):{spec}}")
        d1 = ci([a - b for a, b in zip(per[VARIANTS[1]], per[VARIANTS[0]], strict=True)])
        d2 = ci([a - b for a, b in zip(per[VARIANTS[2]], per[VARIANTS[1]], strict=True)])
        summary[key] = {"folds": per, "head_minus_raw": d1, "tcm_minus_head": d2}
        fmt = [f"{d['mean']:+{spec}} [{d['lo']:+{spec}}, {d['hi']:+{spec}}]" for d in (d1, d2)]
        lines.append(f"| {title} | " + " | ".join(cells) + " | " + " | ".join(fmt) + " |")
    seed_lines = [
        "| variant | seed | LFW k-fold acc. | LFW OPIS ×1e-3 | ORL OPIS ×1e-3 |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        for seed in sorted({r["seed"] for r in records if r["variant"] == v}):
            rs = [r for r in records if r["variant"] == v and r["seed"] == seed]
            seed_lines.append(
                f"| {v} | {seed} | {statistics.fmean(value(r, 'acc_10fold') for r in rs):.4f} | "
                f"{statistics.fmean(value(r, 'lfw.opis') for r in rs):.3f} | "
                f"{statistics.fmean(value(r, 'orl.opis') for r in rs):.3f} |"
            )
    picks = [
        f"fold {s['fold']}: ({s['picked']['m_plus']}, {s['picked']['m_minus']})" for s in sweeps
    ]
    plot(
        pooled,
        args.docs / "faces_descriptor_roc_det.png",
        ",".join(str(f) for f in sorted({r["fold"] for r in records})),
    )
    minutes = (time.perf_counter() - started) / 60
    machine_desc = machine()
    (args.docs / "faces_descriptor_table.md").write_text(
        "\n".join(
            [
                f"## dlib descriptor ± trained head ± TCM (mean ± std over folds "
                f"{', '.join(map(str, sorted({r['fold'] for r in records})))} of View 2; "
                f"heads seed-averaged over seeds {', '.join(map(str, args.seeds))})",
                "",
                *lines,
                "",
                "Differences are paired per fold (seed-averaged); intervals: 95% Student t "
                "over folds.",
                "",
                "## Per seed (mean over folds)",
                "",
                *seed_lines,
                "",
                "Margins (m_plus, m_minus) chosen on each fold's validation identities: "
                + "; ".join(picks)
                + ".",
                "",
                f"Machine: {machine_desc}; head {args.kind}, {args.steps} steps; "
                f"wall time {minutes:.1f} min (descriptors from the cache).",
                "",
            ]
        )
    )
    (args.docs / "faces_descriptor_study.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "records": records,
                "sweeps": sweeps,
                "machine": machine_desc,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=1,
            default=float,
        )
    )
    console.print((args.docs / "faces_descriptor_table.md").read_text())


if __name__ == "__main__":
    main()
