"""Many clients at once: each gets its own right answer, and forward passes are shared."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from tcm import load_artefact, to_input_tensor
from tests.service.conftest import ADMIN_TOKEN, STORES, Digits, b64_png, make_settings, unit

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLIENTS = 16


@pytest.fixture(params=STORES)
def client(request: pytest.FixtureRequest, artefact: Path, store_settings) -> Iterator[TestClient]:
    # a generous wait so that concurrent requests reliably meet in one batch on a slow CI box
    settings = make_settings(
        artefact, store_settings(request.param), embed_max_wait_ms=25.0, embed_max_batch=64
    )
    with TestClient(create_app(settings)) as c:
        yield c


def batch_histogram(text: str) -> dict[str, float]:
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'tcm_embed_batch_images_bucket\{le="([^"]+)"\} (\S+)', text)
    }


def test_concurrent_clients_get_their_own_answers(
    client: TestClient, digits: Digits, artefact: Path
) -> None:
    c = client
    model, manifest = load_artefact(artefact)
    images = [digits.images[i] for i in range(CLIENTS * 2)]
    with torch.no_grad():
        ref = model(to_input_tensor(images, manifest.preprocessing)).numpy()

    # one tenant per client, enrolled concurrently
    tenants = []
    for i in range(CLIENTS):
        r = c.post("/v1/tenants", json={"name": f"c{i}"}, headers=ADMIN).json()
        tenants.append({"Authorization": f"Bearer {r['api_key']}"})

    def enrol(i: int) -> list[str]:
        items = [
            {"subject": f"client{i}", "image": b64_png(images[i]), "item_id": f"own-{i}"},
            {"subject": f"client{i}-vec", "embedding": unit(i), "item_id": f"vec-{i}"},
        ]
        r = c.post("/v1/gallery", json={"items": items}, headers=tenants[i])
        assert r.status_code == 201, r.text
        return r.json()["item_ids"]

    with ThreadPoolExecutor(CLIENTS) as pool:
        assert list(pool.map(enrol, range(CLIENTS))) == [
            [f"own-{i}", f"vec-{i}"] for i in range(CLIENTS)
        ]

    start = threading.Barrier(CLIENTS)  # everyone at once, so that requests meet in the batcher

    def work(i: int) -> None:
        auth = tenants[i]
        start.wait(timeout=30)
        for _ in range(3):
            e = c.post(
                "/v1/embed",
                json={"images": [b64_png(images[i]), b64_png(images[CLIENTS + i])]},
                headers=auth,
            )
            assert e.status_code == 200, e.text
            np.testing.assert_allclose(e.json()["embeddings"], ref[[i, CLIENTS + i]], atol=1e-5)
            m = c.post("/v1/match", json={"image": b64_png(images[i]), "k": 5}, headers=auth).json()
            assert next(x["item_id"] for x in m["candidates"]) == f"own-{i}"
            assert {x["subject"] for x in m["candidates"]} <= {f"client{i}", f"client{i}-vec"}
            assert m["decision"]["subject"] == f"client{i}"
            v = c.post("/v1/match", json={"embedding": unit(i), "k": 5}, headers=auth).json()
            assert v["decision"]["subject"] == f"client{i}-vec"
            ver = c.post(
                "/v1/verify",
                json={"a": {"image": b64_png(images[CLIENTS + i])}, "b": {"item_id": f"own-{i}"}},
                headers=auth,
            )
            assert ver.json()["score"] == pytest.approx(float(ref[CLIENTS + i] @ ref[i]), abs=1e-5)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(work, range(CLIENTS)))

    batcher = c.app.state.runtime.serving.batcher
    assert batcher.largest_batch > 1, "concurrent requests never shared a forward pass"
    hist = batch_histogram(c.get("/metrics").text)
    assert hist["+Inf"] > hist["1.0"], hist  # some batches held more than one image
    assert hist["+Inf"] < CLIENTS * 3 * 4 + 2 * CLIENTS  # fewer passes than image requests
    sizes = c.app.state.runtime.serving.indexes.sizes()
    assert all(n == 2 for n in sizes.values()) and len(sizes) == CLIENTS


def test_large_requests_are_split_into_batches(
    client: TestClient, digits: Digits, artefact: Path
) -> None:
    c = client
    r = c.post("/v1/tenants", json={"name": "big"}, headers=ADMIN).json()
    auth = {"Authorization": f"Bearer {r['api_key']}"}
    batcher = c.app.state.runtime.serving.batcher
    batcher.max_batch = 8  # smaller than the request
    batcher.largest_batch = 0
    images = [digits.images[i] for i in range(30)]
    e = c.post("/v1/embed", json={"images": [b64_png(i) for i in images]}, headers=auth)
    assert e.status_code == 200
    model, manifest = load_artefact(artefact)
    with torch.no_grad():
        ref = model(to_input_tensor(images, manifest.preprocessing)).numpy()
    np.testing.assert_allclose(e.json()["embeddings"], ref, atol=1e-5)
    assert batcher.largest_batch == 8
