"""The steps of a live tenant move that no timing can show (issue 31 item 4): the controller
(``service.domain.moves``) waits for the target group's readiness before the switch and for every
live replica's acknowledgement before the finish, and a replica's acknowledged version is held
back by a request it routed under an older table until that request is answered. On a real
Redis; the end-to-end move under traffic is ``test_shard_groups``'s."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.domain.moves import move_tenant
from service.domain.placement import Placement
from service.domain.shard_groups import Peer, ShardGroups
from service.store.redis_store import RedisStore
from tests.service.conftest import ADMIN_TOKEN, unit
from tests.service.test_shard_groups import _start, _wait

pytestmark = [pytest.mark.redis]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _beat(store: RedisStore, url: str, group: str, *, ready: int, acknowledged: int | None) -> None:
    """A replica's heartbeat as the service writes it (``acknowledged=None``: one that does
    not say, as a replica of an older release)."""
    info = {"group": group, "version": ready, "loaded": True, "ready": ready}
    if acknowledged is not None:
        info["acknowledged"] = acknowledged
    store.put_replica(url, info, now=time.time())


def test_the_controller_waits_for_the_target_then_for_every_acknowledgement(
    store_settings: Any,
) -> None:
    cfg = store_settings("redis")
    store = RedisStore(cfg["store_url"], prefix=cfg["redis_key_prefix"])
    try:
        assert store.put_placement(Placement(1, ("g1", "g2")).to_doc(), expected_rev=0)
        tenant = next(
            f"t{i}" for i in range(100) if Placement(1, ("g1", "g2")).owner(f"t{i}") == "g1"
        )

        def move(timeout_s: float) -> list[str]:
            return [
                s.name
                for s in move_tenant(
                    store, tenant, "g2", max_age_s=60, poll_s=0.01, timeout_s=timeout_s
                )
            ]

        # g2's replica has not loaded the tenant (ready under version 1 only): begun, no switch
        _beat(store, "http://a1", "g1", ready=2, acknowledged=2)
        _beat(store, "http://b1", "g2", ready=1, acknowledged=2)
        with pytest.raises(TimeoutError, match="every live replica of group 'g2' to hold"):
            move(0.2)
        table = Placement.from_doc(store.get_placement()[0] or {})
        assert table.version == 2 and table.move_of(tenant) is not None
        assert table.owner(tenant) == "g1"
        # ready, but a1 still has a request routed under version 2 unanswered: switched, no finish
        _beat(store, "http://b1", "g2", ready=2, acknowledged=3)
        _beat(store, "http://a1", "g1", ready=3, acknowledged=2)
        with pytest.raises(TimeoutError, match=r"acknowledge table version 3 \(lowest now: 2"):
            move(0.2)
        table = Placement.from_doc(store.get_placement()[0] or {})
        assert table.version == 3 and table.owner(tenant) == "g2"
        # a replica that does not say what it acknowledged holds the finish back too
        _beat(store, "http://a1", "g1", ready=3, acknowledged=3)
        _beat(store, "http://old", "g1", ready=3, acknowledged=None)
        with pytest.raises(TimeoutError):
            move(0.2)
        store.r.hdel(store._k("replicas"), "http://old")
        assert move(5) == ["finish"]  # resumed where the table was
        table = Placement.from_doc(store.get_placement()[0] or {})
        assert (table.version, table.owner(tenant), table.moves) == (4, "g2", ())
        with pytest.raises(ValueError, match="already in group 'g2'"):
            move(1)
    finally:
        store.close()


class HeldPeer:
    """A peer replica that takes a forwarded request and answers it only when released."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.received.set()
            self.release.wait(60)
            answer = b'{"held": true}'
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(answer)}\r\nconnection: close\r\n\r\n".encode()
                + answer
            )

    def close(self) -> None:
        self.release.set()
        self.sock.close()


