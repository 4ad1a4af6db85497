"""The test suite's wall time in one process against pytest-xdist workers, side by side.

Runs ``pytest -q -m "not gpu and not goals" -p no:cacheprovider`` (what ``make test`` runs,
without the install and lint) once per worker count per round, the counts alternating within
each round so that a busy spell of the machine hits both, and prints each run's time and the
ratio of the first count's time to each other count's. Every run must pass: a failed run's
time says nothing.

    python -m bench.bench_suite --workers 0 2 --rounds 1 --json docs/results/bench_suite.json

``--paths`` narrows the suite (default: all of it). Needs what ``make test`` needs (Redis on
127.0.0.1:6379, promtool, amtool, helm, the shared data sets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_suite(workers: int, paths: list[str]) -> dict[str, object]:
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "not gpu and not goals",
        "-p",
        "no:cacheprovider",
    ]
    if workers:
        args += ["-n", str(workers)]
    started = time.monotonic()
    proc = subprocess.run(args + paths, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        raise SystemExit(f"the suite failed with {workers} worker(s): {summary}")
    return {"workers": workers, "wall_s": round(wall, 1), "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--paths", nargs="*", default=[])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    load_before = os.getloadavg()
    runs = []
    for r in range(a.rounds):
        order = a.workers if r % 2 == 0 else list(reversed(a.workers))
        for w in order:
            run = run_suite(w, a.paths) | {"round": r}
            runs.append(run)
            print(f"round {r}  workers {w}: {run['wall_s']:7.1f} s  ({run['summary']})", flush=True)
    base = [x["wall_s"] for x in runs if x["workers"] == a.workers[0]]
    ratios = {}
    for w in a.workers[1:]:
        times = [x["wall_s"] for x in runs if x["workers"] == w]
        ratios[str(w)] = [round(b / t, 2) for b, t in zip(base, times, strict=True)]
        print(f"{a.workers[0]} worker(s) / {w} workers, per round: {ratios[str(w)]}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                {
                    "command": " ".join(["python -m bench.bench_suite", *sys.argv[1:]]),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "load_before": load_before,
                    "runs": runs,
                    "speedup_vs_first": ratios,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
