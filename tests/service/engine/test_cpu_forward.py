"""The optimised CPU forward (service/engine/cpu_forward.py): ONNX Runtime, else TorchScript,
each giving the same embeddings as the eager model at every batch size, for the test model and
the committed bird model; a runtime that is missing or cannot reproduce the model is skipped,
and the eager model served when none can."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from service.engine.cpu_forward import (
    RUNTIMES,
    TOLERANCE,
    ChannelsLast,
    OnnxRuntimeForward,
    optimised_for_cpu,
)
from tcm import load_artefact

ROOT = Path(__file__).resolve().parents[3]
EXPECTED = {"onnxruntime": OnnxRuntimeForward, "torchscript": ChannelsLast}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x.float(), dim=-1)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("which", ["test model", "bird default"])
def test_optimised_forward_equals_eager(which: str, runtime: str, artefact: Path) -> None:
    path = artefact if which == "test model" else ROOT / "artefacts" / "default"
    model, manifest = load_artefact(path)
    pre = manifest.preprocessing
    shape = (pre.channels, *pre.image_size)
    fast = optimised_for_cpu(model, shape, (runtime,))
    assert isinstance(fast, EXPECTED[runtime])  # built and passed its check, not the fallback
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for n in (1, 2, 5, 9):  # batch sizes the trace and the export never saw
            x = torch.randn(n, *shape, generator=g)
            diff = (_unit(fast(x)) - _unit(model(x))).abs().max()
            assert float(diff) <= TOLERANCE, (n, float(diff))


def test_onnxruntime_is_the_default(artefact: Path) -> None:
    model, manifest = load_artefact(artefact)
    pre = manifest.preprocessing
    assert isinstance(optimised_for_cpu(model, (pre.channels, *pre.image_size)), OnnxRuntimeForward)


def test_without_onnxruntime_the_traced_forward_is_served(
    artefact: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises
    model, manifest = load_artefact(artefact)
    pre = manifest.preprocessing
    with caplog.at_level("WARNING"):
        served = optimised_for_cpu(model, (pre.channels, *pre.image_size))
    assert isinstance(served, ChannelsLast)
    assert "onnxruntime not used: ModuleNotFoundError" in caplog.text


class Branchy(nn.Module):
    """Takes another path when its input is mostly negative: a trace or export freezes one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).flatten(1)
        return y if float(x.mean()) > 0 else -y


def test_a_model_no_runtime_can_reproduce_is_served_eagerly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = Branchy().eval()
    with caplog.at_level("WARNING"):
        served = optimised_for_cpu(model, (1, 8, 8))
    assert served is model
    for runtime in RUNTIMES:
        assert f"{runtime} not used" in caplog.text
    assert "serving the eager model" in caplog.text
