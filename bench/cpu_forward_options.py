"""The CPU forward's options beyond torch's eager and TorchScript paths (issue 32 item 2), each a
function ``images -> embeddings`` built from the served model: other runtimes (torch.compile,
ONNX Runtime, OpenVINO; each left out with the reason when it cannot be built here) and the lossy
ones (int8 dynamic quantisation of the head, OpenVINO in bfloat16), which the service does not
serve and whose recall cost ``bench.bench_cpu_forward`` reports.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Built:
    """An option that was built: its forward, how long building took, what it ran on."""

    forward: Forward
    build_s: float
    versions: dict[str, str] = field(default_factory=dict)
    lossy: bool = False


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TracerWarnings, torch 2.13's deprecation of TorchScript and torch.ao quantisation: the
    bench's own comparison with the eager path decides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def traced_channels_last(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``module`` traced and frozen in channels_last, as the service's traced forward."""
    with _quiet(), torch.no_grad():
        cl = copy.deepcopy(module).eval().to(memory_format=torch.channels_last)
        return torch.jit.freeze(
            torch.jit.trace(cl, example.contiguous(memory_format=torch.channels_last))
        )


def int8_head(model: nn.Module, example: torch.Tensor) -> Built:
    """The traced channels_last backbone with the head's Linear layers quantised to int8
    (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantised per batch
    on the fly). Lossy."""
    t = time.perf_counter()
    backbone = traced_channels_last(model.backbone, example)
    with _quiet():
        head = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(model.head)).eval(), {nn.Linear}, dtype=torch.qint8
        )
    norm = model.norm

    def forward(x: torch.Tensor) -> torch.Tensor:
        return norm(head(backbone(x.contiguous(memory_format=torch.channels_last))))

    return Built(forward, time.perf_counter() - t, lossy=True)


def compiled(model: nn.Module, example: torch.Tensor) -> Built:
    """``torch.compile`` (inductor, default mode, frozen weights, channels_last); the build time
    includes the first call, where compilation happens, with an empty inductor cache (as a
    service's first start would have)."""
    import torch._inductor.config as inductor

    cache = tempfile.mkdtemp(prefix="bench-inductor-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    t = time.perf_counter()
    inductor.freezing = True  # fold weights and batch norms as jit.freeze does
    cl = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    fn = torch.compile(cl)
    with _quiet(), torch.inference_mode():
        fn(example.contiguous(memory_format=torch.channels_last))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return fn(x.contiguous(memory_format=torch.channels_last))

    return Built(forward, time.perf_counter() - t, {"torch": torch.__version__})


def onnxruntime_session(model: nn.Module, example: torch.Tensor, threads: int) -> Built:
    """The model exported to ONNX (TorchScript exporter, dynamic batch) and run by ONNX Runtime's
    CPU provider with ``threads`` intra-op threads."""
    from service.engine.cpu_forward import onnxruntime_forward

    t = time.perf_counter()
    fwd = onnxruntime_forward(model, tuple(example.shape[1:]), threads=threads)
    import onnx
    import onnxruntime

    versions = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
    return Built(fwd, time.perf_counter() - t, versions)


def openvino_model(
    model: nn.Module, example: torch.Tensor, threads: int, precision: str = "f32"
) -> Built:
    """The model converted by OpenVINO straight from torch (``openvino.convert_model``) and
    compiled for the CPU with ``threads`` threads, latency hint, in ``precision`` (``f32``, or
    ``bf16``: OpenVINO's default on CPUs with AVX512-BF16 or AMX, lossy)."""
    import openvino as ov

    t = time.perf_counter()
    with _quiet():
        converted = ov.convert_model(
            copy.deepcopy(model).eval(),
            example_input=example,
            input=[(-1, *example.shape[1:])],
        )
    compiled_model = ov.Core().compile_model(
        converted,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
        },
    )
    request = compiled_model.create_infer_request()

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(np.array(out))

    return Built(
        forward,
        time.perf_counter() - t,
        {"openvino": ov.__version__},
        lossy=precision != "f32",
    )
