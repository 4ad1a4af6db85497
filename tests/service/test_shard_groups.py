"""Shard groups on a real Redis Cluster (issue 31 item 2): replicas of a group load and follow
only the tenants the placement table gives their group, and any replica answers any tenant's
request by forwarding it once, over HTTP, to a live replica of the owner group. Three real HTTP
servers (uvicorn, in threads of this process, so their indexes can be inspected): a1 and a2 in
g1, b1 in g2.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.domain.placement import Placement
from service.store.redis_cluster import RedisClusterStore
from tests.service.conftest import ADMIN_TOKEN, make_settings, unit
from tests.service.rediscluster import LocalCluster
from tests.service.store.test_redis_down import free_port

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("redis_server_binary")]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Replica:
    name: str
    group: str
    url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def sizes(self) -> dict[str, int]:
        return dict(self.app.state.runtime.slot.current.indexes.sizes())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _start(name: str, group: str, store: dict[str, Any], artefact: Path) -> Replica:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_app(
        make_settings(artefact, store, shard_group=group, advertise_url=url, placement_poll_s=0.2)
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"replica-{name}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and httpx.get(url + "/readyz").status_code == 200):
        assert time.monotonic() < deadline and thread.is_alive(), f"{name} did not start"
        time.sleep(0.05)
    return Replica(name, group, url, app, server, thread)


@pytest.fixture
def fleet(redis_cluster: LocalCluster, artefact: Path) -> Iterator[dict[str, Replica]]:
    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    store = {"store_url": redis_cluster.url, "redis_key_prefix": prefix}
    table = RedisClusterStore(redis_cluster.url, prefix=prefix)
    assert table.put_placement(Placement(1, ("g1", "g2")).to_doc(), expected_rev=0)
    table.close()
    replicas: dict[str, Replica] = {}
    try:
        for name, group in (("a1", "g1"), ("a2", "g1"), ("b1", "g2")):
            replicas[name] = _start(name, group, store, artefact)
        yield replicas
    finally:
        for r in replicas.values():
            r.stop()
        redis_cluster.cleanup(prefix)


def _wait(check: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


Answer = tuple[str, str, int, bool]  # replica, tenant, status, whether the answer was right


@contextlib.contextmanager
def _matching(
    replicas: list[Replica],
    auth: dict[str, dict[str, str]],
    probes: dict[str, tuple[list[float], str]],
    *more: Callable[[threading.Event, list[Answer]], None],
) -> Iterator[list[Answer]]:
    """Matches of every tenant of ``probes`` (tenant -> a query and its expected top item)
    through each replica in a loop, and the ``more`` workers beside them, while the block
    runs; yields the list every answer is appended to."""
    stop = threading.Event()
    answers: list[Answer] = []

    def matches(replica: Replica) -> None:
        with httpx.Client(base_url=replica.url, timeout=30) as c:
            while not stop.is_set():
                for tid, (query, top) in probes.items():
                    r = c.post("/v1/match", json={"embedding": query, "k": 1}, headers=auth[tid])
                    right = r.status_code == 200 and r.json()["candidates"][0]["item_id"] == top
                    answers.append((replica.name, tid, r.status_code, right))

    workers = [threading.Thread(target=matches, args=(r,)) for r in replicas]
    workers += [threading.Thread(target=work, args=(stop, answers)) for work in more]
    for w in workers:
        w.start()
    try:
        yield answers
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)


def _tenants(
    replica: Replica, table: Placement, want: dict[str, int], name: str
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Creates tenants until ``table`` gives each group its ``want`` of them: their API-key
    headers, and every tenant created on the way (the surplus ones included)."""
    auth: dict[str, dict[str, str]] = {}
    created: list[str] = []
    for i in range(60):
        r = httpx.post(replica.url + "/v1/tenants", json={"name": f"{name}{i}"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        tid = r.json()["tenant_id"]
        created.append(tid)
        owner = table.owner(tid)
        if list(map(table.owner, auth)).count(owner) < want.get(owner, 0):
            auth[tid] = {"Authorization": f"Bearer {r.json()['api_key']}"}
        if len(auth) == sum(want.values()):
            return auth, created
    raise AssertionError(f"60 tenants did not give {want}")


def _cli_env(replica: Replica) -> dict[str, str]:
    """What ``tcm-serve placement`` needs to reach the fleet's table (polling as fast)."""
    return {
        "TCM_STORE_URL": replica.app.state.settings.store_url,
        "TCM_REDIS_KEY_PREFIX": replica.app.state.settings.redis_key_prefix,
        "TCM_PLACEMENT_POLL_S": "0.2",
    }


def test_groups_hold_their_tenants_and_forward_the_others(fleet: dict[str, Replica]) -> None:
    a1, a2, b1 = fleet["a1"], fleet["a2"], fleet["b1"]
    table = Placement(1, ("g1", "g2"))
    tenants: dict[str, dict[str, str]] = {}
    owners: dict[str, str] = {}
    for i in range(40):  # until each group owns two tenants
        r = httpx.post(a1.url + "/v1/tenants", json={"name": f"t{i}"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        tid = r.json()["tenant_id"]
        tenants[tid] = {"Authorization": f"Bearer {r.json()['api_key']}"}
        owners[tid] = table.owner(tid)
        if min(list(owners.values()).count(g) for g in ("g1", "g2")) >= 2:
            break
    # every tenant enrolled through a1, whichever group owns it
    for n, (tid, auth) in enumerate(tenants.items()):
        body = {"items": [{"subject": "s", "embedding": unit(n), "item_id": f"{tid}-x"}]}
        r = httpx.post(a1.url + "/v1/gallery", json=body, headers=auth)
        assert r.status_code == 201, r.text
    mine = {g: {t for t, o in owners.items() if o == g} for g in ("g1", "g2")}
    _wait(lambda: set(a2.sizes()) == mine["g1"], f"a2 holds {a2.sizes()}")
    _wait(lambda: set(b1.sizes()) == mine["g2"], f"b1 holds {b1.sizes()}")
    assert set(a1.sizes()) == mine["g1"]  # only its group's indexes, nothing of g2
    # every tenant matched through every replica: served or forwarded once, same answer
    for n, (tid, auth) in enumerate(tenants.items()):
        for replica in (a1, a2, b1):
            m = httpx.post(
                replica.url + "/v1/match", json={"embedding": unit(n), "k": 1}, headers=auth
            )
            assert m.status_code == 200, (replica.name, m.text)
            assert m.json()["candidates"][0]["item_id"] == f"{tid}-x"
    # the forwarded answer carries the client's request id (both replicas log it)
    g2_tenant = next(t for t, o in owners.items() if o == "g2")
    m = httpx.post(
        a1.url + "/v1/match",
        json={"embedding": unit(0), "k": 1},
        headers={**tenants[g2_tenant], "X-Request-ID": "req-forwarded-1"},
    )
    assert m.status_code == 200 and m.headers["x-request-id"] == "req-forwarded-1"
    assert m.headers.get_list("x-request-id") == ["req-forwarded-1"]
    # a forwarded request is never forwarded again: sent to b1 as if forwarded, a g1 tenant's
    # request is refused (b1 does not hold it), not sent on
    g1_tenant = next(iter(mine["g1"]))
    r = httpx.post(
        b1.url + "/v1/match",
        json={"embedding": unit(0), "k": 1},
        headers={**tenants[g1_tenant], "X-TCM-Forwarded": "1"},
    )
    assert r.status_code == 503 and r.json()["code"] == "placement_stale_placement", r.text
    assert r.headers["Retry-After"] == "1"
    bad = httpx.post(
        b1.url + "/v1/match",
        json={"embedding": unit(0), "k": 1},
        headers={**tenants[g1_tenant], "X-TCM-Forwarded": "x"},
    )
    assert bad.status_code == 422

    # a new table pins a g1 tenant on g2: b1 loads it, g1's replicas drop it, and a request
    # for it through a2 now goes to b1 (a re-placement by hand, without the move protocol)
    store = RedisClusterStore(
        a1.app.state.settings.store_url, prefix=a1.app.state.settings.redis_key_prefix
    )
    try:
        pinned = Placement(2, ("g1", "g2"), explicit=((g1_tenant, "g2"),))
        assert store.put_placement(pinned.to_doc(), expected_rev=1)
    finally:
        store.close()
    _wait(lambda: g1_tenant in b1.sizes(), f"b1 did not load the pinned tenant: {b1.sizes()}")
    _wait(lambda: g1_tenant not in a2.sizes(), "a2 did not drop the pinned tenant")
    n = list(tenants).index(g1_tenant)
    m = httpx.post(
        a2.url + "/v1/match", json={"embedding": unit(n), "k": 1}, headers=tenants[g1_tenant]
    )
    assert m.status_code == 200 and m.json()["candidates"][0]["item_id"] == f"{g1_tenant}-x"
    owners[g1_tenant] = "g2"

    # a1 forwarded g2's requests, and counted them
    forwarded = httpx.get(a1.url + "/metrics").text
    assert 'tcm_forwarded_requests_total{group="g2",outcome="answered"}' in forwarded

    # a1 stops: g1's requests through b1 still answered (by a2), not one failed
    a1.stop()
    for n, (tid, auth) in enumerate(tenants.items()):
        if owners[tid] != "g1":
            continue
        m = httpx.post(b1.url + "/v1/match", json={"embedding": unit(n), "k": 1}, headers=auth)
        assert m.status_code == 200, m.text


def test_the_placement_command_writes_the_next_table(store_settings: Any) -> None:
    import json

    from typer.testing import CliRunner

    from service.cli import app

    cfg = store_settings("redis")
    env = {"TCM_STORE_URL": cfg["store_url"], "TCM_REDIS_KEY_PREFIX": cfg["redis_key_prefix"]}
    runner = CliRunner()
    shown = runner.invoke(app, ["placement"], env=env)
    assert shown.exit_code == 0 and json.loads(shown.output) == {"revision": 0, "table": None}
    wrote = runner.invoke(app, ["placement", "--groups", "g1,g2", "--pin", "t9=g2"], env=env)
    assert wrote.exit_code == 0, wrote.output
    table = Placement.from_doc(json.loads(wrote.output)["table"])
    assert (table.version, table.groups, table.owner("t9")) == (1, ("g1", "g2"), "g2")
    # a third group moves no existing tenant: those it would rehash are pinned where they are
    from service.store.base import ApiKey, Tenant
    from service.store.redis_store import RedisStore

    store = RedisStore(cfg["store_url"], prefix=cfg["redis_key_prefix"])
    try:
        for i in range(12):
            store.create_tenant(
                Tenant(f"u{i}", f"u{i}", 1.0), ApiKey(f"k{i}", f"u{i}", "h" * 64, 1.0)
            )
    finally:
        store.close()
    again = runner.invoke(app, ["placement", "--groups", "g1,g2,g3"], env=env)
    grown = Placement.from_doc(json.loads(again.output)["table"])
    assert grown.version == 2 and grown.groups == ("g1", "g2", "g3")
    assert all(grown.owner(f"u{i}") == table.owner(f"u{i}") for i in range(12))
    assert grown.owner("t9") == "g2" and grown.owner("new") == Placement(0, grown.groups).owner(
        "new"
    )
    assert len(grown.explicit) > 1  # (some would have rehashed to g3)
    bad = runner.invoke(app, ["placement", "--pin", "t9=g7"], env=env)
    assert bad.exit_code == 1 and "GROUP among" in bad.output
    dropped = runner.invoke(app, ["placement", "--groups", "g1,g3"], env=env)
    assert dropped.exit_code == 1 and "move them first" in dropped.output, dropped.output
    unknown = runner.invoke(app, ["placement", "--move", "u0=g9"], env=env)
    assert unknown.exit_code == 1 and "unknown group 'g9'" in unknown.output

    # a size-aware plan: every tenant's items counted, the moves that even the groups out
    from service.store.base import NewItem

    store = RedisStore(cfg["store_url"], prefix=cfg["redis_key_prefix"])
    try:
        for i in range(12):
            vectors = np.eye(8, dtype=np.float32)[np.arange(3 * i + 1) % 8]
            store.add_items(
                f"u{i}",
                [NewItem(f"x{j}", "s", v) for j, v in enumerate(vectors)],
                model_version="v",
                created_at=1.0,
            )
    finally:
        store.close()
    planned = runner.invoke(app, ["placement", "--balance"], env=env)
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.output)
    now, after = plan["items_per_group_now"], plan["items_per_group_balanced"]
    assert sum(now.values()) == sum(after.values()) == sum(3 * i + 1 for i in range(12))
    assert max(after.values()) < max(now.values()) and plan["moves"]
    assert all(m["to"] in ("g1", "g2", "g3") for m in plan["moves"])
    assert 0 < plan["largest_group_drop"] < 1
    # a gain under --min-gain moves nobody (a scheduled run must not shuffle tenants for little)
    idle = runner.invoke(app, ["placement", "--balance", "--apply", "--min-gain", "0.99"], env=env)
    assert idle.exit_code == 0 and "no move made" in idle.output, idle.output
    assert json.loads(runner.invoke(app, ["placement"], env=env).output)["table"]["version"] == 2
    # --apply makes the first move: with no replica running it begins and waits, then stops
    applied = runner.invoke(app, ["placement", "--balance", "--apply", "--timeout", "0.3"], env=env)
    assert applied.exit_code == 1 and "begin: table version 3" in applied.output
    assert "run the command again to resume it" in applied.output
    # run again, it finishes that move first (to its recorded target), whatever the plan is now
    first = plan["moves"][0]
    again = runner.invoke(app, ["placement", "--balance", "--apply", "--timeout", "0.3"], env=env)
    assert again.exit_code == 1
    assert f"finishing the move of {first['tenant']} to {first['to']}" in again.output
    lone = runner.invoke(app, ["placement", "--apply"], env=env)
    assert lone.exit_code == 1 and "--apply goes with --balance" in lone.output
    sqlite = runner.invoke(
        app,
        ["placement", "--groups", "g1"],
        env={"TCM_STORE_URL": store_settings("sqlite")["store_url"]},
    )
    assert sqlite.exit_code == 1 and "shared Redis store" in sqlite.output


def test_balance_apply_finishes_a_move_its_plan_would_not_make(store_settings: Any) -> None:
    """A move a stopped run left under way (begun, never switched) is finished by the next
    ``--balance --apply`` even when the new plan leaves the tenant where the table has it
    now: otherwise the tenant would stay held by two groups for good. With no replica
    running, the resumed move waits for the target and stops, naming it."""
    import json

    from typer.testing import CliRunner

    from service.cli import app
    from service.store.base import ApiKey, NewItem, Tenant
    from service.store.redis_store import RedisStore

    cfg = store_settings("redis")
    store = RedisStore(cfg["store_url"], prefix=cfg["redis_key_prefix"])
    try:
        store.create_tenant(Tenant("x", "x", 1.0), ApiKey("kx", "x", "h" * 64, 1.0))
        vectors = np.eye(8, dtype=np.float32)[:4]
        store.add_items(
            "x",
            [NewItem(f"i{j}", "s", v) for j, v in enumerate(vectors)],
            model_version="v",
            created_at=1.0,
        )
        table = Placement(1, ("g1", "g2", "g3"), explicit=(("x", "g1"),)).begin("x", "g3")
        assert store.put_placement(table.to_doc(), expected_rev=0)
    finally:
        store.close()
    env = {"TCM_STORE_URL": cfg["store_url"], "TCM_REDIS_KEY_PREFIX": cfg["redis_key_prefix"]}
    runner = CliRunner()
    planned = runner.invoke(app, ["placement", "--balance"], env=env)
    assert planned.exit_code == 0 and json.loads(planned.output)["moves"] == []  # x stays
    resumed = runner.invoke(app, ["placement", "--balance", "--apply", "--timeout", "0.3"], env=env)
    assert resumed.exit_code == 1, resumed.output
    assert "finishing the move of x to g3" in resumed.output
    assert "run the command again to resume it" in resumed.output


def test_a_group_needs_a_shared_store_and_an_address() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="shared Redis store"):
        Settings(shard_group="g1", advertise_url="http://10.0.0.1:8000")
    with pytest.raises(ValidationError, match="advertise_url"):
        Settings(shard_group="g1", store_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ValidationError):
        Settings(shard_group="g 1", store_url="redis://h:6379/0", advertise_url="http://h:1")
    ok = Settings(shard_group="g1", store_url="redis://h:6379/0", advertise_url="http://h:8000")
    assert ok.shard_group == "g1"


def test_decisions_without_and_with_a_group(tmp_path: Path) -> None:
    """Ungrouped, a replica serves every tenant (loaded or not: a request then waits for the
    load, as before groups); grouped, it serves its group's tenants once loaded and forwards
    the others to their owner group."""
    from service.domain.placement import Forward, Serve
    from service.domain.shard_groups import ShardGroups
    from service.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "s.db")
    try:
        alone = ShardGroups(store, group=None, advertise_url=None, poll_s=1.0)
        assert alone.decide("t", serves=False, forwarded_under=None) == Serve()
        assert alone.holding()("t") and not alone.grouped
        g1 = ShardGroups(store, group="g1", advertise_url="http://h:1", poll_s=1.0)
        g1.table = Placement(3, ("g1", "g2"), explicit=(("a", "g1"), ("b", "g2")))
        assert g1.decide("a", serves=True, forwarded_under=None) == Serve()
        assert g1.decide("b", serves=True, forwarded_under=None) == Forward("g2", 3)
        # its index of "a" not loaded yet: sent to a peer of its own group that has it
        assert g1.decide("a", serves=False, forwarded_under=None) == Forward("g1", 3)
        holds = g1.holding()
        assert holds("a") and not holds("b")
        g1.table = Placement(4, ("g1", "g2"), explicit=(("a", "g2"), ("b", "g2")))
        assert holds("a")  # a predicate over the copy it was taken from
    finally:
        store.close()


def _columns(rows: np.ndarray, ids: list[str]) -> dict[str, Any]:
    return {
        "subjects": [i.rsplit("-", 1)[0] for i in ids],
        "item_ids": ids,
        "embeddings_b64": base64.b64encode(np.ascontiguousarray(rows, "<f4").tobytes()).decode(),
    }


def test_a_live_move_fails_no_request_and_touches_no_other_tenant(
    fleet: dict[str, Replica],
) -> None:
    """A g1 tenant of 2,048 items moves to g2 (``tcm-serve placement --move``) while matches of
    it and of one tenant per group go through every replica, and enrolments of it go on
    through a2: not one request fails or answers wrongly, b1 loads the tenant aside (no
    rebuild of what it held), g1's replicas release it, and every item acknowledged during the
    move is in b1's index, found through another replica by its consistency token."""
    from typer.testing import CliRunner

    from service.cli import app as cli

    a1, a2, b1 = fleet["a1"], fleet["a2"], fleet["b1"]
    table = Placement(1, ("g1", "g2"))
    auth, created = _tenants(a1, table, {"g1": 2, "g2": 1}, "m")
    moving = next(t for t in auth if table.owner(t) == "g1")
    rng = np.random.default_rng(7)
    probes: dict[str, tuple[list[float], str]] = {}  # tenant -> a query and its top item
    for tid in auth:
        n = 2048 if tid == moving else 64
        rows = rng.standard_normal((n, 64)).astype(np.float32)
        ids = [f"s{j // 4}-{j}" for j in range(n)]
        for lo in range(0, n, 256):
            r = httpx.post(
                a1.url + "/v1/gallery/columns",
                json=_columns(rows[lo : lo + 256], ids[lo : lo + 256]),
                headers=auth[tid],
            )
            assert r.status_code == 201, r.text
        probes[tid] = ((rows[5] / np.linalg.norm(rows[5])).tolist(), ids[5])
    _wait(lambda: b1.sizes().get(moving) is None and a2.sizes().get(moving) == 2048, "loads")
    rebuilds = {r.name: r.app.state.runtime.sync.rebuilds for r in (a1, a2, b1)}

    enrolled: list[tuple[str, str]] = []  # item id, its consistency token

    def enrolments(stop: threading.Event, answers: list[Answer]) -> None:
        with httpx.Client(base_url=a2.url, timeout=30) as c:
            j = 0
            while not stop.is_set():
                item = f"late-{j}"
                body = {"items": [{"subject": "late", "item_id": item, "embedding": unit(j)}]}
                r = c.post("/v1/gallery", json=body, headers=auth[moving])
                if r.status_code != 201:
                    answers.append(("a2", moving, r.status_code, False))
                    return
                enrolled.append((item, r.headers["X-Consistency-Token"]))
                j += 1

    with _matching([a1, a2, b1], auth, probes, enrolments) as answers:
        _wait(lambda: len(answers) > 30 and enrolled, "traffic before the move")
        env = _cli_env(a1)
        moved = CliRunner().invoke(cli, ["placement", "--move", f"{moving}=g2"], env=env)
        assert moved.exit_code == 0, moved.output
        assert [line.split()[2] for line in moved.output.splitlines()[:3]] == [
            "begin:",
            "switch:",
            "finish:",
        ], moved.output
        _wait(lambda: moving not in a1.sizes() and moving not in a2.sizes(), "g1 released it")
        during = len(answers)
        _wait(lambda: len(answers) > during + 30, "traffic after the move")
    failed = [a for a in answers if a[2] != 200 or not a[3]]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    assert {a[0] for a in answers if a[1] == moving} == {"a1", "a2", "b1"}
    # b1 loaded the tenant aside; nobody rebuilt anything
    assert {r.name: r.app.state.runtime.sync.rebuilds for r in (a1, a2, b1)} == rebuilds
    assert set(b1.sizes()) == {moving} | {t for t in created if table.owner(t) == "g2"}
    assert (
        set(a1.sizes())
        == set(a2.sizes())
        == {t for t in created if table.owner(t) == "g1" and t != moving}
    )
    # every enrolment acknowledged during the move is in b1's index, and found through a1
    # by its token
    assert b1.sizes()[moving] == 2048 + len(enrolled)
    item, token = enrolled[-1]
    m = httpx.post(
        a1.url + "/v1/match",
        json={"embedding": unit(len(enrolled) - 1), "k": 1},
        headers={**auth[moving], "X-Consistency-Token": token},
    )
    assert m.status_code == 200 and m.json()["candidates"][0]["item_id"] == item, m.text


def test_retiring_a_group_moves_its_tenants_live_then_drops_it(
    fleet: dict[str, Replica],
) -> None:
    """``tcm-serve placement --retire g2`` prints where g2's tenants go; with ``--apply`` it
    moves each live while matches go on through every replica (b1, the retired group's own
    replica, included), then writes the table without g2: b1 holds nothing and forwards, g1's
    replicas hold every tenant, not one request failed, and the other tenants kept their
    group (none rehashed by the smaller set of groups)."""
    import json

    from typer.testing import CliRunner

    from service.cli import app as cli

    a1, a2, b1 = fleet["a1"], fleet["a2"], fleet["b1"]
    table = Placement(1, ("g1", "g2"))
    auth, created = _tenants(a1, table, {"g1": 1, "g2": 2}, "r")
    # every g2 tenant leaves, those created on the way (with no items) included
    leaving = sorted(t for t in created if table.owner(t) == "g2")
    staying = next(t for t in auth if table.owner(t) == "g1")
    for n, (tid, headers) in enumerate(auth.items()):
        items = [
            {"subject": f"s{j}", "embedding": unit(10 * n + j), "item_id": f"{tid}-{j}"}
            for j in range(3 + n)
        ]
        r = httpx.post(a1.url + "/v1/gallery", json={"items": items}, headers=headers)
        assert r.status_code == 201, r.text
    enrolled_g2 = {t for t in auth if table.owner(t) == "g2"}
    _wait(lambda: set(b1.sizes()) >= enrolled_g2, f"b1 holds {b1.sizes()}")
    env = _cli_env(a1)
    runner = CliRunner()
    planned = runner.invoke(cli, ["placement", "--retire", "g2"], env=env)
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.output)
    assert sorted(m["tenant"] for m in plan["moves"]) == leaving
    assert {m["to"] for m in plan["moves"]} == {"g1"}
    assert plan["items_per_group_after"]["g2"] == 0
    assert sum(plan["items_per_group_after"].values()) == sum(plan["items_per_group_now"].values())

    probes = {tid: (unit(10 * n), f"{tid}-0") for n, tid in enumerate(auth)}
    with _matching([a1, a2, b1], auth, probes) as answers:
        _wait(lambda: len(answers) > 30, "traffic before the retirement")
        retired = runner.invoke(cli, ["placement", "--retire", "g2", "--apply"], env=env)
        assert retired.exit_code == 0, retired.output
        assert "group g2 retired" in retired.output
        _wait(lambda: not b1.sizes(), f"b1 still holds {b1.sizes()}")
        during = len(answers)
        _wait(lambda: len(answers) > during + 30, "traffic after the retirement")
    failed = [a for a in answers if a[2] != 200 or not a[3]]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    store = RedisClusterStore(
        a1.app.state.settings.store_url, prefix=a1.app.state.settings.redis_key_prefix
    )
    try:
        doc, _ = store.get_placement()
    finally:
        store.close()
    after = Placement.from_doc(doc or {})
    assert after.groups == ("g1",) and not after.moves
    assert all(after.owner(t) == "g1" for t in auth)
    assert set(a1.sizes()) == set(a2.sizes()) >= set(auth)
    assert a1.sizes()[staying] == 3 + list(auth).index(staying)
    # nothing left to retire into: the last group cannot go
    last = runner.invoke(cli, ["placement", "--retire", "g1"], env=env)
    assert last.exit_code == 1 and "the only group" in last.output
