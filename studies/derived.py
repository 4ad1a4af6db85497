"""Every figure docs/results.md derives from the committed study JSON, recomputed from it.

The studies write one JSON each (``docs/results/study.json``, ``faces_study.json``,
``orl_study.json``, ``lfw_noise_floor.json``, ``cub_study.json``); the write-up quotes
differences, relative changes, shares of genuine pairs and identity counts that are not printed
in their tables. This command recomputes each of them from those files (and, for the LFW
identity counts, from the data's people lists), so that every number in the write-up has a
command behind it:

    python -m studies.derived --data-dir ../shared/data   # seconds; no training

Writes ``<docs>/derived.md`` and ``<docs>/derived.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from studies.common import Key, differences_table, paired_differences

OMNIGLOT_KEYS: list[Key] = [
    ("recall_at_1", "R@1 (pt)", 100, ".2f"),
    ("map_at_r", "MAP@R (pt)", 100, ".2f"),
    ("opis", "OPIS (×1e-3)", 1e3, ".2f"),
    ("eps_opis", "ε-OPIS", 1, ".4f"),
    ("frr_at_tau", "FRR at τ", 1, ".4f"),
    ("far_spread", "per-class FAR spread", 1, ".4f"),
    ("frr_spread", "per-class FRR spread", 1, ".4f"),
]
LFW_KEYS: list[Key] = [
    ("recall_at_1", "R@1 (pt)", 100, ".2f"),
    ("opis", "OPIS (×1e-3)", 1e3, ".2f"),
    ("eps_opis", "ε-OPIS", 1, ".3f"),
    ("tau", "τ (FAR 1e-2)", 1, ".3f"),
    ("frr_at_tau", "FRR at τ", 1, ".3f"),
    ("tar_far_1e-2_dev", "TAR@FAR 1e-2 (DevTest)", 1, ".3f"),
    ("tar_far_1e-3_dev", "TAR@FAR 1e-3 (DevTest)", 1, ".3f"),
]


CUB_KEYS: list[Key] = [
    ("far_spread", "per-species FAR spread", 1, ".4f"),
    ("frr_spread", "per-species FRR spread", 1, ".4f"),
    ("far_std", "per-species FAR sd", 1, ".4f"),
    ("frr_std", "per-species FRR sd", 1, ".4f"),
    ("frr_at_tau", "FRR at τ", 1, ".4f"),
]


def cub_section(runs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """CUB's per-species spreads at τ, TCM λ=1 against the base loss, paired by seed: the study
    itself gives class-bootstrap intervals for R@1/MAP@R/OPIS/ε-OPIS only (cub_table.md); these
    are Student-t intervals over its 5 seeds, so they hold the test species fixed."""
    lines = [
        "## CUB (docs/results/cub_study.json): per-species spreads at τ, TCM λ=1 − base, "
        "paired by seed",
        "",
    ]
    out: dict[str, Any] = {}
    by_loss: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        by_loss.setdefault(r["loss"], {}).setdefault(r["arm"], []).append(r)
    for loss, arms in by_loss.items():
        d = paired_differences(arms["base"], arms["tcm_l1"], [k for k, *_ in CUB_KEYS])
        for key, v in d.items():
            base_mean = statistics.fmean(float(r[key]) for r in arms["base"])
            v["relative_ci95"] = (
                [v["ci95"][0] / base_mean, v["ci95"][1] / base_mean] if base_mean else None
            )
            v["seeds_lower"] = sum(x < 0 for x in v["per_seed"])
        out[f"{loss} + TCM λ=1 - {loss}"] = d
        lines += [f"### {loss} + TCM λ=1 − {loss}", "", *differences_table(d, CUB_KEYS), ""]
        lines += [
            "Relative to the base mean, 95% interval: "
            + "; ".join(
                f"{head} {d[key]['relative']:+.1%} "
                f"[{d[key]['relative_ci95'][0]:+.1%}, {d[key]['relative_ci95'][1]:+.1%}], "
                f"lower in {d[key]['seeds_lower']}/{len(d[key]['per_seed'])} seeds"
                for key, head, *_ in CUB_KEYS
            ),
            "",
        ]
    return lines, out


def _groups(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["loss"], []).append(r)
    return out


def _people(path: Path) -> list[int]:
    lines = path.read_text().split("\n")[1:]
    return [int(ln.split("\t")[1]) for ln in lines if "\t" in ln]


def lfw_counts(data_dir: Path) -> dict[str, int]:
    """Identities of LFW View 1 as the study uses them: single-image training identities are
    dropped (training/data.py), so ArcFace has one proxy per remaining training identity."""
    train = _people(data_dir / "lfw" / "peopleDevTrain.txt")
    test = _people(data_dir / "lfw" / "peopleDevTest.txt")
    return {
        "train_identities_listed": len(train),
        "train_identities_used": sum(n >= 2 for n in train),
        "train_images_used": sum(n for n in train if n >= 2),
        "test_identities": len(test),
        "test_images": sum(test),
        "test_identities_eligible": sum(n >= 2 for n in test),
        "test_eligible_with_2_images": sum(n == 2 for n in test),
        "test_eligible_with_4_or_more": sum(n >= 4 for n in test),
    }


def section(
    title: str, runs: list[dict[str, Any]], pairs: list[tuple[str, str]], keys: list[Key]
) -> tuple[list[str], dict[str, Any]]:
    groups = _groups(runs)
    lines, out = [f"## {title}", ""], {}
    for base, treated in pairs:
        d = paired_differences(groups[base], groups[treated], [k for k, *_ in keys])
        out[f"{treated} - {base}"] = d
        lines += [f"### {treated} − {base}", "", *differences_table(d, keys), ""]
    lines += [
        "Per run: τ at FAR 1e-2 and the share of genuine test pairs scoring below it (= FRR at τ):",
        "",
    ]
    lines += [
        f"- {Path(r['run']).name}: τ {r['tau']:.4f}, {r['frr_at_tau']:.1%} of genuine pairs below τ"
        for r in runs
    ]
    return [*lines, ""], out


def sweep_lines(title: str, sweep: list[dict[str, Any]]) -> list[str]:
    """Each sweep setting's validation OPIS and R@1 against the no-TCM sweep run (one seed)."""
    base = next(r for r in sweep if not r["config"]["tcm"])
    lines = [f"{title} margin sweep (validation split, one seed), against no TCM:", ""]
    for r in sweep:
        if r["config"]["tcm"]:
            lines.append(
                f"- {Path(r['run']).name}: OPIS {r['opis'] / base['opis'] - 1:+.1%}, "
                f"R@1 {(r['recall_at_1'] - base['recall_at_1']) * 100:+.2f} pt"
            )
    return [*lines, ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=Path, default=Path("docs/results"))
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = p.parse_args()
    read = lambda name: json.loads((args.docs / name).read_text())  # noqa: E731
    md = ["# Derived figures (python -m studies.derived; from the committed study JSON)", ""]
    out: dict[str, Any] = {}

    omni = read("study.json")
    lines, out["omniglot"] = section(
        "Omniglot (docs/results/study.json), paired by seed",
        omni["runs"],
        [("multi_similarity", "multi_similarity + TCM"), ("contrastive", "contrastive + TCM")],
        OMNIGLOT_KEYS,
    )
    md += lines + sweep_lines("Omniglot", omni["sweep"])
    toy = omni["toy"]
    md += [
        "Digits 2-D toy (one seed): "
        + "; ".join(
            f"{name}: τ {r['tau']:.4f}, FRR at τ {r['frr_at_tau']:.3f}" for name, r in toy.items()
        )
        + " (a global τ near 1 that rejects almost every genuine pair: the calibration range is "
        "degenerate on the circle).",
        "",
    ]

    faces = read("faces_study.json")
    lines, out["lfw"] = section(
        "LFW (docs/results/faces_study.json), paired by seed",
        faces["runs"],
        [("multi_similarity", "multi_similarity + TCM"), ("arcface", "arcface + TCM")],
        LFW_KEYS,
    )
    md += lines + sweep_lines("LFW", faces["sweep"])
    floor_path = args.docs / "lfw_noise_floor.json"
    if floor_path.is_file():
        floor = json.loads(floor_path.read_text())
        out["lfw_noise_floor"] = {}
        md += [
            "## LFW OPIS against its noise floor (docs/results/lfw_noise_floor.json)",
            "",
            f"Test split: {floor['identities']} identities, {floor['images']} images; "
            f"{floor['eligible_identities']} with ≥ 2 images, of which "
            f"{floor['eligible_with_2_images']} "
            f"({floor['eligible_with_2_images'] / floor['eligible_identities']:.0%}) have "
            f"exactly 2 and {floor['eligible_with_4_or_more']} have ≥ 4. Floor: "
            f"{floor['model']}.",
            "",
            "| arm | OPIS (×1e-3), seeds | floor OPIS (×1e-3) | OPIS / floor "
            "| OPIS − floor (×1e-3) "
            "| ε-OPIS, seeds "
            "| floor ε-OPIS |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, rows in _groups(faces["runs"]).items():
            f = floor["arms"][arm]
            opis, eps = [r["opis"] for r in rows], [r["eps_opis"] for r in rows]
            mean = sum(opis) / len(opis)
            ratio, excess = mean / f["opis"][0], mean - f["opis"][0]
            out["lfw_noise_floor"][arm] = {
                "opis": opis,
                "floor": f["opis"],
                "ratio": ratio,
                "excess": excess,
            }
            md.append(
                f"| {arm} | {', '.join(f'{v * 1e3:.1f}' for v in opis)} | "
                f"{f['opis'][0] * 1e3:.1f} ± {f['opis'][1] * 1e3:.1f} | {ratio:.2f} | "
                f"{excess * 1e3:.1f} | "
                f"{', '.join(f'{v:.3f}' for v in eps)} | "
                f"{f['eps_opis'][0]:.3f} ± {f['eps_opis'][1]:.3f} |"
            )
        md.append("")
    if (args.data_dir / "lfw" / "peopleDevTrain.txt").is_file():
        out["lfw_counts"] = lfw_counts(args.data_dir)
        md += [
            "## LFW View 1 identity counts (from the data's people lists)",
            "",
            *(f"- {k}: {v:,}" for k, v in out["lfw_counts"].items()),
            "",
        ]

    orl = read("orl_study.json")
    lines, out["orl"] = section(
        "ORL (docs/results/orl_study.json), paired by seed (same seed = same split)",
        orl["runs"],
        [("multi_similarity", "multi_similarity + TCM")],
        OMNIGLOT_KEYS,
    )
    md += lines + sweep_lines("ORL", orl["sweep"])
    people = orl.get("people")
    if people:
        md += [
            f"ORL validation people (every seed): {', '.join(people['validation'])}; "
            "test people per seed: "
            + "; ".join(f"seed {k}: {', '.join(v)}" for k, v in people["test"].items()),
            "",
        ]

    cub_path = args.docs / "cub_study.json"
    if cub_path.is_file():
        lines, out["cub"] = cub_section(json.loads(cub_path.read_text())["runs"])
        md += lines

    (args.docs / "derived.md").write_text("\n".join(md))
    (args.docs / "derived.json").write_text(json.dumps(out, indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
