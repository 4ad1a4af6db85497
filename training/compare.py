"""Runs side by side (e.g. with vs without TCM): a table and an OPIS-vs-R@1 plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from training.pipeline import read_report

COLUMNS = [
    ("recall_at_1", "R@1", "{:.4f}"),
    ("map_at_r", "MAP@R", "{:.4f}"),
    ("opis", "OPIS", "{:.3e}"),
    ("eps_opis", "eps-OPIS", "{:.4f}"),
]


def summarise(run_dir: str | Path, split: str = "test") -> dict[str, Any]:
    r = read_report(run_dir, split)
    cfg = r.get("config", {})
    return {
        "run": str(run_dir),
        "config": cfg,
        "loss": cfg.get("loss", "?") + (" + TCM" if cfg.get("tcm") else ""),
        **{k: r[k] for k, _, _ in COLUMNS},
        "tau": r["calibration"]["tau"],
        "frr_at_tau": r["calibration"]["frr"],
        "far_spread": r["per_class_at_tau"]["far_spread"],
        "frr_spread": r["per_class_at_tau"]["frr_spread"],
    }


def compare(
    runs: list[str | Path],
    plot_path: str | Path | None = None,
    console: Console | None = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """Prints the table (and writes the plot); returns one summary row per run."""
    if not runs:
        raise ValueError("give at least one run folder to compare")
    rows = [summarise(r, split) for r in runs]
    # what tells the runs apart (margins, loss, seed...): every config key whose value varies
    keys = sorted({k for r in rows for k in r["config"]})
    varying = [
        k
        for k in keys
        if len({repr(r["config"].get(k)) for r in rows}) > 1 and k not in ("data_dir", "device")
    ]
    for r in rows:
        r["differs"] = " ".join(f"{k}={r['config'].get(k)}" for k in varying)
    what = "held-out test classes" if split == "test" else f"the {split} split"
    table = Table(title=f"runs compared on {what}")
    for name in ("run", "loss", "differs"):
        table.add_column(name)
    for _, head, _ in COLUMNS:
        table.add_column(head, justify="right")
    for head in ("tau", "FRR@tau", "FAR spread", "FRR spread"):
        table.add_column(head, justify="right")
    for r in rows:
        table.add_row(
            Path(r["run"]).name,
            r["loss"],
            r["differs"],
            *(fmt.format(r[k]) for k, _, fmt in COLUMNS),
            f"{r['tau']:.4f}",
            f"{r['frr_at_tau']:.4f}",
            f"{r['far_spread']:.4f}",
            f"{r['frr_spread']:.4f}",
        )
    (console or Console()).print(table)
    if plot_path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in rows:
            marker = "o" if "TCM" in r["loss"] else "x"
            ax.scatter(r["recall_at_1"], r["opis"], marker=marker, s=50)
            ax.annotate(Path(r["run"]).name, (r["recall_at_1"], r["opis"]), fontsize=7)
        ax.set(
            xlabel="R@1 (higher is better)",
            ylabel="OPIS (lower is better)",
            title="accuracy vs threshold consistency (o: with TCM, x: without)",
        )
        fig.tight_layout()
        fig.savefig(plot_path, dpi=120)
        plt.close(fig)
    return rows
