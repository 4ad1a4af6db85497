"""What bounds the CPU forward (issue 32 item 2): the model's FLOPs per image against this CPU's
measured fp32 matrix-multiply rate at the same thread count, and where a forward's time goes
(the operators with the most self CPU time under ``torch.profiler``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from torch import nn


def flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs of one image's forward (a multiply-add counts 2), as ``FlopCounterMode`` counts them:
    convolutions (depthwise included) and matrix products; batch norms, activations and pooling
    are not counted (they add a few percent of arithmetic, no matrix work)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    return float(counter.get_total_flops())


def gemm_flops_per_s(sizes: tuple[int, ...] = (1024, 2048, 3072), rounds: int = 5) -> dict:
    """fp32 rates of square matrix products over ``sizes`` (``rounds`` each, after a warm-up) by
    torch (``torch.mm``: MKL in the CPU wheel) and numpy (its OpenBLAS), with torch's current
    thread count (numpy's OpenBLAS threads set to match where ``threadpoolctl`` is installed):
    per size and library the median and the fastest round; ``best``, the fastest round of all,
    is the CPU's practical peak (on a shared machine the median is what neighbours left)."""
    g = torch.Generator().manual_seed(0)
    per: dict[str, float] = {}
    fastest: dict[str, float] = {}
    threads = torch.get_num_threads()
    for n in sizes:
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        an, bn = a.numpy(), b.numpy()
        products: tuple[tuple[str, Callable[[], object]], ...] = (
            ("torch", partial(torch.mm, a, b)),
            ("numpy", partial(np.matmul, an, bn)),
        )
        for lib, f in products:
            with _blas_threads(threads):
                f()
                times = []
                for _ in range(rounds):
                    t = time.perf_counter()
                    f()
                    times.append(time.perf_counter() - t)
            per[f"{lib} {n}"] = 2 * n**3 / statistics.median(times)
            fastest[f"{lib} {n}"] = 2 * n**3 / min(times)
    best = max(fastest, key=fastest.__getitem__)
    return {
        "best": fastest[best],
        "best_of": best,
        "median_per_size": per,
        "fastest_per_size": fastest,
        "threads": threads,
    }


@contextlib.contextmanager
def _blas_threads(n: int) -> Iterator[None]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def profile_forward(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, calls: int = 3, top: int = 10
) -> dict:
    """``calls`` forwards of ``x`` under ``torch.profiler`` (after a warm-up): the ``top`` operators
    by self CPU time, each with its share of all operators' self time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        forward(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                forward(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "calls": calls,
        "batch": len(x),
        "total_self_cpu_s": total / 1e6,
        "top": [
            {
                "op": e.key,
                "count": e.count,
                "self_cpu_s": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / total if total else 0.0,
            }
            for e in ranked
        ],
    }


def profile_onnxruntime(
    model: nn.Module, x: torch.Tensor, threads: int, calls: int = 3, top: int = 10
) -> dict:
    """The served ONNX Runtime session's own profiler over ``calls`` forwards of ``x`` (after a
    warm-up): the ``top`` operator types by time, each with its share of all nodes' time."""
    import collections
    import json
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    from service.engine.cpu_forward import onnx_export, onnxruntime_options

    opts = onnxruntime_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True  # type: ignore[attr-defined]
        opts.profile_file_prefix = str(Path(tmp) / "ort")  # type: ignore[attr-defined]
        session = ort.InferenceSession(
            onnx_export(model, tuple(x.shape[1:])), opts, providers=["CPUExecutionProvider"]
        )
        feed = {"images": x.numpy()}
        for _ in range(calls + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    # node events: "<node>_kernel_time" with args.op_name; the first run is the warm-up
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    warm_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    time_by_op: collections.Counter[str] = collections.Counter()
    count_by_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if e["ts"] < warm_end:
            continue
        op = e.get("args", {}).get("op_name", "?")
        time_by_op[op] += e["dur"]
        count_by_op[op] += 1
    total = sum(time_by_op.values())
    return {
        "calls": calls,
        "batch": len(x),
        "total_node_s": total / 1e6,
        "model_run_s": [r["dur"] / 1e6 for r in runs[1:]],
        "top": [
            {
                "op": op,
                "count": count_by_op[op],
                "self_s": us / 1e6,
                "share": us / total if total else 0.0,
            }
            for op, us in time_by_op.most_common(top)
        ],
    }
