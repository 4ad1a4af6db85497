"""Moving a tenant between shard groups with no failed request (issue 31 item 4): the
controller that drives ``service.domain.placement``'s protocol through its three table changes.

``begin`` pins the tenant to its group and records the move; the target group's replicas load
the tenant aside and say so in their heartbeats (``ready``: the table version whose every
tenant they hold loaded); ``switch``, once every live replica of the target is ready, makes the
target the owner; ``finish``, once every live replica has acknowledged the switch (no request
routed under an older table is still unanswered anywhere), ends the move, and the source's
replicas release the tenant. Each step is a compare-and-set of the table, so a controller that
stops and is run again (or two that run at once) continues from what the table says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from service.domain.placement import (
    Placement,
    min_acknowledged,
    next_move_step,
    target_ready,
)
from service.store import Store


@dataclass(frozen=True)
class Step:
    name: str  # "begin", "switch", "finish"
    table: Placement
    seconds: float  # since the controller started


def move_tenant(
    store: Store,
    tenant_id: str,
    target: str,
    *,
    max_age_s: float,
    poll_s: float,
    timeout_s: float,
    on_step: Callable[[Step], None] = lambda _step: None,
) -> list[Step]:
    """Moves ``tenant_id`` to group ``target`` (blocking; resumes a move already under way to
    the same target). ``max_age_s``: a replica silent for longer is not waited for. Raises
    ValueError for a move that cannot be made, TimeoutError (naming what it waited for) when
    ``timeout_s`` passes first; the table is then left mid-move, to be resumed."""
    started = time.monotonic()
    steps: list[Step] = []
    under_way = False
    while True:
        doc, rev = store.get_placement()
        if doc is None:
            raise ValueError("there is no placement table: write one first (--groups)")
        table = Placement.from_doc(doc)
        move = table.move_of(tenant_id)
        waiting = ""
        if move is None:
            if under_way:
                return steps
            following, name = table.begin(tenant_id, target), "begin"
        elif move.target != target:
            raise ValueError(f"tenant {tenant_id!r} is already moving to group {move.target!r}")
        else:
            under_way = True
            replicas = store.list_replicas(now=time.time(), max_age_s=max_age_s)
            ready = target_ready(replicas, target, table.version)
            following = next_move_step(
                table,
                tenant_id,
                target_ready=ready,
                min_acknowledged=min_acknowledged(replicas),
            )
            name = "finish" if move.switched_at else "switch"
            waiting = (
                f"every live replica of group {target!r} to hold the tenant under table "
                f"version {table.version} (heard from: "
                f"{sorted(u for u, r in replicas.items() if r.get('group') == target)})"
                if not move.switched_at
                else f"every live replica to acknowledge table version {move.switched_at} "
                f"(lowest now: {min_acknowledged(replicas)})"
            )
        if following is not None:
            if store.put_placement(following.to_doc(), expected_rev=rev):
                under_way = True
                step = Step(name, following, time.monotonic() - started)
                steps.append(step)
                on_step(step)
            continue  # (changed meanwhile: read it again)
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(
                f"moving tenant {tenant_id!r} to group {target!r}: still waiting for {waiting} "
                f"after {timeout_s:g} s; the move stays recorded, run the command again to "
                "resume it"
            )
        time.sleep(poll_s)


__all__ = ["Step", "move_tenant"]
