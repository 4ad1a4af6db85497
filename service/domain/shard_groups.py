"""Shard groups (issue 31 item 2): this replica's group, its copy of the placement table, and
who else is up.

A replica started with ``TCM_SHARD_GROUP`` loads and follows only the tenants its copy of the
placement table (``service.domain.placement``, stored in Redis) gives its group, and answers a
request for any other tenant by forwarding it once to a live replica of the owner group
(``service.api.forwarding``). Without a group, or before a table is written, a replica holds
every tenant (today's mode). Replicas say they are alive in the store every
``placement_poll_s`` (URL, group, table version, whether their indexes are loaded); a replica
silent for three polls is not forwarded to.

A new table changes which tenants a replica holds: the replica's ``IndexSync`` releases the
ones it no longer holds and loads the new ones aside, touching no other tenant's index; a
replica serves a tenant only once its index is loaded (``IndexSync.serves``). Heartbeats also
say which table version the replica holds every tenant of (``ready``) and the version it has
**acknowledged** (its copy's, held back to the oldest version under which it accepted a request
still unanswered): what a tenant move waits on between its steps (``service.domain.moves``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from service.domain.placement import Decision, Placement, Serve, route
from service.errors import StoreUnavailableError
from service.store import Store

log = logging.getLogger(__name__)

LIVE_POLLS = 3  # a replica silent for this many polls is not chosen while others are
STALE_POLLS = 60  # nor at all once silent for this many


@dataclass(frozen=True)
class Peer:
    url: str
    group: str


class ShardGroups:
    def __init__(
        self, store: Store, *, group: str | None, advertise_url: str | None, poll_s: float
    ) -> None:
        self.store = store
        self.group = group
        self.advertise_url = advertise_url
        self.poll_s = poll_s
        self.table: Placement | None = None
        self.rev = 0
        # loaded replicas heard from at the last poll: URL -> (peer, when it last said so)
        self._known: dict[str, tuple[Peer, float]] = {}

    @property
    def version(self) -> int:
        """This replica's copy's table version (0: no table)."""
        return 0 if self.table is None else self.table.version

    @property
    def grouped(self) -> bool:
        """Whether this replica holds only some tenants (a group, and a table naming it)."""
        return self.group is not None and self.table is not None

    def holding(self) -> Callable[[str], bool]:
        """Which tenants this replica loads and follows under its copy of the table now (a
        predicate over that copy: a later copy does not change it)."""
        table, group = self.table, self.group
        if table is None or group is None:
            return lambda _tenant: True
        return lambda tenant: group in table.holders(tenant)

    def refresh(self) -> bool:
        """Reads the table (blocking); whether this replica's copy changed."""
        doc, rev = self.store.get_placement()
        if rev == self.rev:
            return False
        table = None if doc is None else Placement.from_doc(doc)
        if table is not None and self.group is not None and self.group not in table.groups:
            log.warning(
                "the placement table (version %d) has no group %r (groups: %s): this "
                "replica holds no tenant until it names it",
                table.version,
                self.group,
                list(table.groups),
            )
        self.table, self.rev = table, rev
        log.info(
            "placement table version %s (store revision %d)",
            None if table is None else table.version,
            rev,
        )
        return True

    def beat(self, *, loaded: bool, ready: int, acknowledged: int) -> None:
        """Says this replica is alive (blocking): whether its indexes are loaded, the table
        version whose every tenant it holds loaded (``ready``), the version it acknowledged."""
        if self.group is None or self.advertise_url is None:
            return
        self.store.put_replica(
            self.advertise_url,
            {
                "group": self.group,
                "version": self.version,
                "loaded": loaded,
                "ready": ready,
                "acknowledged": acknowledged,
            },
            now=time.time(),
        )

    def decide(self, tenant_id: str, *, serves: bool, forwarded_under: int | None) -> Decision:
        """What to do with a request for ``tenant_id`` (``serves``: this replica's index of it
        is loaded and followed; ``forwarded_under``: the sender's table version, for a request
        another replica forwarded)."""
        if not self.grouped:
            return Serve()  # every replica holds every tenant (loading or not: it waits)
        assert self.table is not None and self.group is not None
        return route(self.table, self.group, serves, tenant_id, forwarded_under)

    def refresh_peers(self) -> None:
        """Reads which replicas are alive (blocking): every poll, so that choosing a peer
        for a request reads no store."""
        now = time.time()
        heard = self.store.list_replicas(now=now, max_age_s=STALE_POLLS * self.poll_s)
        heard.pop(self.advertise_url or "", None)
        self._known = {
            url: (Peer(url, str(info.get("group"))), float(info.get("seen", 0)))
            for url, info in heard.items()
            if info.get("loaded")
        }

    def peer_of(self, group: str, *, exclude: Collection[str] = ()) -> Peer | None:
        """A replica of ``group`` whose indexes are loaded, other than this one and those in
        ``exclude`` (blocking: from the last poll's list, read again when it has none): one
        heard from within ``LIVE_POLLS`` polls if any, else one heard from within
        ``STALE_POLLS`` (when the shard holding the heartbeats fails over, every beat stalls
        for seconds: the peers are not dead for it, and a forward to one that is dead fails to
        connect and goes to another)."""
        for attempt in range(2):
            if attempt:
                try:
                    self.refresh_peers()
                except StoreUnavailableError as exc:
                    log.warning("the list of replicas could not be read: %s", exc.message)
            known = [
                (peer, seen)
                for peer, seen in self._known.values()
                if peer.group == group and peer.url not in exclude
            ]
            fresh_after = time.time() - LIVE_POLLS * self.poll_s
            fresh = [peer for peer, seen in known if seen >= fresh_after]
            if fresh or known:
                return random.choice(fresh or [peer for peer, _ in known])
        return None


__all__ = ["LIVE_POLLS", "Peer", "ShardGroups"]
