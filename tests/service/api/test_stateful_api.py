"""A stateful property test of the HTTP API: two tenants, two replicas on one Redis.

Hypothesis drives random interleavings of enrol / delete item / delete subject / delete tenant
/ match / verify / list, each sent to either replica (two apps sharing one key prefix, as two
``tcm-serve`` processes would), and checks every answer against a plain model of what each
tenant should see: no 5xx ever; a tenant's listing, verify scores and (once the replica has
followed the change feed) match candidates are exactly its own items; nothing one tenant does
changes what the other sees; a deleted tenant's key is refused by both replicas, its index is
gone from both and not one of its keys is left in Redis. Derandomised and bounded (a few
examples of up to 15 steps) so that it runs in ``make test``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from service.app import create_app
from service.ids import glob_escape, key_part
from tests.service.conftest import ADMIN_TOKEN, REDIS_URL, make_settings, redis_cleanup, unit

pytestmark = pytest.mark.redis
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SUBJECTS = ["s0", "s1", "s2"]
MAX_ITEMS = 30  # below max_k (50): a match returns a tenant's whole gallery


@dataclass
class Replicas:
    clients: list[TestClient]
    prefix: str
    redis: redis.Redis


@pytest.fixture(scope="module")
def replicas(artefact: Path) -> Iterator[Replicas]:
    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    cfg = make_settings(
        artefact, {"store_url": REDIS_URL, "redis_key_prefix": prefix}, monitor_enabled=False
    )
    r = redis.Redis.from_url(REDIS_URL)
    try:
        with TestClient(create_app(cfg)) as a, TestClient(create_app(cfg)) as b:
            yield Replicas([a, b], prefix, r)
    finally:
        r.close()
        redis_cleanup(REDIS_URL, prefix)


@dataclass
class TenantModel:
    tenant_id: str
    auth: dict[str, str]
    items: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (subject, seed)
    alive: bool = True


def stored(seed: int) -> np.ndarray:
    return np.asarray(unit(seed), np.float32)


def check(r, *expected: int) -> dict:
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text)
    assert r.status_code in expected, (r.request.method, r.request.url, r.status_code, r.text)
    return r.json() if r.content else {}


class ApiMachine(RuleBasedStateMachine):
    world: Replicas  # set by the test below

    def __init__(self) -> None:
        super().__init__()
        self.tenants: list[TenantModel] = []
        self.removed: dict[int, set[str]] = {0: set(), 1: set()}  # a lagging replica may
        self.counter = 0  # still find these (until it follows the feed): never another's
        for n in range(2):
            body = check(
                # a fresh name per run: the module's store keeps every run's tenants
                self.world.clients[n].post(
                    "/v1/tenants", json={"name": f"t{n}-{uuid.uuid4().hex[:8]}"}, headers=ADMIN
                ),
                201,
            )
            self.tenants.append(
                TenantModel(body["tenant_id"], {"Authorization": f"Bearer {body['api_key']}"})
            )

    def client(self, replica: int) -> TestClient:
        return self.world.clients[replica]

    # --- writes --------------------------------------------------------------------------
    @rule(
        t=st.integers(0, 1),
        replica=st.integers(0, 1),
        subject=st.sampled_from(SUBJECTS),
        n=st.integers(1, 3),
    )
    def enrol(self, t: int, replica: int, subject: str, n: int) -> None:
        tm = self.tenants[t]
        if len(tm.items) + n > MAX_ITEMS:
            return
        items = []
        for _ in range(n):
            self.counter += 1
            # ids unique across tenants: a candidate of the other tenant would be noticed
            items.append((f"t{t}-{uuid.uuid4().hex[:8]}-{self.counter}", self.counter))
        body = [{"subject": subject, "item_id": i, "embedding": unit(s)} for i, s in items]
        r = self.client(replica).post("/v1/gallery", json={"items": body}, headers=tm.auth)
        if not tm.alive:
            check(r, 401)
            return
        assert check(r, 201)["item_ids"] == [i for i, _ in items]
        tm.items.update({i: (subject, s) for i, s in items})

    @rule(
        t=st.integers(0, 1),
        replica=st.integers(0, 1),
        pick=st.integers(0, 10**6),
        missing=st.booleans(),
    )
    def delete_item(self, t: int, replica: int, pick: int, missing: bool) -> None:
        tm = self.tenants[t]
        other = self.tenants[1 - t]
        ids = sorted(tm.items)
        if missing or not ids:  # not found; or the other tenant's item: not found alike
            own = sorted(other.items)
            item = own[pick % len(own)] if own and pick % 2 else "nope"
        else:
            item = ids[pick % len(ids)]
        r = self.client(replica).delete(f"/v1/gallery/{item}", headers=tm.auth)
        if not tm.alive:
            check(r, 401)
        elif item in tm.items:
            check(r, 204)
            del tm.items[item]
            self.removed[t].add(item)
        else:
            assert check(r, 404)["code"] == "not_found"

    @rule(t=st.integers(0, 1), replica=st.integers(0, 1), subject=st.sampled_from(SUBJECTS))
    def delete_subject(self, t: int, replica: int, subject: str) -> None:
        tm = self.tenants[t]
        r = self.client(replica).delete(f"/v1/subjects/{subject}", headers=tm.auth)
        mine = [i for i, (s, _) in tm.items.items() if s == subject]
        if not tm.alive:
            check(r, 401)
        elif mine:
            assert check(r, 200) == {"deleted": len(mine)}
            for i in mine:
                del tm.items[i]
            self.removed[t].update(mine)
        else:
            check(r, 404)

    @precondition(lambda self: any(t.alive for t in self.tenants))
    @rule(t=st.integers(0, 1), replica=st.integers(0, 1))
    def delete_tenant(self, t: int, replica: int) -> None:
        tm = self.tenants[t]
        r = self.client(replica).delete(f"/v1/tenants/{tm.tenant_id}", headers=ADMIN)
        check(r, 204 if tm.alive else 404)
        tm.alive, tm.items = False, {}
        pattern = glob_escape(f"{self.world.prefix}tenant:{key_part(tm.tenant_id)}:") + "*"
        assert list(self.world.redis.scan_iter(match=pattern, count=1000)) == []
        for c in self.world.clients:
            check(c.get("/v1/gallery", headers=tm.auth), 401)

    # --- reads ---------------------------------------------------------------------------
    @rule(t=st.integers(0, 1), replica=st.integers(0, 1), seed=st.integers(0, 10**6))
    def match(self, t: int, replica: int, seed: int) -> None:
        tm = self.tenants[t]
        c = self.client(replica)
        query = {"embedding": unit(seed), "k": 50}
        if not tm.alive:
            check(c.post("/v1/match", json=query, headers=tm.auth), 401)
            return
        deadline = time.monotonic() + 10  # the other replica follows the change feed
        while True:
            body = check(c.post("/v1/match", json=query, headers=tm.auth), 200)
            got = {x["item_id"] for x in body["candidates"]}
            assert got <= set(tm.items) | self.removed[t], got - set(tm.items)
            if got == set(tm.items):
                break
            assert time.monotonic() < deadline, ("replica did not converge", got, tm.items)
            time.sleep(0.02)
        if tm.items:
            q = stored(seed)
            best = max(tm.items.items(), key=lambda kv: float(stored(kv[1][1]) @ q))
            assert body["candidates"][0]["score"] == pytest.approx(
                float(stored(best[1][1]) @ q), abs=1e-5
            )
            decision = body["decision"]
            assert decision["accepted"] == (decision["score"] >= body["threshold"])
        else:
            assert body["candidates"] == [] and body["decision"]["accepted"] is False

    @rule(
        t=st.integers(0, 1),
        replica=st.integers(0, 1),
        subject=st.sampled_from(SUBJECTS),
        seed=st.integers(0, 10**6),
    )
    def verify(self, t: int, replica: int, subject: str, seed: int) -> None:
        tm = self.tenants[t]
        body = {"a": {"subject": subject}, "b": {"embedding": unit(seed)}}
        r = self.client(replica).post("/v1/verify", json=body, headers=tm.auth)
        mine = [s for i, (subj, s) in tm.items.items() if subj == subject]
        if not tm.alive:
            check(r, 401)
        elif not mine:
            check(r, 404)
        else:
            out = check(r, 200)
            expected = max(float(stored(s) @ stored(seed)) for s in mine)
            assert out["score"] == pytest.approx(expected, abs=1e-5)
            assert out["accepted"] == (out["score"] >= out["threshold"])

    @invariant()
    def listings_are_exactly_each_tenants_items(self) -> None:
        for tm in self.tenants:
            if not tm.alive:
                continue
            for c in self.world.clients:
                page = check(c.get("/v1/gallery", params={"limit": 1000}, headers=tm.auth), 200)
                got = {x["item_id"]: x["subject"] for x in page["items"]}
                assert got == {i: s for i, (s, _) in tm.items.items()}


def test_api_state_machine(replicas: Replicas) -> None:
    ApiMachine.world = replicas
    run_state_machine_as_test(
        ApiMachine,
        settings=settings(
            max_examples=6,
            stateful_step_count=15,
            derandomize=True,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
