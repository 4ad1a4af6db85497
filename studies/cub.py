"""The CUB study (`make study-cub`): TCM on a frozen ImageNet backbone + a trained head, CUB-200.

Not the paper's regime: the paper fine-tunes its ImageNet backbone on the training classes;
here only the head on top of the frozen backbone's cached features trains (the CPU regime).

Setting: 100 CUB-200 species, the open-world split of ``classes_cub_map.csv`` (58 species with
CUB ids <= 100 train, the 42 with ids > 100 test). EfficientNet-Lite0 with its ImageNet weights
stays frozen; its 1280-d features are extracted once and cached (``training.features``); a
linear 128-d embedding head is trained on them. Four pytorch-metric-learning base losses, each
without TCM and with TCM at lambda 0.5 and 1, five seeds.

Rule, fixed before any number was seen (the same as the Omniglot/ORL studies,
``studies.common.choose_margins``): for each base loss, train it without TCM and with TCM
(lambda 1) on every (m+, m-) of the grid, on seed 0, with VAL_CLASSES species carved from the
58 training species (the same species for every seed: CUB's class split is fixed, so they are
disjoint from every seed's test species); pick the lowest validation OPIS among TCM runs whose
validation R@1 is within R1_SLACK of the run without TCM. Then train on all 58 species.

Contrastive: pytorch-metric-learning's default (Euclidean distance, pos margin 0, neg margin 1).
On cosine similarity with margins (pos 1.0 / neg 0.3) it would be TCM(1.0, 0.3) itself; with
pos margin 0 every positive pair is pulled, whatever its score, so it is not a TCM.

Reported per base loss and arm (mean ± std over seeds): R@1, MAP@R, OPIS, eps-OPIS, tau at FAR
1e-2 with its FRR, the per-class FAR/FRR spread at tau; per base loss the PAIRED per-seed
differences (TCM - base) with a 95% bootstrap interval over test classes (the same resampled
classes for every seed and both arms); and OPIS's noise floor on this split: embeddings from a
model whose classes all behave alike (one generative model, the test split's class sizes),
matched to the base model's mean genuine and impostor scores. Writes ``<docs>/cub_table.md``,
``<docs>/cub_study.json`` (every run's numbers, seed and config) and the plots.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studies.common import choose_margins, console, machine, mean_std_table, sweep_table
from tcm import consistency_from_scores
from tcm.consistency import range_average
from training.compare import compare
from training.config import TrainConfig, load_config
from training.data import Splits, load_splits
from training.evaluate import embed, evaluate_embeddings, write_report
from training.sweep import sweep
from training.trainer import fit, load_checkpoint, load_trained_model

COMMON = [
    "dataset=cub",
    "arch=efficientnet_lite0",
    "freeze_backbone=true",
    "embedding_dim=128",
    "batch_size=64",
    "m_per_class=4",
    "lr=1e-3",
    "target_far=1e-2",
]
LOSSES: dict[str, list[str]] = {
    "multi-similarity": ["loss=multi_similarity"],
    "ProxyAnchor": ["loss=proxy_anchor"],
    "SupCon": ["loss=supcon"],
    "contrastive": [
        "loss=contrastive",
        "contrastive_distance=euclidean",
        "contrastive_pos_margin=0",
        "contrastive_neg_margin=1",
    ],
}
ARMS = {
    "base": ["tcm=false"],
    "tcm_l0.5": ["tcm=true", "lambda_plus=0.5", "lambda_minus=0.5"],
    "tcm_l1": ["tcm=true", "lambda_plus=1", "lambda_minus=1"],
}
ARM_TITLE = {"base": "", "tcm_l0.5": " + TCM λ=0.5", "tcm_l1": " + TCM λ=1"}
KEYS = [
    ("recall_at_1", "R@1", 1, ".4f"),
    ("map_at_r", "MAP@R", 1, ".4f"),
    ("opis", "OPIS (×1e-3)", 1e3, ".2f"),
    ("eps_opis", "ε-OPIS", 1, ".4f"),
    ("tau", "τ (FAR 1e-2)", 1, ".3f"),
    ("frr_at_tau", "FRR at τ", 1, ".3f"),
    ("far_spread", "per-class FAR spread", 1, ".3f"),
    ("frr_spread", "per-class FRR spread", 1, ".3f"),
]


# --- per-class quantities and the class bootstrap ---------------------------------------------


def per_query_retrieval(emb: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-query hit@1 and AP@R (each query against all others); their means are tcm's R@1 and
    MAP@R (checked by the caller), and per-class means feed the class bootstrap."""
    s = emb @ emb.T
    s.fill_diagonal_(-torch.inf)
    same = y[:, None] == y[None, :]
    r = same.sum(1) - 1
    order = s.argsort(dim=1, descending=True)
    rel = torch.gather(same, 1, order)[:, :-1].float()  # the query itself sorts last
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float32)
    within = ranks[None, :] <= r[:, None]
    ap = ((rel.cumsum(1) / ranks) * rel * within).sum(1) / r.clamp(min=1)
    return rel[:, 0].numpy(), ap.numpy()


