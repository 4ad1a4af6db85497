"""Fixtures for the service suite: a real artefact, real stores (SQLite and Redis), real apps.

The artefact is a seeded, untrained small CNN over sklearn's 8x8 digits, with tau calibrated on
its embeddings; the artefact contract test swaps in a trained one. Redis tests use the server on
127.0.0.1:6379 under a unique key prefix that is deleted afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from service.store import Decision
from service.store.sqlite import SQLiteStore
from tcm import (
    Baseline,
    Calibration,
    Manifest,
    Preprocessing,
    build_embedder,
    calibrate_threshold,
    consistency_report,
    read_manifest,
    retrieval_metrics,
    save_artefact,
    to_input_tensor,
)

REDIS_URL = os.environ.get("TCM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "test-admin-token-" + "x" * 16
DIM = 64
STORES = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]
# the store contract's own tests run on Redis Cluster too (the app-level suite on the two above)
ALL_STORES = [*STORES, pytest.param("cluster", marks=pytest.mark.redis)]


# --- the artefact ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # uint8 (n, 8, 8)
    labels: np.ndarray


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return Digits(images=images, labels=d.target.astype(np.int64))


@pytest.fixture(scope="session")
def artefact(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> Path:
    torch.manual_seed(0)
    model = build_embedder("small_cnn", in_channels=1, embedding_dim=DIM, width=16).eval()
    pre = Preprocessing(image_size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    with torch.no_grad():
        emb = model(to_input_tensor(list(digits.images), pre)).numpy()
    cal = calibrate_threshold(emb, digits.labels, target_far=1e-2)
    rep = consistency_report(emb, digits.labels)
    ret = retrieval_metrics(emb, digits.labels, ks=(1,))
    manifest = Manifest(
        model_version="digits-test-v1",
        architecture="small_cnn",
        architecture_kwargs={"in_channels": 1, "embedding_dim": DIM, "width": 16},
        preprocessing=pre,
        embedding_dim=DIM,
        calibration=Calibration(
            tau=cal.tau,
            target_far=cal.target_far,
            far_at_tau=cal.far,
            frr_at_tau=cal.frr,
            tau_lo=rep.tau_lo,
            tau_hi=rep.tau_hi,
        ),
        baseline=Baseline(
            opis=rep.opis,
            eps_opis=rep.eps_opis,
            eps=rep.eps,
            recall_at_1=ret["recall_at_1"],
            map_at_r=ret["map_at_r"],
            num_classes=10,
            num_images=len(digits.labels),
        ),
        dataset={"name": "sklearn digits"},
        created_at="2024-01-01T00:00:00Z",
    )
    out = tmp_path_factory.mktemp("artefact")
    save_artefact(out, model, manifest)
    return out


def make_version(artefact: Path, out: Path, version: str, seed: int) -> Path:
    """A copy of the test artefact with other weights under another version."""
    shutil.copytree(artefact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model_version"] = version
    manifest["baseline"]["opis"] = manifest["baseline"]["opis"] * (1 + seed / 100)
    (out / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(seed)
    save_artefact(
        out,
        build_embedder("small_cnn", in_channels=1, embedding_dim=DIM, width=16),
        read_manifest(out),
    )
    return out


# --- images ----------------------------------------------------------------------------------
def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64_png(arr: np.ndarray) -> str:
    return b64(png_bytes(arr))


def unit(seed: int, dim: int = DIM) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).tolist()


# --- stores and apps ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Redis Cluster of 3 masters with a replica each (``tests.service.rediscluster``),
    started once per session (per worker) and shared: tests keep to their own key prefix."""
    from tests.service.rediscluster import LocalCluster

    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is not installed: the Cluster tests start their own", pytrace=False
        )
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_server_binary() -> str:
    """The ``redis-server`` binary, for tests that start (and kill) their own Redis. Missing,
    those tests fail rather than skip: a skipped fault test is a fault nobody tested."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed (apt-get install redis-server): the Redis "
            "process tests start their own servers",
            pytrace=False,
        )
    return path


@pytest.fixture
def private_redis(tmp_path: Path, redis_server_binary: str) -> Iterator[Any]:
    """A redis-server of the test's own (on a free port), for counts no other client may
    disturb (command stats, bytes sent); killed afterwards."""
    from tests.service.store.test_redis_down import RedisProcess, free_port

    server = RedisProcess(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


def redis_cleanup(url: str, prefix: str) -> None:
    r = redis.Redis.from_url(url)
    try:
        pattern = prefix.replace("*", r"\*") + "*"
        keys = list(r.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            r.unlink(*keys[i : i + 500])
    finally:
        r.close()


def serve_process(kind: str, artefact: Path, workdir: Path, env: dict[str, str]) -> Iterator[str]:
    """A real ``tcm-serve`` process (``bench.soak.serve``) on ``kind``'s store: SQLite in
    ``workdir``, or Redis under its own key prefix, removed afterwards. Yields its base URL."""
    from bench import soak

    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    redis_kind = kind == "redis"
    store_url = REDIS_URL if redis_kind else f"sqlite:///{workdir / 'tcm.db'}"
    try:
        with soak.serve(
            artefact,
            store_url,
            workdir,
            redis_prefix=prefix if redis_kind else None,
            admin_token=ADMIN_TOKEN,
            extra_env=env,
        ) as srv:
            yield srv.base
    finally:
        if redis_kind:
            redis_cleanup(REDIS_URL, prefix)


@pytest.fixture
def store_settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], dict[str, Any]]]:
    """A factory: store kind (sqlite, redis, cluster) -> settings fields for a fresh, isolated
    store."""
    prefixes: list[tuple[str, Any]] = []

    def make(kind: str) -> dict[str, Any]:
        if kind == "sqlite":
            path = tmp_path_factory.mktemp("store") / "tcm.db"
            return {"store_url": f"sqlite:///{path}"}
        prefix = f"tcmtest:{uuid.uuid4().hex}:"
        cluster = request.getfixturevalue("redis_cluster") if kind == "cluster" else None
        prefixes.append((prefix, cluster))
        url = REDIS_URL if cluster is None else cluster.url
        return {"store_url": url, "redis_key_prefix": prefix}

    yield make
    for p, cluster in prefixes:
        if cluster is None:
            redis_cleanup(REDIS_URL, p)
        else:
            cluster.cleanup(p)


class CountingStore(SQLiteStore):
    """A real SQLite store that counts reads of decisions (the monitor's loads of labelled
    pairs), for tests that check what is read when."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads = 0

    def list_decisions(self, tenant_id: str, **kw: Any) -> list[Decision]:
        self.reads += 1
        return super().list_decisions(tenant_id, **kw)


