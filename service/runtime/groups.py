"""A grouped replica's background duties and its routing (issue 31 items 2 and 4;
``service.domain.shard_groups`` holds the state).

Every ``placement_poll_s`` the replica reads the placement table (a new one changes which
tenants its indexes hold: ``IndexSync.request_holds``), says it is alive and what it has
acknowledged, and reads who else is. For each authenticated tenant request,
:meth:`GroupRouting.route` says whether this replica serves it or which peer it goes to
(``service.api.forwarding`` forwards it), or refuses it (503 with ``Retry-After``): never a
request served from an index that lacks the tenant.

A request this replica serves or forwards is **unanswered** under the table version it was
routed by until its response is sent (:meth:`GroupRouting.request_scope`, opened per request by
``service.api.forwarding.UnansweredMiddleware``): the acknowledged version this replica
publishes is held back to the oldest of them (``service.domain.placement.acknowledged``), so
that a tenant's move does not finish, and its source group does not release the tenant, while
a request routed under an older table may still reach it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar

from starlette.concurrency import run_in_threadpool

from service.domain.index_sync import IndexSync
from service.domain.placement import Forward, Refresh, Refuse, Serve, acknowledged
from service.domain.shard_groups import ShardGroups
from service.errors import NotReadyError
from service.runtime.periodic import Periodic

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-TCM-Forwarded"  # the sender's placement table version

# the table versions the current request was routed under (the middleware opens one per request)
_routed: ContextVar[list[int] | None] = ContextVar("placement_routed_under", default=None)


class GroupRouting:
    def __init__(self, groups: ShardGroups, sync: IndexSync) -> None:
        self.groups = groups
        self.sync = sync
        self._unanswered: Counter[int] = Counter()
        # a poll read the table and the peers at least once: until then a grouped replica
        # could not route a request (readiness waits for it)
        self.polled = False
        self._periodic = Periodic(
            "placement-watch", groups.poll_s, self.poll_once, first_at_once=False
        )

    @property
    def acknowledged(self) -> int:
        """This replica's copy's table version, held back to the oldest version under which
        it routed a request it has not answered yet."""
        return acknowledged(self.groups.version, list(self._unanswered))

    @contextlib.contextmanager
    def request_scope(self) -> Iterator[None]:
        """One request's lifetime: the versions it was routed under count as unanswered until
        this exits."""
        versions: list[int] = []
        token = _routed.set(versions)
        try:
            yield
        finally:
            _routed.reset(token)
            for version in versions:
                self._unanswered[version] -= 1
                if self._unanswered[version] <= 0:
                    del self._unanswered[version]

    def _routed_under(self, version: int) -> None:
        versions = _routed.get()
        if versions is not None:
            versions.append(version)
            self._unanswered[version] += 1

    async def poll_once(self) -> None:
        await self._refresh_table()
        ready = self.sync.holds_version if self.sync.loaded else 0
        await run_in_threadpool(
            lambda: self.groups.beat(
                loaded=self.sync.loaded, ready=ready, acknowledged=self.acknowledged
            )
        )
        await run_in_threadpool(self.groups.refresh_peers)
        self.polled = True

    async def _refresh_table(self) -> None:
        """Reads the table; a new one changes which tenants this replica's indexes hold."""
        if await run_in_threadpool(self.groups.refresh):
            self.sync.request_holds(self.groups.holding(), self.groups.version)

    def start(self) -> None:
        if self.groups.group is not None:
            self._periodic.start()

    async def close(self) -> None:
        await self._periodic.close()

    async def route(self, tenant_id: str, forwarded_under: int | None) -> tuple[str, str] | None:
        """None: this replica serves the request; else the base URL of the peer to forward it
        to and the peer's group. Raises :class:`NotReadyError` (503, ``Retry-After``) when
        neither is possible."""
        for _ in range(2):
            decision = self.groups.decide(
                tenant_id, serves=self.sync.serves(tenant_id), forwarded_under=forwarded_under
            )
            if isinstance(decision, Refresh):  # the sender's table is newer than this copy
                await self._refresh_table()
                continue
            break
        if isinstance(decision, Serve):
            self._routed_under(self.groups.version)
            return None
        if isinstance(decision, Forward):
            peer = await run_in_threadpool(self.groups.peer_of, decision.group)
            if peer is None:
                raise NotReadyError(
                    f"no replica of shard group {decision.group!r}, which serves this tenant, "
                    "is up and loaded: retry shortly",
                    code="group_unavailable",
                    detail={"group": decision.group},
                )
            self._routed_under(decision.version)
            return peer.url, peer.group
        reason = decision.reason if isinstance(decision, Refuse) else "stale placement"
        raise NotReadyError(
            f"this tenant cannot be served here right now ({reason}): retry shortly",
            code="placement_" + reason.replace(" ", "_"),
        )
