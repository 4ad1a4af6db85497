"""The dynamic batcher on its own: shared forward passes, no delay for a lone request."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine.embedding import EmbeddingBatcher, resolve_device
from service.engine.preparing import PixelPreparer
from service.errors import InvalidInputError, NotReadyError
from tcm import load_artefact, to_input_tensor
from tests.service.conftest import Digits


def make(artefact: Path, **kw: object) -> tuple[EmbeddingBatcher, torch.nn.Module]:
    model, manifest = load_artefact(artefact)
    args = {"device": torch.device("cpu"), "max_batch": 8, "max_wait_s": 0.05} | kw
    prep = PixelPreparer(manifest.preprocessing)
    return EmbeddingBatcher(model, prep, **args), model  # type: ignore[arg-type]


def test_concurrent_requests_share_forward_passes(artefact: Path, digits: Digits) -> None:
    batcher, model = make(artefact)
    images = [digits.images[i] for i in range(20)]
    with torch.no_grad():
        ref = model(to_input_tensor(images, batcher.preparer.spec)).numpy()  # type: ignore[attr-defined]

    async def main() -> list[np.ndarray]:
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.embed([im]) for im in images))
        finally:
            await batcher.stop()

    out = asyncio.run(main())
    np.testing.assert_allclose(np.concatenate(out), ref, atol=1e-5)
    assert 1 < batcher.largest_batch <= 8
    assert batcher.batches_run < 20 and batcher.images_embedded == 20


def test_lone_request_is_not_delayed(artefact: Path, digits: Digits) -> None:
    batcher, _ = make(artefact, max_wait_s=2.0)

    async def main() -> float:
        await batcher.start()
        try:
            await batcher.embed([digits.images[0]])  # warm-up
            started = time.perf_counter()
            await batcher.embed([digits.images[1]])
            return time.perf_counter() - started
        finally:
            await batcher.stop()

    assert asyncio.run(main()) < 1.0  # far below max_wait: nobody else was coming


def test_failures_reach_every_caller_and_the_worker_survives(
    artefact: Path, digits: Digits
) -> None:
    batcher, model = make(artefact)
    calls = {"n": 0}
    forward = model.forward

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return forward(x)

    model.forward = flaky  # type: ignore[method-assign]

    async def main() -> None:
        await batcher.start()
        try:
            results = await asyncio.gather(
                *(batcher.embed([digits.images[i]]) for i in range(3)), return_exceptions=True
            )
            assert all(isinstance(r, RuntimeError) for r in results)
            ok = await batcher.embed([digits.images[0]])
            assert ok.shape == (1, 64)
            with pytest.raises(InvalidInputError):
                await batcher.embed([np.zeros((4, 4), np.float32)])  # not uint8
            with pytest.raises(InvalidInputError):
                await batcher.embed([])
        finally:
            await batcher.stop()
        with pytest.raises(NotReadyError):
            await batcher.embed([digits.images[0]])

    asyncio.run(main())


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
