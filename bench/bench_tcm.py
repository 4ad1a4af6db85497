"""Benchmarks for the tcm library: TCM overhead in a training step, and OPIS speed and memory.

Everything in one run, side by side, so ratios are meaningful on a noisy machine:
    .venv/bin/python -m bench.bench_tcm [--sizes 2000 5000 10000 20000] [--device cpu|cuda]
Each OPIS configuration runs in its own subprocess so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch


def _time(fn, repeats: int, warmup: int = 2, sync: bool = False) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def bench_tcm_overhead(device: str, repeats: int) -> dict:
    from pytorch_metric_learning.losses import MultiSimilarityLoss, ThresholdConsistentMarginLoss

    from tcm import TCMLoss, build_embedder

    torch.manual_seed(0)
    batch, dim = 256, 512
    labels = torch.arange(64, device=device).repeat_interleave(4)
    base, ours, pml = MultiSimilarityLoss(), TCMLoss(), ThresholdConsistentMarginLoss()
    emb = torch.randn(batch, dim, device=device, requires_grad=True)
    sync = device == "cuda"

    def loss_step(extra):
        def run():
            loss = base(emb, labels)
            if extra is not None:
                loss = loss + extra(emb, labels)
            loss.backward()

        return run

    model = build_embedder("small_cnn", in_channels=1, embedding_dim=dim, width=32).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    images = torch.randn(batch, 1, 28, 28, device=device)

    def train_step(extra):
        def run():
            opt.zero_grad()
            e = model(images)
            loss = base(e, labels)
            if extra is not None:
                loss = loss + extra(e, labels)
            loss.backward()
            opt.step()

        return run

    out = {}
    for name, factory in (("loss_only", loss_step), ("train_step_small_cnn", train_step)):
        # interleave the variants so drift hits all of them alike
        times: dict[str, list[float]] = {"base": [], "base+tcm": [], "base+pml_tcm": []}
        for _ in range(3):
            times["base"].append(_time(factory(None), repeats, sync=sync))
            times["base+tcm"].append(_time(factory(ours), repeats, sync=sync))
            times["base+pml_tcm"].append(_time(factory(pml), repeats, sync=sync))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {
            "seconds": med,
            "ratio_with_tcm": med["base+tcm"] / med["base"],
            "ours_vs_pml_tcm_ratio": med["base+tcm"] / med["base+pml_tcm"],
        }
    return out


OPIS_CHILD = r"""
import json, sys, time
import numpy as np, torch, tcm
n, d, c = (int(v) for v in sys.argv[1:4])
device, naive = sys.argv[4], sys.argv[5] == "1"
g = torch.Generator().manual_seed(0)
labels = torch.arange(c).repeat_interleave(n // c)
emb = torch.randn(c, d, generator=g)[labels] + 1.2 * torch.randn(n, d, generator=g)
emb = torch.nn.functional.normalize(emb, dim=1)
tau_range = (0.2, 0.6)
if naive:
    # The obvious implementation: dense N x N scores, then per class and per threshold a count.
    t = time.perf_counter()
    x = emb.numpy().astype(np.float64)
    y = labels.numpy()
    sim = x @ x.T
    iu = np.triu_indices(n, 1)
    s, a, b = sim[iu], y[iu[0]], y[iu[1]]
    grid = np.linspace(*tau_range, 101)
    curves = []
    for k in range(c):
        pos = s[(a == k) & (b == k)]
        neg = s[(a == k) ^ (b == k)]
        tpr = (pos[None, :] >= grid[:, None]).mean(axis=1)
        tnr = (neg[None, :] < grid[:, None]).mean(axis=1)
        curves.append(2 * tpr * tnr / np.maximum(tpr + tnr, 1e-300))
    u = np.array(curves)
    dev = ((u - u.mean(axis=0)) ** 2).mean(axis=0)
    value = float((dev.sum() - 0.5 * (dev[0] + dev[-1])) / 100)
    seconds = time.perf_counter() - t
else:
    emb = emb.to(device)
    tcm.consistency_report(emb[:512], labels[:512], tau_range=tau_range)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    value = tcm.consistency_report(emb, labels, tau_range=tau_range).opis
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    tcm.consistency_report(emb, labels)  # range found from FAR bounds: two extra passes
    if device == "cuda":
        torch.cuda.synchronize()
    seconds_found = time.perf_counter() - t
# VmHWM is this process's own peak (ru_maxrss would carry the parent's over exec)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
res = {"opis": value, "seconds": seconds, "peak_rss_mb": peak}
if not naive:
    res["seconds_with_range_search"] = seconds_found
    if device == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(res))
"""


def bench_opis(sizes: list[int], naive_max: int, device: str, dim: int, classes_per: int) -> list:
    rows = []
    for n in sizes:
        c = max(2, n // classes_per)
        row = {"n": n, "dim": dim, "classes": c}
        for naive in (False, True):
            if naive and n > naive_max:
                continue
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    OPIS_CHILD,
                    str(n),
                    str(dim),
                    str(c),
                    device,
                    "1" if naive else "0",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            row["naive" if naive else "fast"] = json.loads(out.stdout.strip().splitlines()[-1])
        if "naive" in row:
            row["speedup"] = row["naive"]["seconds"] / row["fast"]["seconds"]
            row["same_opis"] = abs(row["naive"]["opis"] - row["fast"]["opis"]) < 1e-6
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    p.add_argument("--naive-max", type=int, default=5000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    print(
        f"# machine: {platform.node()} {platform.processor()} cpus={torch.get_num_threads()} "
        f"device={args.device} torch={torch.__version__}"
    )
    overhead = bench_tcm_overhead(args.device, args.repeats)
    print(json.dumps({"tcm_overhead": overhead}, indent=1))
    bench_opis(args.sizes, args.naive_max, args.device, args.dim, args.per_class)


if __name__ == "__main__":
    main()