def opis_from_curves(u: np.ndarray, eps: float) -> tuple[float, float]:
    """OPIS and eps-OPIS from per-class utility curves (C, T), as ``tcm.consistency`` defines
    them with uniform class weights; the caller checks equality on the full class set."""
    ubar = u.mean(axis=0)
    opis = float(range_average((u - ubar) ** 2).mean())
    n = max(1, math.ceil(eps * len(u)))
    order = np.argsort(range_average(u), kind="stable")
    gap = u[order[-n:]].mean(axis=0) - u[order[:n]].mean(axis=0)
    return opis, float(range_average(gap**2))


def train_and_detail(run: Path, splits: Splits, config: TrainConfig) -> dict[str, Any]:
    """Trains the run (unless done), evaluates it ONCE on the test species (report.json, as
    ``tcm-train evaluate`` writes it) and keeps the per-class arrays for the bootstrap in
    ``details.npz``; a rerun reads them back."""
    path = run / "details.npz"
    if not (run / "report.json").is_file() or not path.is_file():
        if not (run / "checkpoint.pt").is_file() or not (run / "report.json").is_file():
            fit(
                config, run, splits=splits, progress=False, resume=(run / "checkpoint.pt").is_file()
            )
        model, _ = load_trained_model(run)
        emb, y = embed(model, splits.test.x), splits.test.y
        result = evaluate_embeddings(emb, y, config)
        write_report(
            result,
            run,
            extra={
                "split": "test",
                "config": config.to_dict(),
                "data": splits.description,
                "history": load_checkpoint(run)["history"],
            },
        )
        d = details_of(result, emb, y, config)
        np.savez(path, **{k: np.asarray(v) for k, v in d.items()})
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def details_of(
    result: dict[str, Any], emb: torch.Tensor, y: torch.Tensor, config: TrainConfig
) -> dict[str, Any]:
    """Per-class arrays of one evaluation (``training.evaluate.evaluate_embeddings``)."""
    cons = result["_curves"]
    hit, ap = per_query_retrieval(emb, y)
    assert abs(hit.mean() - result["recall_at_1"]) < 1e-6
    assert abs(ap.mean() - result["map_at_r"]) < 1e-4
    opis, eps_opis = opis_from_curves(cons.utility, config.eps)
    assert abs(opis - cons.opis) < 1e-9 and abs(eps_opis - cons.eps_opis) < 1e-9
    classes = np.asarray(cons.classes)
    yn = y.numpy()
    assert cons.at_tau is not None
    return {
        "u": cons.utility,
        "classes": classes,
        "hit": np.array([hit[yn == c].sum() for c in classes]),
        "ap": np.array([ap[yn == c].sum() for c in classes]),
        "n": np.array([(yn == c).sum() for c in classes]),
        "far": cons.at_tau.far,
        "frr": cons.at_tau.frr,
        "emb": emb.numpy(),
        "y": yn,
    }


def _metrics(d: dict[str, Any], idx: np.ndarray, eps: float) -> dict[str, float]:
    opis, eps_opis = opis_from_curves(d["u"][idx], eps)
    n = d["n"][idx].sum()
    return {
        "recall_at_1": d["hit"][idx].sum() / n,
        "map_at_r": d["ap"][idx].sum() / n,
        "opis": opis,
        "eps_opis": eps_opis,
    }


