"""The served model's forward on the CPU with the options that exist, side by side (issue 32).

    .venv/bin/python -m bench.bench_cpu_forward [--artefact artefacts/default] [--batch 32]
        [--rounds 5] [--threads N] [--compile] [--recall-images 600] [--json out.json]

Each option embeds the same seeded 224 px batch (the model's own input size) after a warm-up;
the options take turns, one call each per round, so a neighbour's load falls on all of them.
Reported: the time the service's start-up spends building and checking its forward
(``service.engine.cpu_forward.optimised_for_cpu``), and per option images/s (median of the
rounds), the ratio to the eager path (``torch.inference_mode``, contiguous NCHW: the service
before issue 32) and to the served path, both measured in the same run, and the largest absolute
difference of the L2-normalised embeddings from the eager path (within 1e-4 to be a drop-in).

Exact options: ``torch.no_grad``; channels_last memory format (weights and input);
``torch.jit.trace`` + ``torch.jit.freeze`` (oneDNN fusions of conv+bn+activation), alone and in
channels_last; ``torch.compile`` (``--compile``: inductor, frozen, channels_last; it compiles
C++ at first call, whose time is reported); ONNX Runtime and OpenVINO in fp32 with ``--threads``
intra-op threads (torch's count by default), when their wheels are installed. Lossy options:
int8 dynamic quantisation of the head's Linear layers, OpenVINO in bfloat16; their recall cost
is measured on ``--recall-images`` held-out CUB photos of the artefact's own test split
(Recall@1 exact vs lossy, the share of queries whose nearest neighbour is unchanged).

Then the roofline (``bench.cpu_roofline``): FLOPs per image, this CPU's best fp32 GEMM rate
at the same thread count, and the fraction of it each option achieves; and a profile of the
served forward (top operators by self CPU time).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench import cpu_forward_options as opts
from bench.cpu_roofline import (
    flops_per_image,
    gemm_flops_per_s,
    profile_forward,
    profile_onnxruntime,
)
from tcm import load_artefact

Forward = Callable[[torch.Tensor], torch.Tensor]
EAGER = "inference_mode (eager)"
TRACED = "jit.trace + freeze, channels_last"  # the served path before ONNX Runtime


def _normalised(f: Forward) -> Forward:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.nn.functional.normalize(f(x).float(), dim=-1)

    return run


def torch_options(model: torch.nn.Module, example: torch.Tensor) -> dict[str, opts.Built]:
    """The eager and TorchScript paths."""
    model = model.eval()

    def no_grad(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return cl_model(x.contiguous(memory_format=torch.channels_last))

    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model), example))
    frozen_cl = opts.traced_channels_last(model, example)

    def traced_cl(x: torch.Tensor) -> torch.Tensor:
        return frozen_cl(x.contiguous(memory_format=torch.channels_last))

    return {
        EAGER: opts.Built(model, 0.0),
        "no_grad": opts.Built(no_grad, 0.0),
        "channels_last": opts.Built(channels_last, 0.0),
        "jit.trace + freeze": opts.Built(frozen, 0.0),
        TRACED: opts.Built(traced_cl, 0.0),
    }


def other_options(
    model: torch.nn.Module, example: torch.Tensor, threads: int, compile_: bool
) -> tuple[dict[str, opts.Built], dict[str, str]]:
    """Other runtimes and the lossy options: those built, and why the others were not."""
    builders: dict[str, Callable[[], opts.Built]] = {
        "onnxruntime": lambda: opts.onnxruntime_session(model, example, threads),
        "openvino f32": lambda: opts.openvino_model(model, example, threads, "f32"),
        "int8 head (lossy)": lambda: opts.int8_head(model, example),
        "openvino bf16 (lossy)": lambda: opts.openvino_model(model, example, threads, "bf16"),
    }
    if compile_:
        builders = {
            "torch.compile (inductor, frozen, channels_last)": lambda: opts.compiled(model, example)
        } | builders
    built, failed = {}, {}
    for name, build in builders.items():
        try:
            built[name] = build()
            print(f"  built {name} in {built[name].build_s:.1f} s {built[name].versions}")
        except Exception as exc:  # an option that cannot be built here is reported, not fatal
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"  {name}: not built ({failed[name]})")
            traceback.print_exc(limit=2)
    return built, failed


def measure(
    forwards: dict[str, Forward], x: torch.Tensor, rounds: int
) -> dict[str, tuple[list[float], torch.Tensor]]:
    """Each forward warmed up twice, then ``rounds`` rounds in which each runs once, in turn."""
    outs = {}
    for name, f in forwards.items():
        f(x)
        outs[name] = f(x)
    rates: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(rounds):
        for name, f in forwards.items():
            t = time.perf_counter()
            f(x)
            rates[name].append(len(x) / (time.perf_counter() - t))
    return {name: (rates[name], outs[name]) for name in forwards}


def held_out_images(artefact: Path, n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` photos (seeded draw) of the artefact's held-out classes, decoded, with labels."""
    from training.artefact_data import artefact_config
    from training.data import load_raw

    _, manifest = load_artefact(artefact)
    _, test = load_raw(artefact_config(manifest))
    pick = np.sort(np.random.default_rng(seed).permutation(len(test.labels))[:n])
    return [test.images[int(i)] for i in pick], np.asarray(test.labels)[pick]


