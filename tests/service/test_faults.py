"""Faults with real processes on loopback, while traffic is flowing.

- Redis killed (SIGKILL) in the middle of a stream of enrolments and restarted from its
  append-only file: every enrolment the service acknowledged (201) is there afterwards, the
  outage is answered 503 ``store_unavailable`` (never a 500), and the same ``tcm-serve``
  process recovers by itself.
- ``tcm-serve`` killed (SIGKILL) mid-traffic and started again on the same store (SQLite and
  Redis): every acknowledged enrolment is there, and the same queries get identical answers.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.soak import ServerProcess, serve
from tests.service.conftest import REDIS_URL, Digits, b64_png, redis_cleanup, unit
from tests.service.store.test_redis_down import RedisProcess, free_port

pytestmark = pytest.mark.slow


def eventually(check: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def new_tenant(server: ServerProcess, name: str) -> dict[str, str]:
    r = httpx.post(
        f"{server.base}/v1/tenants",
        json={"name": name},
        timeout=30,
        headers={"Authorization": f"Bearer {server.admin_token}"},
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


@dataclass
class Stream:
    """Writer threads enrolling unique items as fast as the service takes them."""

    base: str
    auth: dict[str, str]
    writers: int = 2
    acked: list[str] = field(default_factory=list)
    statuses: dict[Any, int] = field(default_factory=dict)
    bodies: list[str] = field(default_factory=list)  # non-201 answers, for the failure message
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, w: int) -> None:
        with httpx.Client(base_url=self.base, headers=self.auth, timeout=10) as c:
            i = 0
            while not self.stop.is_set():
                item_id = f"w{w}-{i}"
                try:
                    r = c.post(
                        "/v1/gallery",
                        json={
                            "items": [
                                {
                                    "subject": f"s{i % 5}",
                                    "item_id": item_id,
                                    "embedding": unit(100_000 * (w + 1) + i),
                                }
                            ]
                        },
                    )
                    status: Any = r.status_code
                except httpx.HTTPError as exc:
                    status, r = type(exc).__name__, None
                with self.lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    if status == 201:
                        self.acked.append(item_id)
                    elif r is not None and len(self.bodies) < 20:
                        self.bodies.append(f"{status} {r.text[:200]}")
                i += 1
                if status != 201:
                    time.sleep(0.02)

    def __enter__(self) -> Stream:
        self.threads = [
            threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(self.writers)
        ]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def n_acked(self) -> int:
        with self.lock:
            return len(self.acked)


def gallery_ids(base: str, auth: dict[str, str]) -> set[str]:
    ids: set[str] = set()
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1000} | ({"cursor": cursor} if cursor else {})
        r = httpx.get(f"{base}/v1/gallery", params=params, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        page = r.json()
        ids.update(i["item_id"] for i in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return ids


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    srv = RedisProcess(free_port(), tmp_path / "redis")
    srv.data_dir.mkdir()
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.mark.redis
def test_redis_killed_mid_stream_loses_no_acknowledged_enrolment(
    redis_server: RedisProcess, artefact: Path, tmp_path: Path
) -> None:
    with serve(
        artefact,
        redis_server.url,
        tmp_path,
        extra_env={"TCM_STORE_TIMEOUT_S": "0.5", "TCM_MONITOR_ENABLED": "false"},
    ) as server:
        auth = new_tenant(server, "stream")
        pid = server.pid
        with Stream(server.base, auth) as stream:
            eventually(lambda: stream.n_acked() >= 40, timeout_s=60, what="writes before")
            redis_server.kill()
            killed_at = stream.n_acked()
            time.sleep(1.5)  # the stream keeps going into the outage
            r = httpx.get(f"{server.base}/v1/gallery", headers=auth, timeout=10)
            assert r.status_code == 503 and r.json()["code"] == "store_unavailable"
            assert "Redis store cannot be reached" in r.json()["message"]
            assert r.headers["retry-after"] == "1"
            redis_server.start()  # replays its append-only file
            eventually(
                lambda: stream.n_acked() >= killed_at + 40,
                timeout_s=60,
                what="writes after Redis came back",
            )
        assert server.alive() and server.pid == pid  # recovered without a restart
        statuses = dict(stream.statuses)
        assert statuses.get(503, 0) > 0, statuses  # the outage was seen, and answered 503
        assert set(statuses) <= {201, 503}, (statuses, stream.bodies)
        stored = gallery_ids(server.base, auth)
        missing = set(stream.acked) - stored
        assert not missing, sorted(missing)[:10]
        # found by the index too, not only listed: the newest acknowledged item of each writer
        for w in range(stream.writers):
            last = max(
                (i for i in stream.acked if i.startswith(f"w{w}-")),
                key=lambda s: int(s.split("-")[1]),
            )
            r = httpx.post(
                f"{server.base}/v1/match",
                headers=auth,
                timeout=10,
                json={"embedding": unit(100_000 * (w + 1) + int(last.split("-")[1])), "k": 1},
            )
            assert r.json()["candidates"][0]["item_id"] == last
        log = server.log()
        assert "Traceback" not in log, log[-3000:]


QUERIES_OF_STATIC_TENANT = 6


def _answers(base: str, auth: dict[str, str], digits: Digits) -> list[dict[str, Any]]:
    out = []
    with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
        for q in range(QUERIES_OF_STATIC_TENANT):
            body = (
                {"embedding": unit(7_000 + q), "k": 5}
                if q % 2
                else {"image": b64_png(digits.images[100 + q]), "k": 5}
            )
            r = c.post("/v1/match", json=body)
            assert r.status_code == 200, r.text
            answer = r.json()
            answer.pop("match_id")
            out.append(answer)
        for subject in ("s0", "s1"):
            r = c.post(
                "/v1/verify",
                json={"a": {"subject": subject}, "b": {"image": b64_png(digits.images[200])}},
            )
            assert r.status_code == 200, r.text
            out.append(r.json())
    return out


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_service_sigkill_mid_traffic_then_identical_answers(
    kind: str, artefact: Path, digits: Digits, tmp_path: Path
) -> None:
    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    store_url = f"sqlite:///{tmp_path / 'tcm.db'}" if kind == "sqlite" else REDIS_URL
    redis_prefix = prefix if kind == "redis" else None
    env = {"TCM_MONITOR_ENABLED": "false"}
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    try:
        with serve(
            artefact, store_url, tmp_path / "first", redis_prefix=redis_prefix, extra_env=env
        ) as server:
            static, busy = new_tenant(server, "static"), new_tenant(server, "busy")
            items = [
                {"subject": f"s{i % 3}", "item_id": f"img{i}", "image": b64_png(digits.images[i])}
                for i in range(12)
            ]
            items += [
                {"subject": f"s{i % 3}", "item_id": f"emb{i}", "embedding": unit(i)}
                for i in range(12)
            ]
            r = httpx.post(
                f"{server.base}/v1/gallery", json={"items": items}, headers=static, timeout=60
            )
            assert r.status_code == 201, r.text
            before = _answers(server.base, static, digits)
            with Stream(server.base, busy) as stream:
                eventually(lambda: stream.n_acked() >= 40, timeout_s=60, what="writes")
                # queries of the static tenant in flight too, when the process dies
                _answers(server.base, static, digits)
                server.proc.kill()  # SIGKILL: no shutdown, no flush
                server.proc.wait(timeout=10)
            acked = list(stream.acked)
        with serve(
            artefact, store_url, tmp_path / "second", redis_prefix=redis_prefix, extra_env=env
        ) as again:
            after = _answers(again.base, static, digits)
            assert after == before
            missing = set(acked) - gallery_ids(again.base, busy)
            assert not missing, sorted(missing)[:10]
            assert "Traceback" not in again.log()
        assert 201 in stream.statuses and stream.statuses[201] == len(acked)
    finally:
        if kind == "redis":
            redis_cleanup(REDIS_URL, prefix)