def paired(
    base: list[dict], tcm: list[dict], eps: float, boot: int, seed: int = 0
) -> dict[str, Any]:
    """TCM - base over seeds: per-seed differences, and a 95% interval from resampling test
    classes (the same draw for every seed and both arms). R@1/MAP@R in points, OPIS and
    eps-OPIS relative (mean over seeds of TCM / mean over seeds of base - 1)."""
    c = len(base[0]["classes"])
    assert all((d["classes"] == base[0]["classes"]).all() for d in base + tcm)

    def diff(idx: np.ndarray) -> dict[str, float]:
        mb = [_metrics(d, idx, eps) for d in base]
        mt = [_metrics(d, idx, eps) for d in tcm]
        out = {}
        for k in ("recall_at_1", "map_at_r"):
            out[k] = 100 * float(np.mean([t[k] - b[k] for b, t in zip(mb, mt, strict=True)]))
        for k in ("opis", "eps_opis"):
            out[k] = 100 * (np.mean([t[k] for t in mt]) / np.mean([b[k] for b in mb]) - 1)
        return out

    full = np.arange(c)
    point = diff(full)
    rng = np.random.default_rng(seed)
    draws = [diff(rng.integers(0, c, c)) for _ in range(boot)]
    per_seed = {}
    for k in ("recall_at_1", "map_at_r", "opis", "eps_opis"):
        vals = []
        for b, t in zip(base, tcm, strict=True):
            mb, mt = _metrics(b, full, eps)[k], _metrics(t, full, eps)[k]
            vals.append(
                100 * (mt - mb) if k in ("recall_at_1", "map_at_r") else 100 * (mt / mb - 1)
            )
        per_seed[k] = vals
    return {
        k: {
            "estimate": point[k],
            "ci95": [
                float(np.percentile([d[k] for d in draws], 2.5)),
                float(np.percentile([d[k] for d in draws], 97.5)),
            ],
            "per_seed": per_seed[k],
            "unit": "points" if k in ("recall_at_1", "map_at_r") else "% relative",
        }
        for k in point
    }


# --- OPIS's noise floor ------------------------------------------------------------------------


