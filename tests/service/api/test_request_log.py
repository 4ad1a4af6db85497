"""Secrets a client puts in a URL never reach the server's log (issue 25, item 10).

A real ``tcm-serve`` process (its own stdout and stderr, read whole after it stopped) is sent a
tenant API key and the admin token in URLs (``GET /v1/gallery/<key>``, ``?subject=<key>``,
``?token=<admin token>``, ...) among ordinary requests. uvicorn's access log printed each raw
path and query (and every request was logged twice: there and by the app). Now: no secret
anywhere in the output, exactly one log line per request, each one JSON object with the
request's id, method, route template, status, duration and redacted path (ids and query names
kept), and one start-up line naming the store (without its password) and the model.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import string
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.service.conftest import redis_cleanup, unit
from tests.service.store.test_redis_down import free_port

REDACTED = "[redacted]"
REDIS_PASSWORD = "redis-pw-" + secrets.token_hex(8)
REQUEST_FIELDS = {
    "ts",
    "level",
    "logger",
    "event",
    "request_id",
    "method",
    "route",
    "path",
    "status",
    "duration_ms",
}


class Server:
    def __init__(self, artefact: Path, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.out_path, self.err_path = workdir / "stdout.log", workdir / "stderr.log"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "info",
                ],
                env=env,
                stdout=out,
                stderr=err,
            )
        self.answered: list[str] = []  # the X-Request-ID of every request that got an answer
        self._n = 0

    def request(
        self, method: str, target: str, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        """``target`` goes on the wire as written (httpx would re-quote a path)."""
        self._n += 1
        rid = f"req-{self._n}"
        headers = {"X-Request-ID": rid} | ({"Authorization": f"Bearer {token}"} if token else {})
        r = httpx.request(method, self.base + target, headers=headers, timeout=30, **kwargs)
        self.answered.append(rid)
        return r

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"tcm-serve exited:\n{self.output()[-3000:]}"
            try:
                if self.request("GET", "/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet: not a request the server saw
            assert time.monotonic() < deadline, "tcm-serve did not become ready"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")


@pytest.mark.redis
def test_secrets_in_urls_never_reach_the_log(artefact: Path, tmp_path: Path) -> None:
    admin_token = "admin-" + secrets.token_hex(20)  # one case: only its exact value can match
    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCM_")}
    env |= {
        "TCM_ARTEFACT_PATH": str(artefact),
        "TCM_DEVICE": "cpu",
        "TCM_STORE_URL": f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6379/0",
        "TCM_REDIS_KEY_PREFIX": prefix,
        "TCM_ADMIN_TOKEN": admin_token,
        "TCM_MONITOR_ENABLED": "false",
    }
    server = Server(artefact, tmp_path, env)
    bearer_like = secrets.token_urlsafe(32)
    try:
        server.wait_ready()
        r = server.request("POST", "/v1/tenants", admin_token, json={"name": "t"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        r = server.request(
            "POST",
            "/v1/gallery",
            key,
            json={
                "items": [
                    {"subject": "subject-1", "item_id": "item-visible-1", "embedding": unit(1)}
                ]
            },
        )
        assert r.status_code == 201, r.text
        expected_paths = {}  # request id -> the path the log line must show

        def send(
            method: str,
            target: str,
            token: str | None,
            status: int,
            logged: str | None = None,
            **kwargs: Any,
        ) -> None:
            r = server.request(method, target, token, **kwargs)
            assert r.status_code == status, (target, r.text)
            if logged is not None:
                expected_paths[server.answered[-1]] = logged

        # ordinary requests: ids and query names and values stay readable
        send("GET", "/v1/gallery/item-visible-1", key, 200, "/v1/gallery/item-visible-1")
        send(
            "GET",
            "/v1/gallery?limit=5&subject=subject-1",
            key,
            200,
            "/v1/gallery?limit=5&subject=subject-1",
        )
        send("GET", "/healthz", None, 200, "/healthz")
        send("GET", "/metrics", None, 200, "/metrics")
        # the attacks of the review: a key in the path, a key in a query, the admin token
        send("GET", f"/v1/gallery/{key}", key, 404, f"/v1/gallery/{REDACTED}")
        send("GET", f"/v1/gallery/{key}", None, 401, f"/v1/gallery/{REDACTED}")
        send(
            "GET",
            f"/v1/gallery?subject={key}&limit=5",
            key,
            200,
            f"/v1/gallery?subject={REDACTED}&limit=5",
        )
        send("GET", f"/v1/tenants?token={admin_token}", None, 401, f"/v1/tenants?token={REDACTED}")
        # and their variants: encoded, under other names, a tampered key, a random token
        send(
            "GET",
            "/v1/gallery/" + quote(key, safe="").replace("t", "%74", 1),
            key,
            404,
            f"/v1/gallery/{REDACTED}",
        )
        send("GET", f"/v1/tenants/{admin_token}", admin_token, 404, f"/v1/tenants/{REDACTED}")
        send("GET", f"/v1/models?admin={admin_token}", None, 401, f"/v1/models?admin={REDACTED}")
        send("GET", "/v1/gallery?api_key=short", None, 401, f"/v1/gallery?api_key={REDACTED}")
        send("GET", f"/v1/gallery?cursor={bearer_like}", key, 422, f"/v1/gallery?cursor={REDACTED}")
        send("GET", f"/v1/gallery/{key[:-5]}", key, 404, f"/v1/gallery/{REDACTED}")
        send("GET", f"/nowhere/{key}?x=1", None, 404, f"/nowhere/{REDACTED}?x=1")
        send(
            "POST",
            f"/v1/match?token={key}",
            key,
            200,
            f"/v1/match?token={REDACTED}",
            json={"embedding": unit(1)},
        )
    finally:
        server.stop()
        redis_cleanup(f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6379/0", prefix)

    stdout, stderr = server.out_path.read_text(), server.err_path.read_text()
    named = {
        "tenant key": key,
        "its secret": key.split("_", 2)[2],
        "tampered key": key[:-5],
        "admin token": admin_token,
        "random token": bearer_like,
        "Redis password": REDIS_PASSWORD,
    }
    leaked = [
        (what, ln[:60])
        for what, s in named.items()
        for ln in (stdout + stderr).splitlines()
        if s in ln
    ]
    assert not leaked, f"secrets in the log (shown cut short): {leaked[:5]}"
    lines = [ln for ln in (stdout + stderr).splitlines() if ln.strip()]
    records = []
    for ln in lines:  # tcm-serve's log is structured: every line one JSON object
        rec = json.loads(ln)
        assert isinstance(rec, dict) and {"ts", "level", "logger"} <= set(rec), ln
        records.append(rec)
    requests = [rec for rec in records if rec.get("event") == "request"]
    # exactly one line per request: no access log line, nothing logged twice
    assert sorted(rec["request_id"] for rec in requests) == sorted(server.answered)
    assert not [
        ln
        for ln in lines
        if '"event": "request"' not in ln and ("/v1/" in ln or "HTTP/1.1" in ln or "req-" in ln)
    ]
    by_id = {rec["request_id"]: rec for rec in requests}
    for rec in requests:
        assert set(rec) == REQUEST_FIELDS, rec
        assert rec["logger"] == "service.requests" and rec["level"] == "INFO"
        assert isinstance(rec["status"], int) and isinstance(rec["duration_ms"], float)
        assert rec["method"] in ("GET", "POST") and rec["path"].startswith("/")
    for rid, path in expected_paths.items():
        assert by_id[rid]["path"] == path, by_id[rid]
    item = next(rec for rec in requests if rec["path"] == "/v1/gallery/item-visible-1")
    assert (item["route"], item["status"]) == ("/v1/gallery/{item_id}", 200)
    assert (
        by_id[next(r for r, p in expected_paths.items() if p.startswith("/nowhere"))]["route"]
        == "unmatched"
    )
    startup = [rec for rec in records if rec.get("event") == "startup"]
    assert len(startup) == 1, startup
    assert startup[0]["store"] == "redis://127.0.0.1:6379/0"
    assert startup[0]["model_version"] == "digits-test-v1"


@pytest.mark.parametrize(
    "target,known,logged",
    [
        ("/v1/gallery/tcm_0123456789abcdef_" + "A1b" * 14 + "c", (), "/v1/gallery/[redacted]"),
        ("/v1/gallery/item-1", (), "/v1/gallery/item-1"),
        (
            "/v1/gallery/" + "3f2b8c1e9d7a4b6c8e0f1a2b3c4d5e6f",
            (),
            None,
        ),  # uuid hex: an id, not a secret
        ("/v1/gallery/" + "0123456789ABCDEF" * 4, (), None),  # upper-case hex too
        ("/v1/subjects/alice.smith@example.com", (), None),
        (
            "/v1/tenants/x?token=t&Key=k&limit=3&x_api_key=z&sentinel_password=p",
            (),
            "/v1/tenants/x?token=[redacted]&Key=[redacted]&limit=3&x_api_key=[redacted]"
            "&sentinel_password=[redacted]",
        ),
        ("/v1/gallery?q=Bearer%20abcdefghij", (), "/v1/gallery?q=[redacted]"),
        ("/v1/gallery?tcm_0123456789abcdef_abcdefghij", (), "/v1/gallery?[redacted]"),
        ("/v1/a%252Fb/admin%2Dtoken%2D123456", ("admin-token-123456",), "/v1/a%252Fb/[redacted]"),
        ("/v1/x/admin/token-123456", ("admin/token-123456",), "[redacted]"),  # split by a '/'
    ],
)
def test_redact_target(target: str, known: tuple[str, ...], logged: str | None) -> None:
    from service.logs import redact_target

    path, _, query = target.partition("?")
    assert redact_target(path, query, known) == (target if logged is None else logged)


def test_looks_secret_random_tokens_but_not_ids() -> None:
    from service.logs import looks_secret

    rng = random.Random(0)  # deterministic draws of token_urlsafe(32)-like strings
    alphabet = string.ascii_letters + string.digits + "-_"
    assert all(looks_secret("".join(rng.choices(alphabet, k=43))) for _ in range(1000))
    assert not any(looks_secret(uuid.uuid4().hex) for _ in range(1000))
    assert not any(looks_secret(str(uuid.uuid4()).upper()) for _ in range(1000))
    for an_id in (
        "digits-test-v1",
        "0123456789abcdef",
        "Alice-Smith-passport-scan-2024-front",
        "a" * 128,
        "photo_2024_06_01_front_camera_left_side",
    ):
        assert not looks_secret(an_id), an_id


@pytest.mark.parametrize(
    "url,shown",
    [
        ("redis://:pw@10.0.0.1:6379/2", "redis://10.0.0.1:6379/2"),
        (
            "rediss://user:pw@cache.example:6380/0?ssl_cert_reqs=none",
            "rediss://cache.example:6380/0",
        ),
        ("redis://h:6379/0?password=pw", "redis://h:6379/0"),
        ("unix:///run/redis.sock?password=pw&db=1", "unix:///run/redis.sock"),
        (
            "redis+sentinel://u:p%40w@s1:26379,s2:26379/mymaster/1?sentinel_password=sp",
            "redis+sentinel://s1:26379,s2:26379/mymaster/1",
        ),
        ("sqlite:///./data/tcm.db", "sqlite:///./data/tcm.db"),
    ],
)
def test_store_location_drops_credentials(url: str, shown: str) -> None:
    from service.settings import store_location

    assert store_location(url) == shown
