"""Bulk enrolment: thousands of items a request, embeddings as JSON or base64 float32, bad items
named in the 422, and each request all or nothing, also when the store fails in its middle."""

from __future__ import annotations

import base64
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import ConflictError, StoreUnavailableError
from service.store import ApiKey, NewItem, Tenant
from service.store.redis_store import ADD_ITEMS_LUA, RedisStore
from tests.faultproxy import Cut, FaultProxy
from tests.service.conftest import ADMIN_TOKEN, DIM, STORES, make_settings
from tests.service.store.test_redis_down import RedisProcess, free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BULK = 1500


def b64(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()


def units(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(params=STORES)
def client(request: pytest.FixtureRequest, artefact: Path, store_settings) -> Iterator[TestClient]:
    settings = make_settings(
        artefact,
        store_settings(request.param),
        max_enrol_items=BULK,
        max_body_bytes=8 * 1024 * 1024,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def new_tenant(c: TestClient) -> dict[str, str]:
    r = c.post("/v1/tenants", json={"name": "bulk"}, headers=ADMIN)
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def count(c: TestClient, auth: dict[str, str]) -> int:
    n, cursor = 0, None
    while True:
        page = c.get(
            "/v1/gallery",
            params={"limit": 1000, **({"cursor": cursor} if cursor else {})},
            headers=auth,
        ).json()
        n += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return n


def test_bulk_enrol_base64_and_json_lists(client: TestClient) -> None:
    c = client
    auth = new_tenant(c)
    vecs = units(BULK)
    items = [
        {"subject": f"s{i // 3}", "item_id": f"b{i}", "embedding_b64": b64(v)}
        for i, v in enumerate(vecs)
    ]
    items[7] = {"subject": "json", "item_id": "b7", "embedding": vecs[7].tolist()}
    r = c.post("/v1/gallery", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.text[:300]
    assert r.json()["item_ids"] == [f"b{i}" for i in range(BULK)]
    assert count(c, auth) == BULK
    # both encodings give the same stored vector and are found by match
    got = c.get("/v1/gallery/b1234", params={"include_embedding": True}, headers=auth).json()
    np.testing.assert_allclose(got["embedding"], vecs[1234], atol=1e-6)
    for i in (7, 1234):
        m = c.post("/v1/match", json={"embedding_b64": b64(vecs[i]), "k": 1}, headers=auth)
        assert m.status_code == 422  # match takes JSON embeddings only: not part of this API
        m = c.post("/v1/match", json={"embedding": vecs[i].tolist(), "k": 1}, headers=auth)
        assert m.json()["candidates"][0]["item_id"] == f"b{i}"


def test_bulk_limits_and_bad_items_are_named(client: TestClient) -> None:
    c = client
    auth = new_tenant(c)
    vecs = units(BULK + 1, seed=1)
    over = [{"subject": "s", "embedding_b64": b64(v)} for v in vecs]
    r = c.post("/v1/gallery", json={"items": over}, headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "too_many_items"
    assert str(BULK) in r.json()["message"]

    good = [
        {"subject": "s", "item_id": f"g{i}", "embedding_b64": b64(v)}
        for i, v in enumerate(vecs[:1000])
    ]
    nan = vecs[0].copy()
    nan[3] = np.nan
    inf = vecs[0].copy()
    inf[0] = np.inf
    cases = {
        "short": base64.b64encode(np.zeros(DIM - 1, "<f4").tobytes()).decode(),
        "long": base64.b64encode(np.ones(DIM + 1, "<f4").tobytes()).decode(),
        "nan": b64(nan),
        "inf": b64(inf),
        "zero": b64(np.zeros(DIM)),
        "not base64": "%%%not-base64%%%",
    }
    for name, text in cases.items():
        items = [dict(it) for it in good]
        items[617]["embedding_b64"] = text
        r = c.post("/v1/gallery", json={"items": items}, headers=auth)
        assert r.status_code == 422, (name, r.text[:200])
        body = r.json()
        if name == "not base64":  # refused by the schema's base64 pattern, the item named
            assert body["code"] == "invalid_input", body
            assert body["detail"][0]["loc"][-3:] == ["items", 617, "embedding_b64"], body
            continue
        assert body["code"] == "invalid_embedding", (name, body)
        assert "items[617].embedding_b64" in body["message"], (name, body)
    assert count(c, auth) == 0  # nothing half-written
    both = [{"subject": "s", "embedding": vecs[0].tolist(), "embedding_b64": b64(vecs[0])}]
    assert c.post("/v1/gallery", json={"items": both}, headers=auth).status_code == 422


# --- a fault in the middle of a request, on a real Redis ----------------------------------------
# The store talks to its own redis-server through tests/faultproxy.py, which cuts the connection
# at a chosen byte of a 2,000-item add_items. On the wire add_items is: the connection handshake,
# WATCH <tenant>, SCRIPT EXISTS <sha>, then MULTI, EVALSHA <sha> <keys> <args> (the vectors),
# EXEC sent in one write. Offsets come from a clean run's bytes, which are the same for every
# run of the same batch under a prefix of the same length (the script is loaded beforehand, so
# no run sends SCRIPT LOAD).
WIRE_ITEMS, WIRE_DIM = 2000, 256
MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"


@dataclass(frozen=True)
class Wire:
    """The redis-server, the batch, and where the parts of its add_items start on the wire."""

    server: RedisProcess
    batch: list[NewItem]
    watch_at: int
    script_exists_at: int
    multi_at: int
    evalsha_at: int
    exec_at: int
    end: int

    def into_evalsha(self, fraction: float) -> int:
        """An offset ``fraction`` of the way through EVALSHA (its vectors, mostly)."""
        return self.evalsha_at + int((self.exec_at - self.evalsha_at) * fraction)


def wire_prefix() -> str:
    return f"bulk:{uuid.uuid4().hex}:"  # always the same length: the same bytes on the wire


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wire]:
    if shutil.which("redis-server") is None:  # the convention of conftest's redis_server_binary
        pytest.fail(
            "redis-server is not installed (apt-get install redis-server): the Redis "
            "process tests start their own servers",
            pytrace=False,
        )
    server = RedisProcess(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        with redis.Redis(port=server.port) as admin:
            admin.script_load(ADD_ITEMS_LUA)
        batch = [
            NewItem(item_id=f"w{i:05d}", subject=f"s{i % 50}", embedding=v)
            for i, v in enumerate(units(WIRE_ITEMS, seed=3, dim=WIRE_DIM))
        ]
        prefix = wire_prefix()
        with FaultProxy(("127.0.0.1", server.port), record=True) as proxy:
            direct = RedisStore(server.url, prefix=prefix)
            store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, timeout_s=5.0)
            try:
                direct.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
                store.add_items("t", batch, model_version="v", created_at=1.0)
            finally:
                store.close()
                direct.close()
            proxy.wait_closed()
            (conn,) = proxy.connections
        sent = bytes(conn.upstream_data or b"")
        assert sent.count(MULTI) == 1 and sent.endswith(EXEC), sent[:600]
        multi = sent.index(MULTI)
        yield Wire(
            server,
            batch,
            watch_at=sent.index(b"*2\r\n$5\r\nWATCH\r\n"),
            script_exists_at=sent.index(b"*3\r\n$6\r\nSCRIPT\r\n$6\r\nEXISTS\r\n"),
            multi_at=multi,
            evalsha_at=multi + len(MULTI),
            exec_at=len(sent) - len(EXEC),
            end=len(sent),
        )
    finally:
        server.kill()


# cuts after which redis-py's own retry of WATCH (nothing applied yet) may complete the enrolment
RETRIED_BEFORE_THE_TRANSACTION = {"inside WATCH", "WATCH's reply lost"}
# name -> the cut, from the calibrated offsets; the last one is the only one after which the
# batch is stored
WIRE_CUTS: dict[str, Callable[[Wire], Cut]] = {
    "inside WATCH": lambda w: Cut(upstream=w.watch_at + 10),
    "WATCH's reply lost": lambda w: Cut(lose_reply_after=w.script_exists_at),
    "inside SCRIPT EXISTS": lambda w: Cut(upstream=w.script_exists_at + 10),
    "before MULTI": lambda w: Cut(upstream=w.multi_at),
    "inside MULTI": lambda w: Cut(upstream=w.multi_at + 7),
    "inside EVALSHA's sha": lambda w: Cut(upstream=w.evalsha_at + 30),
    "a quarter into EVALSHA": lambda w: Cut(upstream=w.into_evalsha(1 / 4)),
    "half into EVALSHA": lambda w: Cut(upstream=w.into_evalsha(1 / 2)),
    "3/4 into EVALSHA": lambda w: Cut(upstream=w.into_evalsha(3 / 4)),
    "EVALSHA's last byte": lambda w: Cut(upstream=w.exec_at - 1),
    "before EXEC": lambda w: Cut(upstream=w.exec_at),
    "EXEC's last byte": lambda w: Cut(upstream=w.end - 1),
    "EXEC's reply lost": lambda w: Cut(lose_reply_after=w.end),
}


@pytest.mark.redis
@pytest.mark.parametrize("where", list(WIRE_CUTS))
def test_connection_cut_at_a_byte_of_a_bulk_enrolment_is_all_or_nothing(
    wire: Wire, where: str
) -> None:
    """The connection is cut at one byte of the commit (after the batch's items were staged),
    or after Redis has the whole request but before its reply comes back: add_items raises
    StoreUnavailableError, and the batch is stored wholly (lost reply: the script ran exactly
    once) or not at all (cut inside the request); a cut before the transaction may instead be
    retried by redis-py and complete, whole and once. Retrying the batch once the connection
    is good again ends with exactly one copy of it stored."""
    cut, batch, n = WIRE_CUTS[where](wire), wire.batch, len(wire.batch)
    lost_reply = where == "EXEC's reply lost"
    prefix = wire_prefix()
    direct = RedisStore(wire.server.url, prefix=prefix)
    admin = redis.Redis(port=wire.server.port)
    direct.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
    admin.config_resetstat()
    item_keys = [direct._tenant("t", "item", it.item_id) for it in batch]

    def stored() -> int:
        """How much of the batch is in Redis (read directly, not through the proxy), after
        checking it is all or nothing in every structure add_items writes."""
        count = direct.count_items("t")
        assert count in (0, n), (where, count)
        assert admin.exists(*item_keys) == count, where
        assert admin.zcard(direct._tenant("t", "subjects")) == (50 if count else 0), where
        first, last = (
            direct.get_item("t", it.item_id, model_version="v") for it in (batch[0], batch[-1])
        )
        assert (first is None) == (last is None) == (count == 0), where
        return count

    with FaultProxy(("127.0.0.1", wire.server.port)) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, timeout_s=5.0)
        try:
            proxy.arm(cut)
            try:
                store.add_items("t", batch, model_version="v", created_at=1.0)
                completed = True
            except StoreUnavailableError:
                completed = False
            store.r.connection_pool.disconnect()  # a retry's connection may still be pooled
            proxy.wait_closed()
            conns = proxy.connections
            # a cut before the transaction (at WATCH): nothing was applied, and redis-py may
            # send WATCH again on a new connection (which carries no staged bytes before it, so
            # the same offset does not cut it): the enrolment then completes, whole and once;
            # or it gives up (503), nothing stored. Both are checked below, every cut after
            # WATCH must be a 503
            assert not completed or where in RETRIED_BEFORE_THE_TRANSACTION, (where, completed)
            assert conns and conns[0].was_cut, (where, conns)
            if cut.upstream is not None:  # exactly that much of the request reached Redis
                assert conns[0].upstream == cut.upstream, (where, conns)
                assert all(c.upstream == cut.upstream for c in conns if c.was_cut)
            evalsha = admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
            if completed:
                assert stored() == n and evalsha == 1
                assert admin.xlen(prefix + "changes") == 1
                proxy.arm(None)
                with pytest.raises(ConflictError):  # the client's retry: the ids are taken
                    store.add_items("t", batch, model_version="v", created_at=1.0)
                assert stored() == n
                return
            if lost_reply:  # committed once, never resent
                assert stored() == n
                assert evalsha == 1
                assert admin.xlen(prefix + "changes") == 1
                assert admin.get(prefix + "seq") == str(n).encode()
            else:
                assert stored() == 0
                assert evalsha == 0
                assert admin.exists(prefix + "changes", prefix + "seq") == 0

            # the same store, the connection good again: the client's retry
            proxy.arm(None)
            if lost_reply:
                with pytest.raises(ConflictError) as exc:
                    store.add_items("t", batch, model_version="v", created_at=1.0)
                assert exc.value.code == "duplicate_item_id"
            else:
                seqs = store.add_items("t", batch, model_version="v", created_at=1.0)
                assert seqs == list(range(1, n + 1))
            assert stored() == n
        finally:
            store.close()
            direct.close()
            admin.close()


@pytest.mark.redis
def test_the_atomic_commit_does_not_carry_the_vectors(
    tmp_path: Path, redis_server_binary: str
) -> None:
    """Regression (issue 25, item 12): a 10,000-item enrolment was one script carrying every
    vector, which held Redis for everyone for 132-332 ms (PING waited 342 ms). The vectors are
    now staged by pipelines Redis interleaves with other clients, and the atomic commit (MULTI,
    the script, EXEC) carries ids and subjects only: the same bytes for 16-d and 1,024-d items,
    measured on the wire. The commit's work is a few operations per item (check, rename, index)
    whatever the vectors' size."""
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    commits = []
    try:
        with redis.Redis(port=server.port) as admin:
            admin.script_load(ADD_ITEMS_LUA)
        for dim in (16, 1024):
            batch = [
                NewItem(item_id=f"w{i:05d}", subject=f"s{i % 50}", embedding=v)
                for i, v in enumerate(units(1000, seed=3, dim=dim))
            ]
            prefix = wire_prefix()
            with FaultProxy(("127.0.0.1", server.port), record=True) as proxy:
                direct = RedisStore(server.url, prefix=prefix)
                store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix)
                try:
                    direct.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
                    store.add_items("t", batch, model_version="v", created_at=1.0)
                    assert direct.count_items("t") == 1000
                finally:
                    store.close()
                    direct.close()
                proxy.wait_closed()
            sent = b"".join(bytes(c.upstream_data or b"") for c in proxy.connections)
            commits.append(len(sent) - sent.index(MULTI))
            assert len(sent) > 1000 * dim * 4  # the vectors did go, before the commit
        assert commits[0] == commits[1], commits
        assert commits[0] < 1000 * 200  # ids, subjects and key names: ~100 bytes an item
    finally:
        server.kill()
