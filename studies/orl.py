"""The ORL study (`make study-orl`): TCM on AT&T/ORL faces (40 people x 10 images), beside LFW.

1. Margins on validation identities (the rule of the other studies, studies/common.py). ORL has
   no official split, so the ``--val-classes`` validation people are drawn once (``val_seed``
   0) and left out of every seed's test draw: the margins are never judged on people they were
   chosen on.
2. Main runs: a class-disjoint split (half of the 40 people held out, drawn per seed from the 34
   non-validation people, so the spread covers both the initialisation and which people are
   held out; the validation people join training, ``val_in_train``), the small CNN on
   48x48 grey crops, multi-similarity with and without TCM over seeds. Reported: R@1, OPIS and
   eps-OPIS over the held-out identities, the per-identity FAR/FRR spread and the TAR (1 - FRR)
   at the calibrated global tau (FAR 1e-2 on the held-out pairs).
3. Writes ``<docs>/orl_table.md`` and ``<docs>/orl_study.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from studies.common import (
    console,
    differences_table,
    machine,
    margin_sweep,
    mean_std_table,
    paired_differences,
    sweep_table,
    training_minutes,
)
from training.compare import summarise
from training.config import load_config
from training.data import fixed_validation_classes, load_raw
from training.pipeline import train_evaluate_export

COMMON = [
    "dataset=att_faces",
    "arch=small_cnn",
    "image_size=48",
    "test_fraction=0.5",
    "batch_size=48",
    "m_per_class=4",
    "loss=multi_similarity",
]
KEYS = [
    ("recall_at_1", "R@1", 1, ".3f"),
    ("opis", "OPIS (×1e-3)", 1e3, ".1f"),
    ("eps_opis", "ε-OPIS", 1, ".3f"),
    ("far_spread", "per-identity FAR spread", 1, ".3f"),
    ("frr_spread", "per-identity FRR spread", 1, ".3f"),
    ("tar_at_tau", "TAR at τ (FAR 1e-2)", 1, ".3f"),
]


def held_out_people(common: list[str], val_classes: int, seeds: list[int]) -> dict[str, Any]:
    """The fixed validation people and each seed's test people, by name; stops if a seed would
    test on a validation person (the margins would then be judged on the people they were
    chosen on)."""
    out: dict[str, Any] = {"test": {}}
    for seed in seeds:
        cfg = load_config(None, [*common, f"seed={seed}", f"val_classes={val_classes}"])
        train, test = load_raw(cfg)
        val = fixed_validation_classes(
            np.concatenate([train.labels, test.labels]), val_classes, cfg.val_seed
        )
        if val & set(test.labels.tolist()):
            raise RuntimeError(f"seed {seed} tests on validation people")
        out["validation"] = [train.class_names[c] for c in sorted(val)]
        out["test"][str(seed)] = [test.class_names[c] for c in sorted(set(test.labels.tolist()))]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", type=Path, default=Path("runs/study_orl"))
    p.add_argument("--docs", type=Path, default=Path("docs/results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--val-classes", type=int, default=6)
    p.add_argument("--m-plus", default="0.5,0.6,0.8")
    p.add_argument("--m-minus", default="0.3")
    p.add_argument("--r1-slack", type=float, default=0.01)
    args = p.parse_args()
    started = time.perf_counter()
    common = [
        *COMMON,
        f"data_dir={args.data_dir}",
        f"steps_per_epoch={args.steps}",
        f"epochs={args.epochs}",
    ]
    args.docs.mkdir(parents=True, exist_ok=True)
    sweep_rows, chosen = margin_sweep(
        [*common, f"val_classes={args.val_classes}"],
        args.out / "sweep",
        args.docs / "orl_sweep_val.png",
        m_plus=args.m_plus,
        m_minus=args.m_minus,
        slack=args.r1_slack,
    )
    margins = [f"m_plus={chosen['m_plus']}", f"m_minus={chosen['m_minus']}"]
    groups: dict[str, list[dict[str, Any]]] = {}
    people = held_out_people(common, args.val_classes, args.seeds)
    for tcm in (False, True):
        for seed in args.seeds:
            run = args.out / "main" / f"tcm={str(tcm).lower()}_seed={seed}"
            console.print(f"[bold]{run.name}[/bold]")
            if not (run / "report.json").is_file():
                # the margins only act with TCM: runs without it keep the config's defaults
                cfg = load_config(
                    None,
                    [
                        *common,
                        f"tcm={str(tcm).lower()}",
                        f"seed={seed}",
                        *(margins if tcm else []),
                        f"val_classes={args.val_classes}",
                        "val_in_train=true",
                    ],
                )
                train_evaluate_export(cfg, run, None, progress=False)
            row = summarise(run)
            row["tar_at_tau"] = 1.0 - row["frr_at_tau"]
            groups.setdefault("multi-similarity" + (" + TCM" if tcm else ""), []).append(row)

    lines, summary = mean_std_table(groups, KEYS)
    trained = sorted(p.parent for p in args.out.glob("*/*/history.json"))
    diffs = paired_differences(
        groups["multi-similarity"], groups["multi-similarity + TCM"], [k for k, *_ in KEYS]
    )
    sweep_lines = sweep_table(sweep_rows)
    machine_desc = machine()
    (args.docs / "orl_table.md").write_text(
        "\n".join(
            [
                f"## ORL main runs (mean ± std over seeds {', '.join(map(str, args.seeds))})",
                "",
                *lines,
                "",
                "## ORL paired differences (with TCM − without, same seed = same split)",
                "",
                *differences_table(diffs, KEYS),
                "",
                "Validation people (fixed for every seed): "
                f"{', '.join(people['validation'])}; no seed's test people include one of them.",
                "",
                "## ORL margin sweep (validation identities)",
                "",
                *sweep_lines,
                "",
                f"Chosen: m_plus={chosen['m_plus']}, m_minus={chosen['m_minus']} "
                f"({chosen['rule']}).",
                "",
                f"Machine: {machine_desc}; training time summed over the {len(trained)} runs "
                f"(epoch histories) {training_minutes(trained):.0f} min; this invocation's wall "
                f"time {(time.perf_counter() - started) / 60:.0f} min "
                "(runs already in --out are reused).",
                "",
            ]
        )
    )
    (args.docs / "orl_study.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "paired_differences": diffs,
                "people": people,
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
    console.print((args.docs / "orl_table.md").read_text())


if __name__ == "__main__":
    main()
