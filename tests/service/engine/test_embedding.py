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


def test_images_at_the_models_size_join_without_a_thread_hop(
    artefact: Path, digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 32: only the forward pass goes to a thread when the images need no staging; an
    image of another size is staged in one. The embeddings are the same either way."""
    from service.engine import embedding

    batcher, model = make(artefact)
    hops: list[str] = []
    real = embedding.run_in_threadpool

    async def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(getattr(fn, "__name__", "?"))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(embedding, "run_in_threadpool", counting)
    h, w = batcher.preparer.spec.image_size  # type: ignore[attr-defined]
    at_size = np.kron(digits.images[0], np.ones((4, 4), np.uint8))[:h, :w]  # the model's size
    bigger = np.kron(at_size, np.ones((2, 2), np.uint8))  # resized when staged
    assert batcher.preparer.ready(at_size) and not batcher.preparer.ready(bigger)

    async def main() -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
        await batcher.start()
        try:
            a = await batcher.embed([at_size])
            first = list(hops)
            b = await batcher.embed([bigger])
            return a, first, b, hops[len(first) :]
        finally:
            await batcher.stop()

    a, first_hops, b, second_hops = asyncio.run(main())
    assert first_hops == ["_forward"]
    assert len(second_hops) == 2 and second_hops[1] == "_forward"
    with torch.no_grad():
        ref = model(to_input_tensor([at_size, bigger], batcher.preparer.spec)).numpy()  # type: ignore[attr-defined]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(np.concatenate([a, b]), ref, atol=1e-6)