def noise_floor(reference: dict[str, Any], config: TrainConfig, draws: int) -> dict[str, Any]:
    """OPIS / eps-OPIS of classes that all behave alike: the reference model's genuine scores are
    shuffled across test classes (each class keeps its number of genuine pairs), and so are its
    impostor scores (each pair counts for both its classes, as in OPIS). Every class then draws
    from the same two score distributions, the real ones, with this split's class sizes, so
    whatever OPIS remains is sampling noise: differences below it are not consistency."""
    emb = torch.as_tensor(reference["emb"])
    y = torch.as_tensor(reference["y"])
    s = emb @ emb.T
    iu = torch.triu_indices(len(y), len(y), 1)
    scores = s[iu[0], iu[1]]
    same = y[iu[0]] == y[iu[1]]
    gen_pool, imp_pool = scores[same], scores[~same]
    classes = torch.unique(y)
    sizes = torch.stack([(y == c).sum() for c in classes])
    n_gen = (sizes * (sizes - 1) // 2).tolist()
    n_imp = (sizes * (len(y) - sizes)).tolist()
    vals = []
    for k in range(draws):
        g = torch.Generator().manual_seed(1000 + k)
        gen = gen_pool[torch.randperm(len(gen_pool), generator=g)].split(n_gen)
        imp2 = torch.cat([imp_pool, imp_pool])
        imp = imp2[torch.randperm(len(imp2), generator=g)].split(n_imp)
        cons = consistency_from_scores(
            {int(c): gen[i] for i, c in enumerate(classes)},
            {int(c): imp[i] for i, c in enumerate(classes)},
            far_range=(config.far_lo, config.far_hi),
            num_thresholds=config.num_thresholds,
            beta=config.beta,
            eps=config.eps,
        )
        vals.append((cons.opis, cons.eps_opis))
    v = np.asarray(vals)
    return {
        "opis_mean": float(v[:, 0].mean()),
        "opis_max": float(v[:, 0].max()),
        "eps_opis_mean": float(v[:, 1].mean()),
        "eps_opis_max": float(v[:, 1].max()),
        "draws": draws,
        "reference_opis": float(opis_from_curves(reference["u"], config.eps)[0]),
        "method": "genuine and impostor scores of the reference model shuffled across classes",
    }


# --- plots -------------------------------------------------------------------------------------


def plot_utility(details: dict[tuple[str, str], dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(LOSSES)
    fig, axes = plt.subplots(len(losses), 2, figsize=(10, 3.2 * len(losses)), sharey=True)
    for row, loss in enumerate(losses):
        for col, arm in enumerate(("base", "tcm_l1")):
            d, ax = details[(loss, arm)], axes[row][col]
            x = np.linspace(0, 1, d["u"].shape[1])
            for u in d["u"]:
                ax.plot(x, u, color="tab:blue", alpha=0.2, linewidth=0.8)
            ax.plot(x, d["u"].mean(0), color="black", linewidth=2)
            opis, _ = opis_from_curves(d["u"], 0.05)
            ax.set(
                title=f"{loss}{ARM_TITLE[arm]} (seed 0): OPIS {opis * 1e3:.2f}e-3",
                ylim=(0, 1.02),
                xlabel="position in the calibration range (FAR 1e-1 → 1e-3)",
                ylabel="utility per test class",
            )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --- the study ---------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", type=Path, default=Path("runs/study_cub"))
    p.add_argument("--docs", type=Path, default=Path("docs/results"))
    p.add_argument("--feature-cache", default="runs/features")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--val-classes", type=int, default=14)
    p.add_argument("--m-plus", default="0.8,0.9")
    p.add_argument("--m-minus", default="0.3,0.5")
    p.add_argument("--r1-slack", type=float, default=0.01)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--floor-draws", type=int, default=5)
    p.add_argument(
        "--losses",
        nargs="+",
        default=list(LOSSES),
        choices=list(LOSSES),
        help="train only these (e.g. two processes on a shared machine); the table "
        "is written when every base loss has its runs",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--sweep-only", action="store_true", help="stop after the margin sweeps")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    common = [
        *COMMON,
        f"data_dir={args.data_dir}",
        f"feature_cache={args.feature_cache}",
        f"epochs={args.epochs}",
        f"steps_per_epoch={args.steps}",
    ]
    args.docs.mkdir(parents=True, exist_ok=True)

    # 1. margins per base loss on the fixed validation species (seed 0)
    chosen: dict[str, dict[str, Any]] = {}
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for loss, settings in LOSSES.items():
        if loss not in args.losses:
            continue
        # the sweep is judged on the validation species and never looks at test species; it
        # loads two of them only because every split has a test part (their features are cheap,
        # so the sweep need not wait for the 2,474 test images' extraction)
        base = load_config(
            None,
            [*common, *settings, f"val_classes={args.val_classes}", "seed=0", "max_test_classes=2"],
        )
        out = args.out / "sweep" / loss
        sweep(base, {"tcm": ["false"]}, out, console=console, progress=False)
        sweep(
            base,
            {"m_plus": args.m_plus.split(","), "m_minus": args.m_minus.split(",")},
            out,
            console=console,
            progress=False,
        )
        runs = sorted(d for d in out.iterdir() if (d / "report_val.json").is_file())
        rows = compare(runs, None, None, split="val")
        chosen[loss] = choose_margins(rows, args.r1_slack)
        sweeps[loss] = rows
        console.print(
            f"{loss}: m_plus={chosen[loss]['m_plus']} m_minus="
            f"{chosen[loss]['m_minus']} ({chosen[loss]['rule']})"
        )

    if args.sweep_only:
        return

    # 2. main runs on all 58 training species, test on the 42 held-out ones
    config0 = load_config(None, [*common, *LOSSES["multi-similarity"]])
    splits = load_splits(config0)
    groups: dict[str, list[dict[str, Any]]] = {}
    details: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for loss, settings in LOSSES.items():
        if loss not in args.losses:
            continue
        margins = [f"m_plus={chosen[loss]['m_plus']}", f"m_minus={chosen[loss]['m_minus']}"]
        # seed by seed (every arm of a seed before the next seed): an interrupted study holds
        # complete seeds, and resumes where it stopped
        for seed, (arm, arm_settings) in itertools.product(args.seeds, ARMS.items()):
            run = args.out / "main" / loss / f"{arm}_seed={seed}"
            cfg = load_config(None, [*common, *settings, *arm_settings, *margins, f"seed={seed}"])
            console.print(f"[bold]{loss} {arm} seed {seed}[/bold]")
            d = train_and_detail(run, splits, cfg)
            report = json.loads((run / "report.json").read_text())
            row = {
                "run": str(run),
                "loss": loss,
                "arm": arm,
                "seed": seed,
                "recall_at_1": report["recall_at_1"],
                "map_at_r": report["map_at_r"],
                "opis": report["opis"],
                "eps_opis": report["eps_opis"],
                "tau": report["calibration"]["tau"],
                "frr_at_tau": report["calibration"]["frr"],
                "far_at_tau": report["calibration"]["far"],
                **{
                    k: report["per_class_at_tau"][k]
                    for k in ("far_spread", "frr_spread", "far_std", "frr_std")
                },
                "history": report.get("history"),
                "config": report["config"],
            }
            groups.setdefault(f"{loss}{ARM_TITLE[arm]}", []).append(row)
            details.setdefault(loss, {}).setdefault(arm, []).append(d)

    if set(args.losses) != set(LOSSES):
        console.print(f"trained {args.losses}; rerun with every base loss for the table")
        return

    # 3. paired differences with class-bootstrap intervals; the noise floor
    paired_rows = {}
    for loss in LOSSES:
        for arm in ("tcm_l0.5", "tcm_l1"):
            paired_rows[f"{loss}{ARM_TITLE[arm]}"] = paired(
                details[loss]["base"], details[loss][arm], config0.eps, args.bootstrap
            )
    floor = noise_floor(details["multi-similarity"]["base"][0], config0, args.floor_draws)

    # 4. table, JSON, plots
    lines, summary = mean_std_table(groups, KEYS)
    plines = [
        "| base loss + TCM | ΔR@1 (pt) [95% CI] | ΔMAP@R (pt) [95% CI] | ΔOPIS % [95% CI] "
        "| Δε-OPIS % [95% CI] | ΔOPIS % per seed |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in paired_rows.items():
        cells = [
            f"{d[k]['estimate']:+.2f} [{d[k]['ci95'][0]:+.2f}, {d[k]['ci95'][1]:+.2f}]"
            for k in ("recall_at_1", "map_at_r", "opis", "eps_opis")
        ]
        per_seed = ", ".join(f"{v:+.0f}" for v in d["opis"]["per_seed"])
        plines.append(f"| {name} | " + " | ".join(cells) + f" | {per_seed} |")
    chosen_lines = [
        f"- {loss}: m+ = {c['m_plus']}, m− = {c['m_minus']} ({c['rule']})"
        for loss, c in chosen.items()
    ]
    sweep_lines = []
    for loss, rows in sweeps.items():
        sweep_lines += [f"**{loss}**", "", *sweep_table(rows), ""]
    machine_desc = machine() + " (2-core VM, shared with parallel work)"
    wall = (time.perf_counter() - started) / 60
    seeds = ", ".join(map(str, args.seeds))
    table = [
        f"## CUB main runs (mean ± std over seeds {seeds}; 42 held-out species, "
        f"{len(splits.test.y)} images)",
        "",
        *lines,
        "",
        "## Paired differences, TCM − base (mean over seeds; 95% interval from "
        f"{args.bootstrap} resamplings of the test species)",
        "",
        *plines,
        "",
        f"OPIS noise floor (multi-similarity seed 0's genuine and impostor scores shuffled "
        f"across the test species, so all behave alike with this split's class sizes; "
        f"{floor['draws']} draws): OPIS {floor['opis_mean'] * 1e3:.3f}e-3 (max "
        f"{floor['opis_max'] * 1e3:.3f}e-3) against {floor['reference_opis'] * 1e3:.2f}e-3 "
        f"for the model itself; ε-OPIS {floor['eps_opis_mean']:.4f}.",
        "",
        "## Margins chosen on the validation species (seed 0)",
        "",
        *chosen_lines,
        "",
        *sweep_lines,
        f"Machine: {machine_desc}; wall time of this invocation {wall:.0f} min "
        "(feature extraction cached in --feature-cache).",
        "",
    ]
    (args.docs / "cub_table.md").write_text("\n".join(table))
    plot_utility(
        {(loss, arm): details[loss][arm][0] for loss in LOSSES for arm in ("base", "tcm_l1")},
        args.docs / "cub_utility.png",
    )
    compare(
        [r["run"] for rows in groups.values() for r in rows], args.docs / "cub_opis_vs_r1.png", None
    )
    (args.docs / "cub_study.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "paired": paired_rows,
                "noise_floor": floor,
                "runs": [r for rows in groups.values() for r in rows],
                "sweep": {k: v for k, v in sweeps.items()},
                "chosen": {
                    k: {x: c[x] for x in ("m_plus", "m_minus", "rule")} for k, c in chosen.items()
                },
                "data": splits.description,
                "machine": machine_desc,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=2,
            default=str,
        )
    )
    console.print((args.docs / "cub_table.md").read_text())


if __name__ == "__main__":
    main()