def recall_cost(
    forwards: dict[str, Forward], images: list[np.ndarray], labels: np.ndarray, spec, batch: int
) -> dict:
    """Recall@1 of each forward's embeddings of ``images`` (the first forward is the exact one),
    and how far each lossy one strays from it."""
    from tcm.preprocess import to_input_tensor
    from tcm.retrieval import recall_at_k

    x = torch.cat(
        [to_input_tensor(images[i : i + batch], spec) for i in range(0, len(images), batch)]
    )
    emb = {
        name: torch.cat([f(x[i : i + batch]) for i in range(0, len(x), batch)])
        for name, f in forwards.items()
    }
    exact_name = next(iter(emb))
    exact = emb[exact_name]

    def nearest(e: torch.Tensor) -> torch.Tensor:
        s = e @ e.T
        s.fill_diagonal_(-2.0)
        return s.argmax(dim=1)

    nn_exact = nearest(exact)
    out = {"images": len(images), "classes": len(np.unique(labels)), "exact": exact_name}
    for name, e in emb.items():
        out[name] = {
            "recall_at_1": recall_at_k(e, labels, k=1),
            "nearest_unchanged": float((nearest(e) == nn_exact).float().mean()),
            "max_abs_diff": float((e - exact).abs().max()),
            "min_cosine_to_exact": float((e * exact).sum(dim=1).min()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--artefact", type=Path, default=Path("artefacts/default"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compile", action="store_true", help="also torch.compile (about a minute)")
    p.add_argument("--recall-images", type=int, default=600, help="0: no recall cost")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, manifest = load_artefact(args.artefact)
    model.eval()
    spec = manifest.preprocessing
    h, w = spec.image_size
    c = spec.channels
    x = torch.randn(args.batch, c, h, w, generator=torch.Generator().manual_seed(0))
    load = os.getloadavg()
    print(
        f"# {manifest.model_version}, batch {args.batch} x {c}x{h}x{w}, "
        f"{torch.get_num_threads()} threads; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{v:.1f}' for v in load)}"
    )
    from service.engine.cpu_forward import optimised_for_cpu

    gemm_start = gemm_flops_per_s()  # before any other runtime's threads exist

    t = time.perf_counter()
    served = optimised_for_cpu(model, (c, h, w))  # what the service does at start-up
    setup_s = time.perf_counter() - t
    print(f"  the service's start-up build and check: {setup_s:.2f} s -> {type(served).__name__}")
    built = torch_options(model, x[:2])
    more, failed = other_options(model, x[:2], args.threads, args.compile)
    built |= more
    built["served (optimised_for_cpu)"] = opts.Built(served, setup_s)
    results = measure({k: _normalised(b.forward) for k, b in built.items()}, x, args.rounds)
    base_out = results[EAGER][1]
    base_rate = statistics.median(results[EAGER][0])
    traced_rate = statistics.median(results[TRACED][0])
    flops = flops_per_image(model, (c, h, w))
    gemm_end = gemm_flops_per_s()
    gemm = max(gemm_start, gemm_end, key=lambda g: g["best"])
    rows = []
    print(f"  {'option':<48} {'img/s':>7} {'x eager':>7} {'x traced':>8}  max |diff|  of GEMM")
    for name, (rates, out) in results.items():
        rate = statistics.median(rates)
        diff = float((out - base_out).abs().max())
        row = {
            "option": name,
            "images_per_s": rate,
            "rounds": rates,
            "ratio_to_eager": rate / base_rate,
            "ratio_to_traced": rate / traced_rate,
            "max_abs_diff": diff,
            "build_s": built[name].build_s,
            "versions": built[name].versions,
            "lossy": built[name].lossy,
            "fraction_of_gemm_rate": rate * flops / gemm["best"],
            "fastest_round_fraction_of_gemm_rate": max(rates) * flops / gemm["best"],
        }
        rows.append(row)
        print(
            f"  {name:<48} {rate:7.1f} {rate / base_rate:7.2f} {rate / traced_rate:8.2f}"
            f"  {diff:.1e}  {row['fraction_of_gemm_rate']:6.1%}"
            + ("" if diff <= 1e-4 else "  (differs: not a drop-in)")
        )
    for name, why in failed.items():
        rows.append({"option": name, "error": why})
    print(
        f"  roofline: {flops / 1e9:.3f} GFLOP per image; fp32 GEMM {gemm['best'] / 1e9:.1f} "
        f"GFLOP/s with {args.threads} threads -> at most {gemm['best'] / flops:.0f} img/s"
    )
    profiles = {"torchscript (traced, channels_last)": profile_forward(built[TRACED].forward, x)}
    try:
        profiles["onnxruntime"] = profile_onnxruntime(model, x, args.threads)
    except ImportError as exc:
        print(f"  no ONNX Runtime profile: {exc}")
    for name, prof in profiles.items():
        print(f"  profile of {name}, top ops by self time ({prof['calls']} calls of {len(x)}):")
        for op in prof["top"]:
            secs = op.get("self_cpu_s", op.get("self_s"))
            print(f"    {op['op']:<40} {secs:7.3f} s  {op['share']:6.1%}  x{op['count']}")
    recall = None
    if args.recall_images > 0:
        lossy = [k for k, b in built.items() if b.lossy]
        forwards = {TRACED: _normalised(built[TRACED].forward)} | {
            k: _normalised(built[k].forward) for k in lossy
        }
        images, labels = held_out_images(args.artefact, args.recall_images)
        recall = recall_cost(forwards, images, labels, spec, args.batch)
        print(
            f"  recall cost on {recall['images']} held-out CUB photos "
            f"({recall['classes']} classes):"
        )
        for k in forwards:
            r = recall[k]
            print(
                f"    {k:<46} R@1 {r['recall_at_1']:.4f}  nearest unchanged "
                f"{r['nearest_unchanged']:.3f}  max |diff| {r['max_abs_diff']:.1e}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "node": platform.node(),
                        "cpus": os.cpu_count(),
                        "threads": args.threads,
                        "load_average_start": load,
                        "load_average_end": os.getloadavg(),
                        "torch": torch.__version__,
                    },
                    "batch": args.batch,
                    "rounds": args.rounds,
                    "startup_build_s": setup_s,
                    "served": type(served).__name__,
                    "rows": rows,
                    "roofline": {
                        "flops_per_image": flops,
                        "gemm_flops_per_s": gemm,
                        "gemm_at_start_and_end": [gemm_start, gemm_end],
                    },
                    "profiles": profiles,
                    "recall_cost": recall,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
