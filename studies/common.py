"""What the studies share: the console, the margin sweep on validation classes and its rule, the
mean ± std table and the paired per-seed differences with their intervals."""

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
    return {
        "m_plus": pick["config"]["m_plus"],
        "m_minus": pick["config"]["m_minus"],
        "rule": (
            f"lowest validation OPIS among TCM runs with validation R@1 >= no-TCM R@1 - {slack}"
            if ok
            else "no TCM run within the R@1 slack: best R@1"
        ),
        "base": base,
        "picked": pick,
    }


def margin_sweep(
    settings: list[str], out: Path, plot: Path, *, m_plus: str, m_minus: str, slack: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Multi-similarity without TCM and with TCM on the (m_plus x m_minus) grid, trained with
    ``settings`` (which must carve out ``val_classes``) and judged on the validation split."""
    base = load_config(None, [*settings, "loss=multi_similarity"])
    if base.val_classes <= 0:
        raise ValueError("the margin sweep needs val_classes > 0")
    sweep(base, {"tcm": ["false"]}, out, console=console, progress=False)
    sweep(
        base,
        {"m_plus": m_plus.split(","), "m_minus": m_minus.split(",")},
        out,
        console=console,
        progress=False,
    )
    runs = sorted(d for d in out.iterdir() if (d / "report_val.json").is_file())
    rows = compare(runs, plot, console, split="val")
    chosen = choose_margins(rows, slack)
    console.print(
        f"chosen margins: m_plus={chosen['m_plus']} m_minus={chosen['m_minus']} ({chosen['rule']})"
    )
    return rows, chosen


Key = tuple[str, str, float, str]  # (row key, column title, scale, format spec)


def mean_std_table(
    groups: dict[str, list[dict[str, Any]]], keys: list[Key]
) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """A markdown table, one line per group: mean ± std over its runs of every key; and the
    same numbers unscaled as {group: {key: [mean, std]}}."""
    lines = [
        "| loss | " + " | ".join(h for _, h, _, _ in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
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
    return lines + [
        f"| {Path(r['run']).name} | {r['recall_at_1']:.4f} | "
        f"{r['opis'] * 1e3:.2f} | {r['eps_opis']:.3f} |"
        for r in rows
    ]


def training_minutes(runs: list[Path]) -> float:
    """Training time summed over runs from their epoch histories: unlike the wall time of a
    study invocation it stays true when the tables are re-rendered from cached runs."""
    import json

    total = 0.0
    for run in runs:
        path = Path(run) / "history.json"
        if path.is_file():
            total += sum(float(e.get("seconds", 0.0)) for e in json.loads(path.read_text()))
    return total / 60


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, cuda={torch.cuda.is_available()}"
    )


def paired_differences(
    base: list[dict[str, Any]], treated: list[dict[str, Any]], keys: list[str]
) -> dict[str, dict[str, Any]]:
    """Per seed, ``treated - base`` of each key (runs paired by ``config["seed"]``: same split
    and initialisation seed), with the mean, a 95% Student-t interval over the seeds and the
    mean's change relative to the base mean. ``inside_noise``: the interval covers 0, i.e.
    the seeds cannot tell the two arms apart. With 2-3 seeds the interval is wide, on purpose:
    that is what the data support."""
    from scipy import stats

    by_seed = {r["config"]["seed"]: r for r in base}
    pairs = [(by_seed[r["config"]["seed"]], r) for r in treated if r["config"]["seed"] in by_seed]
    if len(pairs) < 2:
        raise ValueError("paired differences need at least 2 seeds run with both arms")
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        diffs = [float(t[key]) - float(b[key]) for b, t in pairs]
        mean = statistics.fmean(diffs)
        t = float(stats.t.ppf(0.975, len(diffs) - 1))
        half = t * statistics.stdev(diffs) / len(diffs) ** 0.5
        base_mean = statistics.fmean(float(b[key]) for b, _ in pairs)
        out[key] = {
            "seeds": [b["config"]["seed"] for b, _ in pairs],
            "per_seed": diffs,
            "mean": mean,
            "ci95": [mean - half, mean + half],
            "relative": mean / base_mean if base_mean else None,
            "inside_noise": mean - half <= 0 <= mean + half,
        }
    return out


def differences_table(diffs: dict[str, dict[str, Any]], keys: list[Key]) -> list[str]:
    """Markdown lines: one row per key, the per-seed differences, their mean, the 95% interval,
    the relative change and whether the interval covers 0."""
    lines = [
        "| metric | per seed | mean | 95% interval (t, over seeds) | relative | covers 0 |",
        "|---|---|---|---|---|---|",
    ]
    for key, head, scale, spec in keys:
        d = diffs[key]
        per = ", ".join(f"{v * scale:+{spec}}" for v in d["per_seed"])
        lo, hi = (v * scale for v in d["ci95"])
        rel = "" if d["relative"] is None else f"{d['relative']:+.1%}"
        lines.append(
            f"| {head} | {per} | {d['mean'] * scale:+{spec}} | [{lo:+{spec}}, "
            f"{hi:+{spec}}] | {rel} | {'yes' if d['inside_noise'] else 'no'} |"
        )
    return lines
