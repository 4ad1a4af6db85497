"""A grouped replica's background duties and its routing (issue 31 item 2;
``service.domain.shard_groups`` holds the state).

Every ``placement_poll_s`` the replica reads the placement table (a new one makes its indexes
follow the tenants it now holds: ``IndexSync.request_rebuild``) and says it is alive. For each
authenticated tenant request, :meth:`GroupRouting.route` says whether this replica serves it or
which peer it goes to (``service.api.forwarding`` forwards it), or refuses it (503 with
``Retry-After``): never a request served from an index that lacks the tenant.
"""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool

from service.domain.index_sync import IndexSync
from service.domain.placement import Forward, Refresh, Refuse, Serve
from service.domain.shard_groups import ShardGroups
from service.errors import NotReadyError
from service.runtime.periodic import Periodic

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-TCM-Forwarded"  # the sender's placement table version


class GroupRouting:
    def __init__(self, groups: ShardGroups, sync: IndexSync) -> None:
        self.groups = groups
        self.sync = sync
        self._periodic = Periodic(
            "placement-watch", groups.poll_s, self.poll_once, first_at_once=False
        )

    async def poll_once(self) -> None:
        await self._refresh_table()
        await run_in_threadpool(lambda: self.groups.beat(loaded=self.sync.loaded))
        await run_in_threadpool(self.groups.refresh_peers)

    async def _refresh_table(self) -> None:
        """Reads the table; a new one changes which tenants this replica's indexes hold."""
        if await run_in_threadpool(self.groups.refresh):
            self.sync.request_rebuild()

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
                tenant_id, loaded=self.sync.loaded, forwarded_under=forwarded_under
            )
            if isinstance(decision, Refresh):  # the sender's table is newer than this copy
                await self._refresh_table()
                continue
            break
        if isinstance(decision, Serve):
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
            return peer.url, peer.group
        reason = decision.reason if isinstance(decision, Refuse) else "stale placement"
        raise NotReadyError(
            f"this tenant cannot be served here right now ({reason}): retry shortly",
            code="placement_" + reason.replace(" ", "_"),
        )
