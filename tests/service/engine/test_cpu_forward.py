"""The traced CPU forward (service/engine/cpu_forward.py): the same embeddings as the eager
model at every batch size, for the test model and the committed bird model; a model the trace
cannot reproduce is served eagerly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from service.engine.cpu_forward import TOLERANCE, ChannelsLast, optimised_for_cpu
from tcm import load_artefact

ROOT = Path(__file__).resolve().parents[3]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x.float(), dim=-1)


@pytest.mark.parametrize("which", ["test model", "bird default"])
def test_traced_forward_equals_eager(which: str, artefact: Path) -> None:
    path = artefact if which == "test model" else ROOT / "artefacts" / "default"
    model, manifest = load_artefact(path)
    pre = manifest.preprocessing
    shape = (pre.channels, *pre.image_size)
    fast = optimised_for_cpu(model, shape)
    assert isinstance(fast, ChannelsLast)  # traced, not the eager fallback
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for n in (1, 2, 5, 9):  # batch sizes the trace never saw
            x = torch.randn(n, *shape, generator=g)
            diff = (_unit(fast(x)) - _unit(model(x))).abs().max()
            assert float(diff) <= TOLERANCE, (n, float(diff))


class Branchy(nn.Module):
    """Takes another path when its input is mostly negative: a trace freezes one path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).flatten(1)
        return y if float(x.mean()) > 0 else -y


def test_a_model_the_trace_cannot_reproduce_is_served_eagerly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = Branchy().eval()
    with caplog.at_level("WARNING"):
        served = optimised_for_cpu(model, (1, 8, 8))
    assert served is model
    assert "differs" in caplog.text or "tracing it failed" in caplog.text
