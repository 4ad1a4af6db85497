"""The served model's forward on the CPU with the options torch has, side by side (issue 32).

    .venv/bin/python -m bench.bench_cpu_forward [--artefact artefacts/default] [--batch 32]
        [--rounds 5] [--json out.json]

Each option embeds the same seeded 224 px batch (the model's own input size) after a warm-up;
reported: the time the service's start-up spends tracing and checking the model
(``service.engine.cpu_forward.optimised_for_cpu``), and per option images/s (median of the
rounds), the ratio to the eager path (``torch.inference_mode``, contiguous NCHW: the service
before the traced forward), and the largest absolute difference of the
L2-normalised embeddings from that path (outputs must stay within 1e-4 to be a drop-in).
Options: ``torch.no_grad`` instead of inference mode; channels_last memory format (weights and
input); ``torch.jit.trace`` + ``torch.jit.freeze`` (oneDNN fusions of conv+bn+activation);
and the two combined. ``torch.compile`` is left out: its CPU path needs a C++ compiler at run
time and minutes of compilation per shape, which a service start cannot pay.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tcm import load_artefact

Forward = Callable[[torch.Tensor], torch.Tensor]


def _normalised(f: Forward) -> Forward:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.nn.functional.normalize(f(x).float(), dim=-1)

    return run


def options(model: torch.nn.Module, example: torch.Tensor) -> dict[str, Forward]:
    model = model.eval()

    def no_grad(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    cl_model = _copy(model).to(memory_format=torch.channels_last)

    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return cl_model(x.contiguous(memory_format=torch.channels_last))

    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(_copy(model), example))
        frozen_cl = torch.jit.freeze(
            torch.jit.trace(
                _copy(model).to(memory_format=torch.channels_last),
                example.contiguous(memory_format=torch.channels_last),
            )
        )

    def traced_cl(x: torch.Tensor) -> torch.Tensor:
        return frozen_cl(x.contiguous(memory_format=torch.channels_last))

    return {
        "inference_mode (eager)": _normalised(model),
        "no_grad": _normalised(no_grad),
        "channels_last": _normalised(channels_last),
        "jit.trace + freeze": _normalised(frozen),
        "jit.trace + freeze, channels_last": _normalised(traced_cl),
    }


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def measure(f: Forward, x: torch.Tensor, rounds: int) -> tuple[float, torch.Tensor]:
    out = f(x)  # warm-up (and the oneDNN kernels' first-call set-up)
    f(x)
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = f(x)
        rates.append(len(x) / (time.perf_counter() - t))
    return statistics.median(rates), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--artefact", type=Path, default=Path("artefacts/default"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    model, manifest = load_artefact(args.artefact)
    h, w = manifest.preprocessing.image_size
    c = manifest.preprocessing.channels
    x = torch.randn(args.batch, c, h, w, generator=torch.Generator().manual_seed(0))
    print(
        f"# {manifest.model_version}, batch {args.batch} x {c}x{h}x{w}, "
        f"{torch.get_num_threads()} threads; {platform.machine()}, "
        f"load average {' '.join(f'{v:.1f}' for v in __import__('os').getloadavg())}"
    )
    from service.engine.cpu_forward import optimised_for_cpu

    t = time.perf_counter()
    served = optimised_for_cpu(model, (c, h, w))  # what the service does at start-up
    setup_s = time.perf_counter() - t
    print(f"  the service's start-up trace and check: {setup_s:.2f} s -> {type(served).__name__}")
    rows = []
    base_rate, base_out = None, None
    for name, f in options(model, x[:2]).items():
        rate, out = measure(f, x, args.rounds)
        if base_out is None:
            base_rate, base_out = rate, out
        diff = float((out - base_out).abs().max())
        rows.append({"option": name, "images_per_s": rate, "max_abs_diff": diff})
        assert base_rate is not None
        print(
            f"  {name:<36} {rate:7.1f} img/s  x{rate / base_rate:4.2f}  max |diff| {diff:.1e}"
            + ("" if diff <= 1e-4 else "  (differs: not a drop-in)")
        )
    if args.json:
        args.json.write_text(
            json.dumps({"batch": args.batch, "startup_trace_s": setup_s, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
