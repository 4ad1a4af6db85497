"""`make bench`: every benchmark in one go, each printing its side-by-side ratios.

Runs each benchmark module as its own process (so one's memory and threads do not colour the
next), with the arguments recorded in docs/benchmarks.md. Extra arguments are not forwarded;
run a module directly (``python -m bench.bench_tcm --help``) to change its sizes.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time

import torch

BENCHES: list[list[str]] = [
    ["bench.bench_tcm", "--sizes", "2000", "5000", "10000", "20000", "--naive-max", "10000"],
    ["bench.bench_service", "--concurrency", "1", "8", "32", "--seconds", "5"],
    ["bench.bench_batcher", "--seconds", "4", "--jpegs", "256", "--rounds", "2"],
    ["bench.bench_client", "--dims", "128", "512", "--items", "20000", "--rounds", "3"],
    ["bench.bench_faces", "--images", "64", "--concurrency", "1", "4", "16", "--chips", "16"],
    ["bench.bench_pretrained", "--images", "64", "--batch", "32"],
    ["bench.bench_cpu_forward", "--rounds", "5", "--compile", "--recall-images", "600"],
    ["bench.bench_sampling", "--items", "30000", "120000", "--per-subject", "3"],
    ["bench.bench_asnorm", "--n", "100000", "--dim", "128", "--queries", "1000"],
    ["bench.bench_match_path", "--sizes", "10000", "100000", "--seconds", "2", "--rounds", "2"],
]


def main() -> int:
    print(
        f"# machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, cuda={torch.cuda.is_available()}"
    )
    failed = 0
    for module, *args in BENCHES:
        cmd = [sys.executable, "-m", module, *args]
        print(f"\n$ python -m {module} {' '.join(args)}", flush=True)
        started = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"# {module}: exit {rc} after {time.perf_counter() - started:.0f}s", flush=True)
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
