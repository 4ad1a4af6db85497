"""The face study (`make study-faces`): TCM for face verification on LFW, beside the Omniglot one.

1. Margins on a validation split carved from the *training* identities (peopleDevTrain): the
   same rule as the Omniglot study (studies/omniglot.py), never looking at test identities.
2. Main runs: LFW View 1 (train peopleDevTrain, test the disjoint peopleDevTest identities),
   the small CNN on 48x48 RGB crops, multi-similarity and ArcFace, each with and without TCM,
   over seeds. Reported: R@1 and OPIS/eps-OPIS over identities, the per-identity FAR/FRR spread at
   the calibrated global tau, TAR@FAR on pairsDevTest (identity-disjoint), and the 10-fold
   accuracy on pairs.txt (whose identities overlap training: optimistic, stated as such).
3. Writes ``<docs>/faces_study.json``, ``<docs>/faces_table.md`` and the seed-0 plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from studies.common import console, machine, margin_sweep, mean_std_table, sweep_table
from training.compare import compare, summarise
from training.config import load_config
from training.data import load_splits
from training.pipeline import read_report, train_evaluate_export

LOSSES = ("multi_similarity", "arcface")
COMMON = ["dataset=lfw", "arch=small_cnn", "image_size=48"]


def face_row(run: Path) -> dict[str, Any]:
    row = summarise(run)
    v = read_report(run)["verification"]
    row["tar_far_1e-2_dev"] = v["pairsDevTest"]["tar_at_far"]["0.01"]["tar"]
    row["tar_far_1e-3_dev"] = v["pairsDevTest"]["tar_at_far"]["0.001"]["tar"]
    row["acc_dev_at_tau"] = v["pairsDevTest"]["at_global_tau"]["accuracy"]
    row["acc_10fold_view2"] = v["pairs"]["kfold_accuracy"]["mean"]
    return row


KEYS = [
    ("recall_at_1", "R@1", 1, ".4f"),
    ("opis", "OPIS (×1e-3)", 1e3, ".2f"),
    ("eps_opis", "ε-OPIS", 1, ".3f"),
    ("far_spread", "per-identity FAR spread", 1, ".3f"),
    ("frr_spread", "per-identity FRR spread", 1, ".3f"),
    ("tar_far_1e-2_dev", "TAR@FAR=1e-2 (DevTest)", 1, ".3f"),
    ("tar_far_1e-3_dev", "TAR@FAR=1e-3 (DevTest)", 1, ".3f"),
    ("acc_dev_at_tau", "acc. at τ (DevTest)", 1, ".3f"),
    ("acc_10fold_view2", "10-fold acc. (View 2*)", 1, ".3f"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", type=Path, default=Path("runs/study_faces"))
    p.add_argument("--docs", type=Path, default=Path("docs/results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--sweep-epochs", type=int, default=2)
    p.add_argument("--val-classes", type=int, default=400)
    p.add_argument("--m-plus", default="0.5,0.6,0.8")
    p.add_argument("--m-minus", default="0.3")
    p.add_argument("--r1-slack", type=float, default=0.01)
    args = p.parse_args()
    started = time.perf_counter()
    common = [*COMMON, f"data_dir={args.data_dir}", f"steps_per_epoch={args.steps}"]
    args.docs.mkdir(parents=True, exist_ok=True)

    sweep_rows, chosen = margin_sweep(
        [*common, f"epochs={args.sweep_epochs}", f"val_classes={args.val_classes}"],
        args.out / "sweep",
        args.docs / "faces_sweep_val.png",
        m_plus=args.m_plus,
        m_minus=args.m_minus,
        slack=args.r1_slack,
    )

    margins = [f"m_plus={chosen['m_plus']}", f"m_minus={chosen['m_minus']}"]
    splits = None  # LFW View 1 is a fixed official split: decode it once for every run
    groups: dict[str, list[dict[str, Any]]] = {}
    for loss in LOSSES:
        for tcm in (False, True):
            for seed in args.seeds:
                run = args.out / "main" / f"{loss}_tcm={str(tcm).lower()}_seed={seed}"
                cfg = load_config(
                    None,
                    [
                        *common,
                        f"epochs={args.epochs}",
                        f"loss={loss}",
                        f"tcm={str(tcm).lower()}",
                        f"seed={seed}",
                        *margins,
                    ],
                )
                console.print(f"[bold]{run.name}[/bold]")
                if not (run / "report.json").is_file():
                    splits = splits or load_splits(cfg)
                    train_evaluate_export(cfg, run, None, splits=splits, progress=False)
                groups.setdefault(loss + (" + TCM" if tcm else ""), []).append(face_row(run))
    compare(
        [r["run"] for rows in groups.values() for r in rows],
        args.docs / "faces_opis_vs_r1.png",
        console,
    )
    for loss in LOSSES:
        for tcm in ("false", "true"):
            run = args.out / "main" / f"{loss}_tcm={tcm}_seed={args.seeds[0]}"
            shutil.copy(
                run / "utility_curves.png", args.docs / f"faces_utility_{loss}_tcm={tcm}.png"
            )
            shutil.copy(run / "det.png", args.docs / f"faces_det_{loss}_tcm={tcm}.png")

    lines, summary = mean_std_table(groups, KEYS)
    sweep_lines = sweep_table(sweep_rows)
    machine_desc = machine()
    (args.docs / "faces_table.md").write_text(
        "\n".join(
            [
                f"## LFW main runs (mean ± std over seeds {', '.join(map(str, args.seeds))})",
                "",
                *lines,
                "",
                "*View 2 identities overlap the training identities (peopleDevTrain).",
                "",
                "## LFW margin sweep (validation identities)",
                "",
                *sweep_lines,
                "",
                f"Chosen: m_plus={chosen['m_plus']}, m_minus={chosen['m_minus']} "
                f"({chosen['rule']}).",
                "",
                f"Machine: {machine_desc}; wall time "
                f"{(time.perf_counter() - started) / 60:.0f} min.",
                "",
            ]
        )
    )
    (args.docs / "faces_study.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "runs": [r for rows in groups.values() for r in rows],
                "sweep": sweep_rows,
                "chosen": {k: chosen[k] for k in ("m_plus", "m_minus", "rule")},
                "machine": machine_desc,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=2,
            default=str,
        )
    )
    console.print((args.docs / "faces_table.md").read_text())


if __name__ == "__main__":
    main()
