"""What a real ``tcm-serve`` writes when its Redis store has a password in the URL
(``redis://:<password>@host``, the form of issue 30's review), at ``info`` and ``debug``, through
start-up, requests and the store going down: the password never appears, the start-up line
names the store without it and the model version, and each request is one JSON line (no
uvicorn access line beside it), its Authorization header nowhere."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tcm import read_manifest
from tests.service.conftest import unit
from tests.service.store.test_redis_down import free_port

ROOT = Path(__file__).resolve().parents[2]


def start_redis(port: int, password: str, workdir: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", str(workdir), "--requirepass", password),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run(
            ["redis-cli", "-p", str(port), "-a", password, "--no-auth-warning", "ping"],
            capture_output=True,
            text=True,
        )
        if r.stdout.strip() == "PONG":
            return proc
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("level", ["info", "debug"])
def test_store_password_and_credentials_never_logged(
    artefact: Path, tmp_path: Path, redis_server_binary: str, level: str
) -> None:
    password = "pw-" + secrets.token_hex(12)
    admin_token = "admin-" + secrets.token_hex(16)
    redis_port, port = free_port(), free_port()
    redis_proc = start_redis(redis_port, password, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCM_")}
    env |= {
        "TCM_ARTEFACT_PATH": str(artefact),
        "TCM_DEVICE": "cpu",
        "TCM_STORE_URL": f"redis://:{password}@127.0.0.1:{redis_port}/0",
        "TCM_ADMIN_TOKEN": admin_token,
        "TCM_MONITOR_ENABLED": "false",
        "TCM_STORE_TIMEOUT_S": "0.5",
    }
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "wb") as o, open(err, "wb") as e:
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "service.cli", "--host", "127.0.0.1"),
                *("--port", str(port), "--log-level", level),
            ],
            cwd=ROOT,
            env=env,
            stdout=o,
            stderr=e,
        )
    base = f"http://127.0.0.1:{port}"
    answered = 0
    key = ""
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, err.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    answered += 1
                    break
                answered += 1
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "tcm-serve did not become ready"
            time.sleep(0.2)
        admin = {"Authorization": f"Bearer {admin_token}"}
        r = httpx.post(f"{base}/v1/tenants", json={"name": "t"}, headers=admin, timeout=30)
        answered += 1
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        tenant = {"Authorization": f"Bearer {key}"}
        item = {"subject": "s", "item_id": "i-1", "embedding": unit(1)}
        r = httpx.post(f"{base}/v1/gallery", json={"items": [item]}, headers=tenant, timeout=30)
        answered += 1
        assert r.status_code == 201, r.text
        r = httpx.post(f"{base}/v1/match", json={"embedding": unit(1)}, headers=tenant, timeout=30)
        answered += 1
        assert r.status_code == 200, r.text
        # the store goes away: the errors it causes are logged, the password still not
        redis_proc.kill()
        redis_proc.wait(timeout=10)
        for _ in range(3):
            r = httpx.get(f"{base}/v1/gallery/i-1", headers=tenant, timeout=30)
            answered += 1
            assert r.status_code == 503, r.text
    finally:
        if redis_proc.poll() is None:
            redis_proc.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)

    text = out.read_text() + err.read_text()
    for what, secret in {
        "Redis password": password,
        "admin token": admin_token,
        "tenant key": key,
        "its secret": key.split("_", 2)[2],
    }.items():
        assert secret not in text, f"the {what} is in the log"
    records = [json.loads(ln) for ln in err.read_text().splitlines() if ln.strip()]
    assert all({"ts", "level", "logger"} <= set(r) for r in records)
    (startup,) = [r for r in records if r.get("event") == "startup"]
    assert startup["store"] == f"redis://127.0.0.1:{redis_port}/0"
    assert startup["model_version"] == read_manifest(artefact).model_version
    requests = [r for r in records if r.get("event") == "request"]
    assert len(requests) == answered, (len(requests), answered)
    # nothing else mentions a request line: no uvicorn access log ("GET /... HTTP/1.1" 200)
    assert not [r for r in records if "HTTP/1.1" in json.dumps(r)]
    assert [r["status"] for r in requests][-3:] == [503, 503, 503]
