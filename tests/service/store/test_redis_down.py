"""Redis going away: 503 with a clear message, and recovery without restarting the service.

Runs its own redis-server on a free port (append-only file, fsync always, so the data outlives
the kill -9 as it would with a persistent production Redis).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import ADMIN_TOKEN, Digits, b64_png, make_settings, unit

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("redis_server_binary")]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    def __init__(self, port: int, data_dir: Path) -> None:
        self.port = port
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.data_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    srv = RedisProcess(free_port(), tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def test_redis_down_is_503_and_recovers(
    server: RedisProcess, artefact: Path, digits: Digits
) -> None:
    settings = make_settings(artefact, {"store_url": server.url}, store_timeout_s=0.5)
    with TestClient(create_app(settings)) as c:
        key = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        c.post(
            "/v1/gallery",
            headers=auth,
            json={
                "items": [
                    {"subject": "a", "embedding": unit(1), "item_id": "a1"},
                    {"subject": "d", "image": b64_png(digits.images[3]), "item_id": "d1"},
                ]
            },
        )
        query = {"embedding": unit(1), "k": 2}
        before = c.post("/v1/match", json=query, headers=auth).json()

        server.kill()
        started = time.monotonic()
        requests = [
            ("POST", "/v1/match", {"json": query}),
            ("POST", "/v1/gallery", {"json": {"items": [{"subject": "b", "embedding": unit(2)}]}}),
            ("GET", "/v1/gallery/a1", {}),
            ("POST", "/v1/verify", {"json": {"a": {"item_id": "a1"}, "b": {"subject": "d"}}}),
            ("POST", "/v1/feedback", {"json": {"match_id": before["match_id"], "correct": True}}),
        ]
        for method, path, kwargs in requests:
            r = c.request(method, path, headers=auth, **kwargs)
            assert r.status_code == 503, (path, r.text)
            body = r.json()
            assert body["code"] == "store_unavailable"
            assert "Redis store cannot be reached" in body["message"]
            assert r.headers["retry-after"] == "1"
        admin = c.post("/v1/tenants", json={"name": "u"}, headers=ADMIN)
        assert admin.status_code == 503
        assert time.monotonic() - started < 20, "a dead store must fail fast"
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["store"] != "ok"
        assert c.get("/healthz").status_code == 200  # the process itself is fine
        assert c.get("/v1/model").status_code == 200  # and needs no store

        server.start()
        assert c.get("/readyz").status_code == 200
        after = c.post("/v1/match", json=query, headers=auth).json()
        assert after["candidates"] == before["candidates"]
        assert after["decision"] == before["decision"]
        fb = c.post(
            "/v1/feedback", json={"match_id": before["match_id"], "correct": True}, headers=auth
        )
        assert fb.status_code == 201
        r = c.post(
            "/v1/gallery", json={"items": [{"subject": "b", "embedding": unit(2)}]}, headers=auth
        )
        assert r.status_code == 201
        assert "tcm_store_errors_total" in c.get("/metrics").text


def test_start_with_redis_down_then_recover(tmp_path: Path, artefact: Path) -> None:
    srv = RedisProcess(free_port(), tmp_path)
    settings = make_settings(artefact, {"store_url": srv.url}, store_timeout_s=0.3)
    try:
        with TestClient(create_app(settings)) as c:
            assert c.get("/healthz").status_code == 200
            ready = c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["indexes"] == "not loaded"
            r = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN)
            assert r.status_code == 503 and r.json()["code"] == "store_unavailable"

            srv.start()
            assert c.get("/readyz").status_code == 200
            key = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()["api_key"]
            auth = {"Authorization": f"Bearer {key}"}
            c.post(
                "/v1/gallery",
                json={"items": [{"subject": "a", "embedding": unit(1)}]},
                headers=auth,
            )
            m = c.post("/v1/match", json={"embedding": unit(1)}, headers=auth).json()
            assert m["decision"]["subject"] == "a"
    finally:
        srv.kill()


def test_hung_redis_times_out_as_503(server: RedisProcess, artefact: Path) -> None:
    """A server that stops answering (SIGSTOP: a partition, a stuck host) is a 503 within
    about the configured timeout, not a hung request."""

    settings = make_settings(artefact, {"store_url": server.url}, store_timeout_s=0.3)
    with TestClient(create_app(settings)) as c:
        key = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            r = c.post("/v1/match", json={"embedding": unit(1)}, headers=auth)
            assert r.status_code == 503 and r.json()["code"] == "store_unavailable"
            assert time.monotonic() - started < 5
        finally:
            server.proc.send_signal(signal.SIGCONT)
        r = c.post("/v1/match", json={"embedding": unit(1)}, headers=auth)
        assert r.status_code == 200
