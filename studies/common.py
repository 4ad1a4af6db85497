"""What both studies share: the console, the margin sweep on validation classes and its rule."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from training.compare import compare
from training.config import load_config
from training.sweep import sweep

console = Console(width=200)


def choose_margins(rows: list[dict[str, Any]], slack: float) -> dict[str, Any]:
    """Accuracy first, then consistency: the lowest validation OPIS among TCM runs whose
    validation R@1 is within ``slack`` of the run without TCM (else the best R@1)."""
    base = next(r for r in rows if not r["config"]["tcm"])
    tcm = [r for r in rows if r["config"]["tcm"]]
    ok = [r for r in tcm if r["recall_at_1"] >= base["recall_at_1"] - slack]
    pick = min(ok, key=lambda r: r["opis"]) if ok else max(tcm, key=lambda r: r["recall_at_1"])
    return {"m_plus": pick["config"]["m_plus"], "m_minus": pick["config"]["m_minus"],
            "rule": (f"lowest validation OPIS among TCM runs with validation R@1 >= no-TCM R@1 "
                     f"- {slack}" if ok else "no TCM run within the R@1 slack: best R@1"),
            "base": base, "picked": pick}


def margin_sweep(settings: list[str], out: Path, plot: Path, *, m_plus: str, m_minus: str,
                 slack: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Multi-similarity without TCM and with TCM on the (m_plus x m_minus) grid, trained with
    ``settings`` (which must carve out ``val_classes``) and judged on the validation split."""
    base = load_config(None, [*settings, "loss=multi_similarity"])
    if base.val_classes <= 0:
        raise ValueError("the margin sweep needs val_classes > 0")
    sweep(base, {"tcm": ["false"]}, out, console=console, progress=False)
    sweep(base, {"m_plus": m_plus.split(","), "m_minus": m_minus.split(",")}, out,
          console=console, progress=False)
    runs = sorted(d for d in out.iterdir() if (d / "report_val.json").is_file())
    rows = compare(runs, plot, console, split="val")
    chosen = choose_margins(rows, slack)
    console.print(f"chosen margins: m_plus={chosen['m_plus']} m_minus={chosen['m_minus']} "
                  f"({chosen['rule']})")
    return rows, chosen


Key = tuple[str, str, float, str]  # (row key, column title, scale, format spec)


def mean_std_table(groups: dict[str, list[dict[str, Any]]], keys: list[Key]
                   ) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """A markdown table, one line per group: mean ± std over its runs of every key; and the
    same numbers unscaled as {group: {key: [mean, std]}}."""
    lines = ["| loss | " + " | ".join(h for _, h, _, _ in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    summary: dict[str, dict[str, list[float]]] = {}
    for name, rows in groups.items():
        summary[name], cells = {}, []
        for key, _, scale, spec in keys:
            vals = [float(r[key]) * scale for r in rows]
            m = statistics.fmean(vals)
            s = statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary[name][key] = [m / scale, s / scale]
            cells.append(f"{m:{spec}} ± {s:{spec}}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines, summary


def sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | R@1 (val) | OPIS (val, ×1e-3) | ε-OPIS (val) |", "|---|---|---|---|"]
    return lines + [f"| {Path(r['run']).name} | {r['recall_at_1']:.4f} | "
                    f"{r['opis'] * 1e3:.2f} | {r['eps_opis']:.3f} |" for r in rows]


def machine() -> str:
    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, cuda={torch.cuda.is_available()}")
