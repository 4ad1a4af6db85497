"""The evidence study (`make study`): does TCM make one threshold mean the same across classes
without costing accuracy, on real open-world data?

1. Margin sweep on a validation split carved from Omniglot's *background* (training) alphabets:
   multi-similarity without TCM, and with TCM on an (m_plus, m_minus) grid. The chosen margins are
   the lowest validation OPIS among those whose validation R@1 is within ``--r1-slack`` of the
   no-TCM run (accuracy first, then consistency). Test classes are never looked at here.
2. Main runs: Omniglot background -> evaluation alphabets (class-disjoint), the default small CNN,
   multi-similarity and contrastive, each with and without TCM (chosen margins), over seeds.
3. The paper's toy: sklearn digits 0-4 -> 5-9 with a 2-D embedding, with and without TCM.
4. Aggregates mean ± std into ``<docs>/study.json`` and ``<docs>/table.md`` and copies the plots.

Every run folder is reused when its report exists, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from studies.common import console, machine, margin_sweep
from training.compare import compare, summarise
from training.config import load_config
from training.pipeline import train_evaluate_export

DEFAULT = ["dataset=omniglot", "arch=small_cnn"]
LOSSES = ("multi_similarity", "contrastive")
METRICS = (
    "recall_at_1",
    "map_at_r",
    "opis",
    "eps_opis",
    "tau",
    "frr_at_tau",
    "far_spread",
    "frr_spread",
)


def run_once(settings: list[str], run: Path, *, plots: bool = True) -> dict[str, Any]:
    if not (run / "report.json").is_file():
        train_evaluate_export(load_config(None, settings), run, None, plots=plots, progress=False)
    return summarise(run)


def mean_std(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    out = {}
    for k in METRICS:
        vals = [float(r[k]) for r in rows]
        out[k] = [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]
    return out


def fmt(ms: list[float], spec: str) -> str:
    return f"{ms[0]:{spec}} ± {ms[1]:{spec}}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", type=Path, default=Path("runs/study"))
    p.add_argument("--docs", type=Path, default=Path("docs/results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sweep-epochs", type=int, default=3)
    p.add_argument("--val-classes", type=int, default=200)
    p.add_argument("--m-plus", default="0.7,0.8,0.9")
    p.add_argument("--m-minus", default="0.3,0.5")
    p.add_argument("--r1-slack", type=float, default=0.01)
    args = p.parse_args()
    started = time.perf_counter()
    common = [*DEFAULT, f"data_dir={args.data_dir}", f"steps_per_epoch={args.steps}"]
    args.docs.mkdir(parents=True, exist_ok=True)

    # 1. margins on the validation split of the training alphabets
    sweep_rows, chosen = margin_sweep(
        [*common, f"epochs={args.sweep_epochs}", f"val_classes={args.val_classes}"],
        args.out / "sweep",
        args.docs / "sweep_val.png",
        m_plus=args.m_plus,
        m_minus=args.m_minus,
        slack=args.r1_slack,
    )

    # 2. main runs on the held-out evaluation alphabets
    margins = [f"m_plus={chosen['m_plus']}", f"m_minus={chosen['m_minus']}"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for loss in LOSSES:
        for tcm in (False, True):
            name = loss + (" + TCM" if tcm else "")
            for seed in args.seeds:
                run = args.out / "main" / f"{loss}_tcm={str(tcm).lower()}_seed={seed}"
                settings = [
                    *common,
                    f"epochs={args.epochs}",
                    f"loss={loss}",
                    f"tcm={str(tcm).lower()}",
                    f"seed={seed}",
                    *margins,
                ]
                console.print(f"[bold]{run.name}[/bold]")
                groups.setdefault(name, []).append(run_once(settings, run))
    all_main = [r for rows in groups.values() for r in rows]
    compare([r["run"] for r in all_main], args.docs / "opis_vs_r1.png", console)

    # 3. the toy: 2-D embeddings of held-out digits
    toy = {}
    for tcm in (False, True):
        run = args.out / "digits2d" / f"tcm={str(tcm).lower()}"
        toy["with TCM" if tcm else "without TCM"] = run_once(
            [
                "dataset=digits",
                "image_size=16",
                "embedding_dim=2",
                "width=16",
                "epochs=20",
                "steps_per_epoch=50",
                "batch_size=40",
                "m_per_class=8",
                f"tcm={str(tcm).lower()}",
                "m_plus=0.9",
                "m_minus=0.5",
                f"data_dir={args.data_dir}",
            ],
            run,
        )
        shutil.copy(run / "embedding_2d.png", args.docs / f"digits2d_tcm={str(tcm).lower()}.png")
        shutil.copy(
            run / "utility_curves.png", args.docs / f"digits2d_utility_tcm={str(tcm).lower()}.png"
        )

    # 4. aggregate and copy the seed-0 plots
    for loss in LOSSES:
        for tcm in ("false", "true"):
            run = args.out / "main" / f"{loss}_tcm={tcm}_seed={args.seeds[0]}"
            shutil.copy(run / "utility_curves.png", args.docs / f"utility_{loss}_tcm={tcm}.png")
    summary = {name: mean_std(rows) for name, rows in groups.items()}
    lines = [
        "| loss | R@1 | MAP@R | OPIS (×1e-3) | ε-OPIS | τ | FRR@τ | per-class FAR spread "
        "| per-class FRR spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        opis = [v * 1e3 for v in s["opis"]]
        lines.append(
            f"| {name} | {fmt(s['recall_at_1'], '.4f')} | {fmt(s['map_at_r'], '.4f')} "
            f"| {fmt(opis, '.2f')} | {fmt(s['eps_opis'], '.4f')} "
            f"| {fmt(s['tau'], '.3f')} | {fmt(s['frr_at_tau'], '.4f')} "
            f"| {fmt(s['far_spread'], '.4f')} | {fmt(s['frr_spread'], '.4f')} |"
        )
    sweep_lines = [
        "| run | R@1 (val) | MAP@R (val) | OPIS (val, ×1e-3) | ε-OPIS (val) |",
        "|---|---|---|---|---|",
    ]
    for r in sweep_rows:
        sweep_lines.append(
            f"| {Path(r['run']).name} | {r['recall_at_1']:.4f} "
            f"| {r['map_at_r']:.4f} | {r['opis'] * 1e3:.2f} "
            f"| {r['eps_opis']:.4f} |"
        )
    toy_lines = ["| digits 2-D | R@1 | OPIS (×1e-3) | ε-OPIS |", "|---|---|---|---|"]
    for name, r in toy.items():
        toy_lines.append(
            f"| {name} | {r['recall_at_1']:.4f} | {r['opis'] * 1e3:.2f} | {r['eps_opis']:.4f} |"
        )
    machine_desc = machine()
    (args.docs / "table.md").write_text(
        "\n".join(
            [
                "## Main runs (mean ± std over seeds " + ", ".join(map(str, args.seeds)) + ")",
                "",
                *lines,
                "",
                "## Margin sweep (validation split)",
                "",
                *sweep_lines,
                "",
                f"Chosen: m_plus={chosen['m_plus']}, "
                f"m_minus={chosen['m_minus']} ({chosen['rule']}).",
                "",
                "## Digits toy",
                "",
                *toy_lines,
                "",
                f"Machine: {machine_desc}; study wall time "
                f"{(time.perf_counter() - started) / 60:.0f} min.",
                "",
            ]
        )
    )
    (args.docs / "study.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "runs": all_main,
                "sweep": sweep_rows,
                "chosen": {k: chosen[k] for k in ("m_plus", "m_minus", "rule")},
                "toy": toy,
                "machine": machine_desc,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=2,
            default=str,
        )
    )
    console.print((args.docs / "table.md").read_text())


if __name__ == "__main__":
    main()
