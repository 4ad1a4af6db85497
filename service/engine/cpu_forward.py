"""The model's forward on a CPU at its best without changing its outputs (issue 32).

Two runtimes, tried in this order: ONNX Runtime (the model exported to ONNX in memory and run by
its CPU provider, which folds batch norms, fuses the padding, convolutions and clip activations
that torch runs as separate kernels, and picks its own convolution kernels), then TorchScript
(weights and inputs in channels_last, traced and frozen: batch norms folded, oneDNN fusing
convolution + activation). ``bench/bench_cpu_forward.py`` measures both against the eager path on
the bird model's Lite0 (``docs/benchmarks.md``, "The served model's CPU forward").

An export or a trace records one path through ``forward``; a model that branches on its input's
values would be frozen on the branch the example took. So each candidate is checked against
the eager model on seeded batches of other sizes and values before it is used; the next one is
tried (with a log line) when it differs by more than ``TOLERANCE``, fails to build, or its
package is not installed, and the eager model is served when none passes.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest difference of L2-normalised embeddings a drop-in may have
CHECK_BATCHES = (1, 3)  # batch sizes checked besides the traced/exported one (2)
Runtime = Literal["onnxruntime", "torchscript"]
RUNTIMES: tuple[Runtime, ...] = ("onnxruntime", "torchscript")


class ChannelsLast(nn.Module):
    """Feeds a traced channels_last module its input in that memory format."""

    def __init__(self, traced: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.traced(x.contiguous(memory_format=torch.channels_last))


class OnnxRuntimeForward(nn.Module):
    """A model exported to ONNX and run by ONNX Runtime's CPU provider: tensors in and out."""

    def __init__(self, session: object) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.detach().to(torch.float32).contiguous().numpy()
        (out,) = self.session.run(None, {"images": pixels})  # type: ignore[attr-defined]
        return torch.from_numpy(out)


def traced_forward(model: nn.Module, input_shape: tuple[int, int, int]) -> ChannelsLast:
    """``model`` in channels_last, traced and frozen by TorchScript."""
    cl = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        # a TracerWarning says the trace may not generalise: the check decides
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch 2.13 marks TorchScript deprecated (in favour of torch.compile/export, which
        # need a compiler at run time on CPUs); it still runs, and the check decides
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.freeze(
            torch.jit.trace(cl, example.contiguous(memory_format=torch.channels_last))
        )
    return ChannelsLast(traced).eval()


def onnx_export(model: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    """``model`` as an ONNX graph (TorchScript-based exporter, opset 17, any batch size): input
    ``images``, output ``embeddings``. Raises ImportError without ``onnx``."""
    import onnx  # noqa: F401  (torch's exporter needs it: fail here, with its name)

    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's TracerWarnings: the check decides
        torch.onnx.export(
            copy.deepcopy(model).eval(),
            (example,),
            buf,
            dynamo=False,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "n"}, "embeddings": {0: "n"}},
            opset_version=17,
        )
    return buf.getvalue()


def onnxruntime_options(threads: int | None = None) -> object:
    """The session options served: ``threads`` intra-op threads (torch's count by default), one
    inter-op thread, all graph optimisations, idle workers asleep. Raises ImportError without
    ``onnxruntime``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle workers sleep instead of spinning: the service's event loop shares these cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def onnxruntime_forward(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    threads: int | None = None,
    options: object | None = None,
) -> OnnxRuntimeForward:
    """``model`` exported to ONNX in memory and loaded in an ONNX Runtime CPU session with
    ``options`` (``onnxruntime_options(threads)`` by default)."""
    import onnxruntime as ort

    graph = onnx_export(model, input_shape)
    session = ort.InferenceSession(
        graph, options or onnxruntime_options(threads), providers=["CPUExecutionProvider"]
    )
    return OnnxRuntimeForward(session).eval()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x.float(), dim=-1)


def largest_difference(
    fast: nn.Module, model: nn.Module, input_shape: tuple[int, int, int]
) -> float:
    """The largest difference of ``fast``'s and ``model``'s L2-normalised embeddings over seeded
    batches of ``CHECK_BATCHES`` sizes, with values spread wider than the build's example."""
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    with torch.inference_mode():
        for n in CHECK_BATCHES:
            x = torch.randn(n, *input_shape, generator=g) * 2.0
            worst = max(worst, float((_unit(fast(x)) - _unit(model(x))).abs().max()))
    return worst


_BUILDERS: dict[Runtime, Callable[[nn.Module, tuple[int, int, int]], nn.Module]] = {
    "onnxruntime": onnxruntime_forward,
    "torchscript": traced_forward,
}


def optimised_for_cpu(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    runtimes: tuple[Runtime, ...] = RUNTIMES,
) -> nn.Module:
    """The first of ``runtimes`` that reproduces ``model``'s embeddings on inputs of
    ``input_shape`` (channels, height, width) within ``TOLERANCE``; else ``model``."""
    model = model.eval()
    for runtime in runtimes:
        try:
            fast = _BUILDERS[runtime](model, input_shape)
            worst = largest_difference(fast, model, input_shape)
        except Exception as exc:  # not installed, or a model it cannot export or trace
            log.warning("CPU forward: %s not used: %s: %s", runtime, type(exc).__name__, exc)
            continue
        if not worst <= TOLERANCE:
            log.warning(
                "CPU forward: %s not used: it differs from the eager model by %.2g (> %g)",
                runtime,
                worst,
                TOLERANCE,
            )
            continue
        log.info("CPU forward: %s (max |diff| from eager %.1e)", runtime, worst)
        return fast
    log.warning("CPU forward: serving the eager model")
    return model
