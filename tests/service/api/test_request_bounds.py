"""One request's memory is bounded: verify by subject, and pixel bombs, in a real process.

Regressions (issue 15), measured as the growth of a real ``tcm-serve`` process's peak RSS
(``VmHWM``, reset through ``/proc/<pid>/clear_refs`` before each request) over one request:

- ``{"a": {"subject": "big"}, "b": {"subject": "big"}}`` with 16,000 items under one subject
  took 386 MB -> 1.43 GB (a full ``a @ b.T``). Scaled here to 8,000 items: the old code built a
  256 MB score matrix; tiles keep the growth under 64 MB.
- 256 copies of a 16 KB all-black 4096 x 4096 PNG in one 5.4 MB ``/v1/embed`` body: 4.8 GB
  peak. Now 413 ``too_many_pixels`` from the headers, before any pixel is decoded; and a request
  just within the budget (8 such images) decodes them one at a time, shrunk as decoded: the
  old code held all 8 (128 MB of pixels, plus float copies); the bound is 96 MB.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from bench.soak import ServerProcess, serve
from service.domain.tenants import new_key
from service.engine.images import decode_image
from service.engine.pairwise import max_inner_product
from service.store import NewItem, Tenant
from service.store.sqlite import SQLiteStore
from tcm import Preprocessing, to_input_tensor
from tests.service.conftest import DIM, Api, make_settings, unit

BIG = 8000
SIDE = 4096
BUDGET_IMAGES = 8
VERIFY_BOUND_MB = 64
PIXELS_BOUND_MB = 96


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_growth_mb(server: ServerProcess, request) -> tuple[float, httpx.Response]:
    """Peak RSS growth of the server over ``request()``: VmHWM reset to the current RSS first."""
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")
    before = _status_mb(server.pid, "VmRSS")
    response = request()
    return _status_mb(server.pid, "VmHWM") - before, response


@dataclass
class World:
    server: ServerProcess
    auth: dict[str, str]
    vectors: np.ndarray


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, artefact: Path) -> Iterator[World]:
    """One ``tcm-serve`` on a SQLite store holding a tenant with one 8,000-item subject."""
    tmp = tmp_path_factory.mktemp("bounds")
    db = tmp / "tcm.db"
    store = SQLiteStore(db)
    tid = "t" * 32
    key, token = new_key(tid, time.time())
    store.create_tenant(Tenant(tid, "big", time.time()), key)
    vectors = np.random.default_rng(0).standard_normal((BIG, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for start in range(0, BIG, 1000):
        batch = [NewItem(f"i{i}", "big", vectors[i], {}, None) for i in range(start, start + 1000)]
        store.add_items(tid, batch, model_version="digits-test-v1", created_at=time.time())
    store.close()
    env = {
        "TCM_MAX_VERIFY_PAIRS": str(BIG * BIG),
        "TCM_MAX_IMAGE_PIXELS": str(SIDE * SIDE),
        "TCM_MAX_REQUEST_PIXELS": str(BUDGET_IMAGES * SIDE * SIDE),
        "TCM_MONITOR_ENABLED": "false",
    }
    with serve(artefact, f"sqlite:///{db}", tmp, extra_env=env) as server:
        yield World(server, {"Authorization": f"Bearer {token}"}, vectors)


def _post(world: World, path: str, body: dict) -> httpx.Response:
    return httpx.post(world.server.base + path, headers=world.auth, json=body, timeout=120)


@pytest.mark.slow
def test_verify_big_subject_against_itself_stays_within_memory(world: World) -> None:
    # warm-up: the same subject loaded and scored against one vector (O(n) memory)
    r = _post(world, "/v1/verify", {"a": {"subject": "big"}, "b": {"embedding": unit(1)}})
    assert r.status_code == 200, r.text
    grown, r = peak_growth_mb(
        world.server,
        lambda: _post(world, "/v1/verify", {"a": {"subject": "big"}, "b": {"subject": "big"}}),
    )
    assert r.status_code == 200, r.text
    expected = float((world.vectors @ world.vectors.T).max())
    assert r.json()["score"] == pytest.approx(min(1.0, expected), abs=1e-5)
    print(f"verify {BIG} x {BIG} pairs: peak RSS grew {grown:.1f} MB (bound {VERIFY_BOUND_MB})")
    assert grown < VERIFY_BOUND_MB


@pytest.fixture(scope="module")
def black_png() -> str:
    buf = io.BytesIO()
    Image.new("L", (SIDE, SIDE)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 20_000  # the 16 KB all-black image
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_pixel_bomb_is_413_before_decoding(world: World, black_png: str) -> None:
    small = base64.b64encode(_png(np.zeros((8, 8), np.uint8))).decode()
    assert _post(world, "/v1/embed", {"images": [small]}).status_code == 200  # warm-up
    body = {"images": [black_png] * 256}  # ~5.6 MB of JSON, 4.3 gigapixels
    grown, r = peak_growth_mb(world.server, lambda: _post(world, "/v1/embed", body))
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "too_many_pixels"
    assert r.json()["detail"]["pixels"] == 256 * SIDE * SIDE
    print(f"256 x {SIDE}^2 PNG: 413, peak RSS grew {grown:.1f} MB")
    assert grown < PIXELS_BOUND_MB
    items = [{"subject": "bomb", "image": black_png}] * (BUDGET_IMAGES + 1)
    r = _post(world, "/v1/gallery", {"items": items})
    assert r.status_code == 413 and r.json()["code"] == "too_many_pixels", r.text


@pytest.mark.slow
def test_images_within_the_budget_are_decoded_one_at_a_time(world: World, black_png: str) -> None:
    body = {"images": [black_png] * BUDGET_IMAGES}  # exactly the budget
    _post(world, "/v1/embed", {"images": [black_png]})  # warm-up of the decoder's buffers
    grown, r = peak_growth_mb(world.server, lambda: _post(world, "/v1/embed", body))
    assert r.status_code == 200, r.text
    embeddings = np.array(r.json()["embeddings"])
    assert embeddings.shape == (BUDGET_IMAGES, DIM)
    assert np.allclose(embeddings, embeddings[0], atol=1e-6)
    print(f"{BUDGET_IMAGES} x {SIDE}^2 PNG: peak RSS grew {grown:.1f} MB")
    assert grown < PIXELS_BOUND_MB


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_shrinking_changes_nothing_for_ordinary_images_and_little_for_huge_ones() -> None:
    """Images up to 8x the model's input decode exactly as without shrinking; a huge smooth
    image gives nearly the same input tensor either way (PNG via reduce, JPEG via draft)."""
    rng = np.random.default_rng(0)
    spec = Preprocessing(image_size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    for size in (8, 64, 127):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        for raw in (_png(arr), _jpeg(arr)):
            exact = decode_image(raw, channels=1, max_pixels=10**8, where="x")
            shrunk = decode_image(raw, channels=1, max_pixels=10**8, where="x", target=(16, 16))
            assert np.array_equal(exact, shrunk)
    y, x = np.mgrid[0:2048, 0:2048] / 2048.0
    smooth = (127 + 100 * np.sin(6 * x) * np.cos(4 * y)).astype(np.uint8)
    for raw in (_png(smooth), _jpeg(smooth)):
        exact = decode_image(raw, channels=1, max_pixels=10**8, where="x")
        shrunk = decode_image(raw, channels=1, max_pixels=10**8, where="x", target=(16, 16))
        assert shrunk.shape[0] < exact.shape[0] // 4  # it was shrunk ...
        diff = (to_input_tensor(exact, spec) - to_input_tensor(shrunk, spec)).abs().max()
        assert float(diff) < 0.02  # ... and the model sees nearly the same input


def test_pairs_over_the_cap_are_422(artefact: Path, store_settings) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = make_settings(artefact, store_settings("sqlite"), max_verify_pairs=12)
    with TestClient(create_app(settings)) as c:
        api = Api(c, settings)
        t = api.new_tenant()
        api.enrol(t, [{"subject": "a", "embedding": unit(i)} for i in range(4)])
        api.enrol(t, [{"subject": "b", "embedding": unit(10 + i)} for i in range(3)])
        api.enrol(t, [{"subject": "c", "embedding": unit(20 + i)} for i in range(4)])
        ab = {"a": {"subject": "a"}, "b": {"subject": "b"}}
        ok = c.post("/v1/verify", json=ab, headers=t.auth)
        assert ok.status_code == 200, ok.text  # 12 pairs: at the cap
        ac = {"a": {"subject": "a"}, "b": {"subject": "c"}}
        r = c.post("/v1/verify", json=ac, headers=t.auth)
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "too_many_pairs"
        assert r.json()["detail"] == {"pairs": 16, "max_verify_pairs": 12}


def test_request_pixel_budget_must_fit_one_image(artefact: Path) -> None:
    with pytest.raises(ValueError, match="max_request_pixels"):
        make_settings(artefact, {}, max_image_pixels=100, max_request_pixels=99)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 5), st.data())
def test_max_inner_product_matches_the_full_matrix(n, m, d, block, data) -> None:
    """Oracle: ``(a @ b.T).max()``, for every tiling (blocks smaller, equal, larger)."""
    floats = st.floats(-4, 4, width=32, allow_nan=False)
    a = data.draw(arrays(np.float32, (n, d), elements=floats))
    b = data.draw(arrays(np.float32, (m, d), elements=floats))
    assert max_inner_product(a, b, block=block) == float((a @ b.T).max())


def _modes() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, (512, 512), dtype=np.uint8)
    rgb = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    images = {
        "png16": (Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "palette": (Image.fromarray(rgb).convert("P"), "PNG"),
        "1bit": (Image.fromarray(grey).convert("1"), "PNG"),
        "cmyk-jpeg": (Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "rgba-webp": (Image.fromarray(rgb).convert("RGBA"), "WEBP"),
        "int32-tiff": (Image.fromarray(grey.astype(np.int32)), "TIFF"),
        "float-tiff": (Image.fromarray(grey.astype(np.float32) / 255), "TIFF"),
    }
    out = {}
    for name, (img, fmt) in images.items():
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_is_shrunk_while_decoded(channels: int) -> None:
    for name, raw in _modes().items():
        arr = decode_image(raw, channels=channels, max_pixels=10**8, where=name, target=(16, 16))
        assert arr.shape[:2] == (64, 64) and arr.dtype == np.uint8, name
        assert arr.ndim == (2 if channels == 1 else 3), name
