"""The model's forward on a CPU at its best without changing its outputs (issue 32): weights
and inputs in channels_last memory format, traced and frozen by TorchScript (which folds
batch norms into convolutions and lets oneDNN fuse convolution + activation). On the 2-core VM
the bird model's Lite0 embeds 1.7-1.95x faster this way (two runs) (``bench/bench_cpu_forward.py``,
``docs/benchmarks.md``), with embeddings within 5e-7 of the eager ones.

A trace records one path through ``forward``; a model that branches on its input's values would
be frozen on the branch the example took. So the traced module is checked against the eager
one on seeded batches of other sizes and values before it is used, and the eager model is
served (with a log line) when they differ by more than ``TOLERANCE`` or the trace fails.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest difference of L2-normalised embeddings a drop-in may have
CHECK_BATCHES = (1, 3)  # batch sizes checked besides the traced one (2)


class ChannelsLast(nn.Module):
    """Feeds a traced channels_last module its input in that memory format."""

    def __init__(self, traced: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.traced(x.contiguous(memory_format=torch.channels_last))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x.float(), dim=-1)


def optimised_for_cpu(model: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
    """``model`` traced and frozen in channels_last when that reproduces its embeddings on
    inputs of ``input_shape`` (channels, height, width) within ``TOLERANCE``; else ``model``."""
    model = model.eval()
    g = torch.Generator().manual_seed(0)
    try:
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        example = torch.randn(2, *input_shape, generator=g)
        with torch.no_grad(), warnings.catch_warnings():
            # a TracerWarning says the trace may not generalise: the check below decides
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # torch 2.13 marks TorchScript deprecated (in favour of torch.compile/export, which
            # need a compiler at run time on CPUs); it still runs, and the check decides
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.freeze(
                torch.jit.trace(cl, example.contiguous(memory_format=torch.channels_last))
            )
        fast = ChannelsLast(traced).eval()
        worst = 0.0
        with torch.inference_mode():
            for n in CHECK_BATCHES:
                x = torch.randn(n, *input_shape, generator=g) * 2.0
                worst = max(worst, float((_unit(fast(x)) - _unit(model(x))).abs().max()))
    except Exception as exc:  # a model TorchScript cannot trace is served as it is
        log.warning("serving the eager model on the CPU: tracing it failed (%s)", exc)
        return model
    if not worst <= TOLERANCE:
        log.warning(
            "serving the eager model on the CPU: the traced one differs by %.2g (> %g)",
            worst,
            TOLERANCE,
        )
        return model
    log.info("CPU forward: traced, frozen, channels_last (max |diff| %.1e)", worst)
    return fast