def test_an_unanswered_request_holds_the_acknowledged_version_back(
    store_settings: Any, artefact: Path
) -> None:
    cfg = store_settings("redis")
    store = RedisStore(cfg["store_url"], prefix=cfg["redis_key_prefix"])
    peer = HeldPeer()
    replica = None
    try:
        table = Placement(1, ("g1", "g2"))
        assert store.put_placement(table.to_doc(), expected_rev=0)
        replica = _start("a1", "g1", cfg, artefact)
        routing = replica.app.state.runtime.routing
        # ready only once it has read the table and its peers: it can route what it receives
        ready = httpx.get(replica.url + "/readyz").json()
        assert routing.polled and ready["checks"]["placement"] == "ok", ready
        for i in range(60):  # a tenant of g2's, which a1 forwards
            r = httpx.post(replica.url + "/v1/tenants", json={"name": f"h{i}"}, headers=ADMIN)
            if table.owner(r.json()["tenant_id"]) == "g2":
                key = r.json()["api_key"]
                break
        _beat(store, peer.url, "g2", ready=1, acknowledged=1)
        answered: list[httpx.Response] = []
        client = threading.Thread(
            target=lambda: answered.append(
                httpx.post(
                    replica.url + "/v1/match",
                    json={"embedding": unit(0), "k": 1},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=60,
                )
            )
        )
        client.start()
        assert peer.received.wait(30), "a1 did not forward the request"
        assert routing.acknowledged == 1
        # a new table: a1's copy moves on, its acknowledgement does not while the request waits
        assert store.put_placement(Placement(2, ("g1", "g2")).to_doc(), expected_rev=1)
        _wait(lambda: routing.groups.version == 2, "a1 read the new table")
        _wait(
            lambda: store.list_replicas(now=time.time(), max_age_s=60)[replica.url]["version"] == 2,
            "a1 beat",
        )
        assert routing.acknowledged == 1
        assert store.list_replicas(now=time.time(), max_age_s=60)[replica.url]["acknowledged"] == 1
        peer.release.set()
        client.join(60)
        assert answered and answered[0].json() == {"held": True}
        assert routing.acknowledged == 2
        _wait(
            lambda: (
                store.list_replicas(now=time.time(), max_age_s=60)[replica.url]["acknowledged"] == 2
            ),
            "a1 said it acknowledged version 2",
        )
    finally:
        peer.close()
        if replica is not None:
            replica.stop()
        store.close()


def test_a_stall_of_every_heartbeat_takes_nobody_for_dead(store_settings: Any) -> None:
    """A peer heard from lately is preferred; when none is (the store's heartbeats stalled for
    everyone: the shard holding them failing over), one heard from within ``STALE_POLLS`` is
    still a forwarding target (a dead one fails to connect, and the forward goes to another);
    one silent for longer never is."""
    cfg = store_settings("redis")
    store = RedisStore(cfg["store_url"], prefix=cfg["redis_key_prefix"])
    try:
        groups = ShardGroups(store, group="g1", advertise_url="http://a1", poll_s=0.5)
        now = time.time()
        for url, age in (("http://a1", 0.0), ("http://b1", 5.0), ("http://b2", 5.4)):
            store.put_replica(url, {"group": "g2", "loaded": True}, now=now - age)
        store.put_replica("http://b3", {"group": "g2", "loaded": True}, now=now - 100)
        groups.refresh_peers()
        stalled = {groups.peer_of("g2", exclude=[u]) for u in ("http://b1", "http://b2")}
        assert stalled == {Peer("http://b2", "g2"), Peer("http://b1", "g2")}
        assert groups.peer_of("g2", exclude=["http://b1", "http://b2"]) is None  # not b3
        store.put_replica("http://b1", {"group": "g2", "loaded": True}, now=now)  # b2 stopped
        groups.refresh_peers()
        assert {groups.peer_of("g2") for _ in range(20)} == {Peer("http://b1", "g2")}
        assert groups.peer_of("g2", exclude=["http://b1"]) == Peer("http://b2", "g2")
        assert groups.peer_of("g3") is None
    finally:
        store.close()