@pytest.fixture
def sqlite_stores(tmp_path: Path) -> Iterator[Callable[[], CountingStore]]:
    """A factory of fresh SQLite stores in the test's directory, closed after the test."""
    made: list[CountingStore] = []

    def make() -> CountingStore:
        made.append(CountingStore(tmp_path / f"store-{len(made)}.db"))
        return made[-1]

    yield make
    for store in made:
        store.close()


def make_settings(artefact: Path, store: dict[str, Any], **over: Any) -> Settings:
    fields: dict[str, Any] = {
        "artefact_path": artefact,
        "admin_token": ADMIN_TOKEN,
        "device": "cpu",
        "embed_max_wait_ms": 2.0,
        "max_body_bytes": 2 * 1024 * 1024,
        "max_image_pixels": 512 * 512,
        "max_k": 50,
        "max_batch_items": 64,
        "max_enrol_items": 256,
        "store_timeout_s": 1.0,
        **store,
        **over,
    }
    return Settings(**fields)


@dataclass
class Api:
    """A TestClient with the admin token at hand and helpers to create tenants."""

    client: TestClient
    settings: Settings

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def new_tenant(self, name: str | None = None) -> Tenant:
        r = self.client.post(
            "/v1/tenants", json={"name": name or f"t-{secrets.token_hex(3)}"}, headers=self.admin
        )
        assert r.status_code == 201, r.text
        body = r.json()
        return Tenant(body["tenant_id"], body["api_key"], body["key_id"])

    def enrol(self, tenant: Tenant, items: list[dict[str, Any]]) -> list[str]:
        r = self.client.post("/v1/gallery", json={"items": items}, headers=tenant.auth)
        assert r.status_code == 201, r.text
        return r.json()["item_ids"]


@dataclass
class Tenant:
    tenant_id: str
    api_key: str
    key_id: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="module", params=STORES)
def api(
    request: pytest.FixtureRequest, artefact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """One running app per store kind, shared by a module's tests (each uses its own tenant)."""
    kind = request.param
    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    store = (
        {"store_url": f"sqlite:///{tmp_path_factory.mktemp('store') / 'tcm.db'}"}
        if kind == "sqlite"
        else {"store_url": REDIS_URL, "redis_key_prefix": prefix}
    )
    settings = make_settings(artefact, store)
    try:
        with TestClient(create_app(settings)) as client:
            yield Api(client, settings)
    finally:
        if kind == "redis":
            redis_cleanup(REDIS_URL, prefix)


@pytest.fixture
def tenant(api: Api) -> Tenant:
    return api.new_tenant()
