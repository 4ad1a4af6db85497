"""Idempotent enrolment (issue 25, item 3).

The attack: a bulk enrolment whose Redis reply arrived after the store timeout was stored whole
but answered 503 ``retry``; the bundled client retried it into duplicates (server ids: 5 copies)
or a 409 (given ids). Now an ``Idempotency-Key`` is recorded with the write, in the same atomic
step: a resend gets the first answer and writes nothing, also when it races the first send; the
same key with another request is a 422; the client sends a fresh key with every enrolment and
retries it as safe.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.store import ApiKey, Idempotent, IdempotentReplay, NewItem, Tenant
from service.store.redis_store import RedisStore
from tcm_client import Client
from tests.faultproxy import Cut, FaultProxy
from tests.service.conftest import Api, make_settings, png_bytes, unit
from tests.service.conftest import Tenant as ApiTenant
from tests.service.store.test_redis_down import RedisProcess


def _count(api: Api, tenant: ApiTenant) -> int:
    return len(api.client.get("/v1/gallery?limit=100", headers=tenant.auth).json()["items"])


def _enrol(api: Api, tenant: ApiTenant, body: dict, key: str | None) -> httpx.Response:
    headers = {**tenant.auth, **({"Idempotency-Key": key} if key else {})}
    return api.client.post("/v1/gallery", json=body, headers=headers)


def test_a_resend_gets_the_first_answer_and_writes_nothing(api: Api, tenant: ApiTenant) -> None:
    body = {"items": [{"subject": "s", "embedding": unit(i)} for i in range(3)]}  # server ids
    first = _enrol(api, tenant, body, "key-1")
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = _enrol(api, tenant, body, "key-1")
    assert again.status_code == 201, again.text
    assert again.json()["item_ids"] == first.json()["item_ids"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert _count(api, tenant) == 3
    # without a key a resend is a new request: three more items
    assert _enrol(api, tenant, body, None).status_code == 201
    assert _count(api, tenant) == 6


def test_the_same_key_with_another_request_is_refused(api: Api, tenant: ApiTenant) -> None:
    assert (
        _enrol(
            api, tenant, {"items": [{"subject": "s", "embedding": unit(1)}]}, "key-2"
        ).status_code
        == 201
    )
    r = _enrol(api, tenant, {"items": [{"subject": "s", "embedding": unit(2)}]}, "key-2")
    assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
    assert _count(api, tenant) == 1
    for bad in ("has space", "x" * 129, "a;b"):
        r = api.client.post(
            "/v1/gallery",
            json={"items": [{"subject": "s", "embedding": unit(3)}]},
            headers={**tenant.auth, "Idempotency-Key": bad},
        )
        assert r.status_code == 422, (bad, r.text)
    assert _count(api, tenant) == 1


def test_keys_belong_to_their_tenant(api: Api) -> None:
    a, b = api.new_tenant(), api.new_tenant()
    body = {"items": [{"subject": "s", "embedding": unit(4)}]}
    ids_a = _enrol(api, a, body, "shared").json()["item_ids"]
    r = _enrol(api, b, body, "shared")
    assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers
    assert r.json()["item_ids"] != ids_a


def test_concurrent_sends_of_one_request_store_it_once(api: Api, tenant: ApiTenant) -> None:
    body = {"items": [{"subject": f"s{i}", "embedding": unit(10 + i)} for i in range(20)]}
    answers: list[httpx.Response] = []
    start = threading.Barrier(4)

    def send() -> None:
        start.wait()
        answers.append(_enrol(api, tenant, body, "racing"))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in answers] == [201] * 4
    assert len({tuple(r.json()["item_ids"]) for r in answers}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in answers) == 3
    assert _count(api, tenant) == 20


def test_upload_resend_is_replayed(api: Api, tenant: ApiTenant, digits) -> None:
    def upload(subject: str) -> httpx.Response:
        return api.client.post(
            "/v1/gallery/upload",
            headers={**tenant.auth, "Idempotency-Key": "up-1"},
            files={"file": ("a.png", png_bytes(digits.images[0]), "image/png")},
            data={"subject": subject},
        )

    first, again = upload("s"), upload("s")
    assert first.status_code == again.status_code == 201
    assert again.json()["item_ids"] == first.json()["item_ids"]
    assert upload("t").json()["code"] == "idempotency_key_reused"
    assert _count(api, tenant) == 1


# --- the store: the lost reply itself -----------------------------------------------------------
@pytest.mark.redis
def test_redis_lost_reply_then_resend_is_a_replay(private_redis: RedisProcess) -> None:
    """The enrolment's reply is lost after Redis committed it (the TCP proxy holds it back, at
    the byte where the request ends, measured on a clean run of the same bytes): the store says
    503; the resend with the same key writes nothing and returns the recorded answer."""
    batch = [
        NewItem(item_id=f"i{i:04d}", subject=f"s{i % 7}", embedding=np.asarray(unit(i), np.float32))
        for i in range(500)
    ]

    def record(key: str) -> Idempotent:
        return Idempotent(key, "fp", '["ids"]', time.time() + 3600)

    def run(prefix: str, key: str, cut: Cut | None) -> tuple[RedisStore, RedisStore, int]:
        direct = RedisStore(private_redis.url, prefix=prefix)
        direct.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
        with FaultProxy(("127.0.0.1", private_redis.port), record=True) as proxy:
            store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, timeout_s=5.0)
            proxy.arm(cut)
            try:
                store.add_items(
                    "t", batch, model_version="v", created_at=1.0, idempotency=record(key)
                )
            finally:
                store.close()
            proxy.wait_closed()
            sent = sum(c.upstream for c in proxy.connections)
        return direct, store, sent

    with redis.Redis(port=private_redis.port) as admin:
        from service.store.redis_store import ADD_ITEMS_LUA

        admin.script_load(ADD_ITEMS_LUA)  # no run sends SCRIPT LOAD: the same bytes each time
    clean, _, end = run(f"idem:{uuid.uuid4().hex}:", "k" * 32, None)
    assert clean.count_items("t") == 500
    clean.close()

    prefix = f"idem:{uuid.uuid4().hex}:"  # the same length: the same bytes
    from service.errors import StoreUnavailableError

    with pytest.raises(StoreUnavailableError):
        run(prefix, "q" * 32, Cut(lose_reply_after=end))
    direct = RedisStore(private_redis.url, prefix=prefix)
    try:
        assert direct.count_items("t") == 500  # committed, once
        with pytest.raises(IdempotentReplay) as replay:
            direct.add_items(
                "t", batch, model_version="v", created_at=2.0, idempotency=record("q" * 32)
            )
        assert replay.value.record.result == '["ids"]'
        assert direct.count_items("t") == 500
        assert direct.get_idempotent("t", "q" * 32, now=time.time()) is not None
    finally:
        direct.close()


# --- the client -----------------------------------------------------------------------------------
class LoseFirstEnrolReply(httpx.BaseTransport):
    """Delivers every request to the app, but the first enrolment's answer never comes back
    (read error after the service has stored it): the lost reply, in the client's terms."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.keys: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path == "/v1/gallery":
            self.keys.append(request.headers.get("Idempotency-Key", ""))
            if len(self.keys) == 1:
                response.read()
                raise httpx.ReadError("the answer was lost", request=request)
        return response


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_client_retries_a_lost_enrolment_answer_without_duplicates(
    kind: str, artefact: Path, store_settings
) -> None:
    with TestClient(create_app(make_settings(artefact, store_settings(kind)))) as tc:
        key = tc.post(
            "/v1/tenants",
            json={"name": "t"},
            headers={
                "Authorization": "Bearer " + tc.app.state.settings.admin_token.get_secret_value()
            },
        ).json()["api_key"]
        transport = LoseFirstEnrolReply(tc._transport)  # type: ignore[attr-defined]
        with Client("http://testserver", key, transport=transport, sleep=lambda _: None) as c:
            ids = c.enrol([{"subject": "s", "embedding": unit(i)} for i in range(5)])
            assert len(ids) == 5
            assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1] != ""
            listed = c.list_items(limit=100)
            assert sorted(i.item_id for i in listed.items) == sorted(ids)
