"""Decoding and staging in worker processes (issue 32): the same pixels as the request's
thread, the same errors, a dead worker survived, and the same embeddings over HTTP."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.engine.decoding import DecodePool, decode_processes_for
from service.engine.preparing import PixelPreparer, decode_for
from service.errors import InvalidInputError
from tcm import Preprocessing
from tests.service.conftest import ADMIN_TOKEN, Digits, b64, b64_png, make_settings, png_bytes

SPEC = Preprocessing(image_size=(32, 28), channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
MAX_PIXELS = 4096 * 4096


def _file(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _files() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    shapes = [(32, 28, 3), (35, 31, 3), (300, 260, 3), (32, 28), (17, 50)]
    out = []
    for i, shape in enumerate(shapes):
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        out.append((f"images[{2 * i}]", _file(arr, "PNG")))
        out.append((f"images[{2 * i + 1}]", _file(arr, "JPEG")))
    return out


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    p = DecodePool(2)
    p.warm()
    yield p
    p.close()


def _in_thread(raws: list[tuple[str, bytes]]) -> list[np.ndarray]:
    prep = PixelPreparer(SPEC)
    return [
        prep.stage([decode_for(prep, raw, max_pixels=MAX_PIXELS, where=w)], [w])[0][0]
        for w, raw in raws
    ]


def test_workers_stage_exactly_what_the_requests_thread_stages(pool: DecodePool) -> None:
    raws = _files()
    got = asyncio.run(pool.stage(raws, SPEC, max_pixels=MAX_PIXELS))
    want = _in_thread(raws)
    assert len(got) == len(want) == 10
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g, w)
    # images at the model's size stay uint8 (converted on the device), others are resized
    assert got[0].dtype == np.uint8 and got[2].dtype == np.float32


def test_a_bad_image_gets_the_same_error_as_in_the_requests_thread(pool: DecodePool) -> None:
    raws = [_files()[0], ("images[1]", b"%PDF-1.4 not an image"), ("images[2]", b"")]
    with pytest.raises(InvalidInputError) as in_pool:
        asyncio.run(pool.stage(raws, SPEC, max_pixels=MAX_PIXELS))
    with pytest.raises(InvalidInputError) as in_thread:
        _in_thread(raws)
    assert in_pool.value.code == in_thread.value.code == "invalid_image"
    assert in_pool.value.message == in_thread.value.message
    assert "images[1]" in in_pool.value.message and "PDF" in in_pool.value.message
    big = [("images[0]", _files()[4][1])]  # 300 x 260 pixels
    with pytest.raises(InvalidInputError) as too_big:
        asyncio.run(pool.stage(big, SPEC, max_pixels=1000))
    assert too_big.value.code == "image_too_large"
    assert too_big.value.detail["max_pixels"] == 1000


def test_dead_workers_are_replaced_and_the_request_still_answered() -> None:
    pool = DecodePool(2)
    try:
        pids = pool.warm()
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        raws = _files()[:4]
        got = asyncio.run(pool.stage(raws, SPEC, max_pixels=MAX_PIXELS))
        assert all(np.array_equal(g, w) for g, w in zip(got, _in_thread(raws), strict=True))
        assert pool.rebuilt == 1
        assert set(pool.pids()).isdisjoint(pids)
    finally:
        pool.close()


def test_a_closed_pool_refuses_with_503_instead_of_hanging() -> None:
    from service.errors import NotReadyError

    pool = DecodePool(1)
    pool.close()
    with pytest.raises(NotReadyError, match="stopped"):
        asyncio.run(pool.stage(_files()[:2], SPEC, max_pixels=MAX_PIXELS))


def test_auto_means_processes_on_cuda_only() -> None:
    assert decode_processes_for(-1, "cpu") == 0
    assert decode_processes_for(-1, "cuda") == max(1, min(8, len(os.sched_getaffinity(0)) - 1))
    assert decode_processes_for(3, "cpu") == 3
    assert decode_processes_for(0, "cuda") == 0
    with pytest.raises(ValueError):
        DecodePool(0)


def test_the_api_embeds_the_same_with_decoding_processes(
    artefact: Path, digits: Digits, tmp_path: Path
) -> None:
    images = [digits.images[i] for i in range(12)]
    bodies = {"images": [b64_png(im) for im in images]}
    bad = {"images": [b64_png(images[0]), b64(b"<svg></svg>")]}
    out: dict[int, tuple[np.ndarray, dict[str, object]]] = {}
    for processes in (0, 2):
        store = {"store_url": f"sqlite:///{tmp_path / f'p{processes}.db'}"}
        settings = make_settings(artefact, store, decode_processes=processes)
        with TestClient(create_app(settings)) as c:
            runtime = c.app.state.runtime  # type: ignore[attr-defined]
            assert (runtime.decoding is not None) == (processes > 0)
            key = _tenant_key(c)
            auth = {"Authorization": f"Bearer {key}"}
            r = c.post("/v1/embed", json=bodies, headers=auth)
            assert r.status_code == 200, r.text
            up = c.post(
                "/v1/embed/upload",
                files={"file": ("a.png", png_bytes(images[3]), "image/png")},
                headers=auth,
            )
            assert up.status_code == 200, up.text
            refused = c.post("/v1/embed", json=bad, headers=auth)
            assert refused.status_code == 422
            emb = np.asarray(r.json()["embeddings"])
            np.testing.assert_allclose(up.json()["embeddings"][0], emb[3], atol=1e-6)
            out[processes] = (emb, refused.json())
    np.testing.assert_allclose(out[2][0], out[0][0], atol=1e-6)
    assert out[2][1] == out[0][1]
    assert "SVG" in str(out[2][1])


def _tenant_key(c: TestClient) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = c.post("/v1/tenants", json={"name": "t"}, headers=admin)
    assert r.status_code == 201, r.text
    return str(r.json()["api_key"])
