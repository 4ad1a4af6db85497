"""Which shard group serves a tenant, and how a tenant moves between groups without a failed
request (issue 31, items 2 and 4): the pure decisions, with no I/O, so that the exhaustive
interleaving check of the move protocol (``tests/service/domain/test_move_protocol.py``)
checks the very functions the service calls (``service.domain.shard_groups``,
``service.domain.moves``).

The protocol (``docs/scaling.md``, "Moving a tenant"):

- The **placement table** is versioned (every change adds one). Every replica caches a copy and
  publishes the version it has **acknowledged**: its copy's version, held back to the oldest
  version under which it accepted a request that is still unanswered (:func:`acknowledged`).
- A replica **holds** a tenant (index loaded, its change feed followed) while its copy names
  the replica's group as the tenant's owner, or as the source or target of the tenant's move
  (:meth:`Placement.holders`).
- A **move** of tenant t from group S to group T takes three table changes
  (:func:`next_move_step`): ``begin`` records the move (owner still S); T's replicas load and
  follow t and report ready; ``switch``, once every replica of T holds t, makes T the owner;
  ``finish``, once every live replica has acknowledged the switch's version, removes the move,
  and S's replicas drop t when their copy reaches that version.
- **Routing** (:func:`route`) at a replica of group g: the owner's replicas serve what they
  hold; any other replica (or an owner's replica still loading) forwards a request once, to a
  replica of the owner group in its copy that reports holding the tenant, with its copy's
  version; a forwarded request is served wherever the tenant is held (a move's source still
  holds it), makes a receiver whose copy is older than the sender's refresh first, and is
  otherwise refused with 503 and ``Retry-After`` ("loading", "stale placement"), never
  forwarded again. A replica is ready (in the load balancer) when it holds every tenant its
  copy says its group owns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal


@dataclass(frozen=True)
class Move:
    """Tenant ``tenant`` moving from group ``source`` to ``target``; ``switched_at`` is the
    table version that made the target the owner (0 before the switch)."""

    tenant: str
    source: str
    target: str
    switched_at: int = 0


@dataclass(frozen=True)
class Placement:
    """One version of the placement table: hash placement over ``groups`` by default, explicit
    entries (``(tenant, group)`` pairs, e.g. big tenants sized by hand) first, moves in
    progress."""

    version: int
    groups: tuple[str, ...]
    explicit: tuple[tuple[str, str], ...] = ()
    moves: tuple[Move, ...] = ()

    def to_doc(self) -> dict[str, object]:
        """The table as stored (JSON)."""
        return {
            "version": self.version,
            "groups": list(self.groups),
            "explicit": [list(e) for e in self.explicit],
            "moves": [[m.tenant, m.source, m.target, m.switched_at] for m in self.moves],
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Placement:
        groups = tuple(str(g) for g in doc["groups"])
        if not groups or len(set(groups)) != len(groups):
            raise ValueError(f"a placement table needs distinct groups, got {list(groups)}")
        return cls(
            version=int(doc["version"]),
            groups=groups,
            explicit=tuple((str(t), str(g)) for t, g in doc.get("explicit", ())),
            moves=tuple(
                Move(str(t), str(s), str(g), int(v)) for t, s, g, v in doc.get("moves", ())
            ),
        )

    def owner(self, tenant: str) -> str:
        for t, group in self.explicit:
            if t == tenant:
                return group
        digest = hashlib.sha256(tenant.encode()).digest()
        return self.groups[int.from_bytes(digest[:8], "big") % len(self.groups)]

    def move_of(self, tenant: str) -> Move | None:
        return next((m for m in self.moves if m.tenant == tenant), None)

    def holders(self, tenant: str) -> frozenset[str]:
        """The groups whose replicas hold ``tenant`` under this version."""
        move = self.move_of(tenant)
        extra = {move.source, move.target} if move else set()
        return frozenset({self.owner(tenant), *extra})

    def _with_owner(self, tenant: str, group: str) -> tuple[tuple[str, str], ...]:
        return (*((t, g) for t, g in self.explicit if t != tenant), (tenant, group))

    def begin(self, tenant: str, target: str) -> Placement:
        if target not in self.groups:
            raise ValueError(f"unknown group {target!r}; groups: {list(self.groups)}")
        if self.move_of(tenant) is not None:
            raise ValueError(f"tenant {tenant!r} is already moving")
        source = self.owner(tenant)
        if source == target:
            raise ValueError(f"tenant {tenant!r} is already in group {target!r}")
        return replace(
            self,
            version=self.version + 1,
            explicit=self._with_owner(tenant, source),  # pinned: a new group cannot rehash it
            moves=(*self.moves, Move(tenant, source, target)),
        )

    def switch(self, tenant: str) -> Placement:
        move = self.move_of(tenant)
        if move is None or move.switched_at:
            raise ValueError(f"tenant {tenant!r} has no move waiting to switch")
        version = self.version + 1
        moves = tuple(replace(m, switched_at=version) if m == move else m for m in self.moves)
        return replace(
            self, version=version, explicit=self._with_owner(tenant, move.target), moves=moves
        )

    def finish(self, tenant: str) -> Placement:
        move = self.move_of(tenant)
        if move is None or not move.switched_at:
            raise ValueError(f"tenant {tenant!r} has no switched move to finish")
        return replace(
            self, version=self.version + 1, moves=tuple(m for m in self.moves if m != move)
        )


def balanced(sizes: Mapping[str, int], table: Placement) -> dict[str, str]:
    """A size-aware placement of the tenants (id -> items) over ``table``'s groups: largest
    first, each to the group holding the fewest items so far (longest-processing-time first:
    the largest group is within 4/3 of the best possible, and within one tenant of the
    average), a tie going to the tenant's current owner so that fewer tenants move. Returns
    each tenant's group; the ones that differ from ``table.owner`` are the moves to make."""
    load = dict.fromkeys(table.groups, 0)
    plan: dict[str, str] = {}
    for tenant in sorted(sizes, key=lambda t: (-sizes[t], t)):
        least = min(load.values())
        current = table.owner(tenant)
        group = current if load[current] == least else min(load, key=lambda g: (load[g], g))
        plan[tenant] = group
        load[group] += sizes[tenant]
    return plan


def largest_group_drop(now: Mapping[str, int], after: Mapping[str, int]) -> float:
    """How much a plan shrinks the largest group (items per group now and after): 0.25 when
    it holds a quarter fewer items; 0 for an empty fleet. What ``--balance --min-gain``
    compares, so that a small gain moves nobody (a rebalancer run on a schedule must not
    move tenants back and forth over a few items)."""
    largest = max(now.values(), default=0)
    if largest == 0:
        return 0.0
    return (largest - max(after.values(), default=0)) / largest


def retiring(sizes: Mapping[str, int], table: Placement, group: str) -> dict[str, str]:
    """Where the tenants of ``group`` go when it is retired (tenant id -> items for every
    tenant): largest first, each to the remaining group holding the fewest items so far,
    counting what each holds now (the same rule as :func:`balanced`, with the others' tenants
    staying where they are). Returns the new group of each of ``group``'s tenants."""
    if group not in table.groups:
        raise ValueError(f"unknown group {group!r}; groups: {list(table.groups)}")
    rest = [g for g in table.groups if g != group]
    if not rest:
        raise ValueError(f"{group!r} is the only group: there is nowhere to move its tenants")
    moving = [t for t in table.moves if group in (t.source, t.target)]
    if moving:
        raise ValueError(
            f"tenant {moving[0].tenant!r} is moving from {moving[0].source!r} to "
            f"{moving[0].target!r}: finish that move first (--move)"
        )
    load = dict.fromkeys(rest, 0)
    leaving = []
    for tenant, n in sizes.items():
        owner = table.owner(tenant)
        if owner == group:
            leaving.append(tenant)
        elif owner in load:
            load[owner] += n
    plan: dict[str, str] = {}
    for tenant in sorted(leaving, key=lambda t: (-sizes[t], t)):
        target = min(load, key=lambda g: (load[g], g))
        plan[tenant] = target
        load[target] += sizes[tenant]
    return plan


def next_move_step(
    table: Placement, tenant: str, *, target_ready: bool, min_acknowledged: int
) -> Placement | None:
    """The controller's next table for ``tenant``'s move, or None while it must wait:
    ``target_ready``: every replica of the target group holds the tenant (loaded, following);
    ``min_acknowledged``: the lowest version acknowledged by a live replica of any group."""
    move = table.move_of(tenant)
    if move is None:
        return None
    if not move.switched_at:
        return table.switch(tenant) if target_ready else None
    return table.finish(tenant) if min_acknowledged >= move.switched_at else None


def target_ready(replicas: Mapping[str, Mapping[str, Any]], group: str, version: int) -> bool:
    """Whether the live replicas (URL -> heartbeat, as ``Store.list_replicas`` gives them)
    include ``group``'s, and every one of them holds, loaded, every tenant that table
    ``version`` (or a later one) gives it."""
    ready = [int(r.get("ready", 0)) for r in replicas.values() if r.get("group") == group]
    return bool(ready) and min(ready) >= version


def min_acknowledged(replicas: Mapping[str, Mapping[str, Any]]) -> int:
    """The lowest table version a live replica of any group has acknowledged (0 for one that
    does not say: it holds a move back rather than let it finish too soon)."""
    return min((int(r.get("acknowledged", 0)) for r in replicas.values()), default=0)


def acknowledged(table_version: int, unanswered: tuple[int, ...] | list[int]) -> int:
    """What a replica publishes: its copy's version, held back to the oldest version under which
    it accepted a request it has not answered yet (that request may still reach a group that
    the newer table no longer routes to)."""
    return min([table_version, *unanswered])


@dataclass(frozen=True)
class Serve:
    pass


@dataclass(frozen=True)
class Forward:
    group: str
    version: int  # the sender's copy: the receiver refreshes first when its own is older


@dataclass(frozen=True)
class Refresh:
    """The receiver's copy is older than the sender's: read the table again, then decide."""


@dataclass(frozen=True)
class Refuse:
    reason: Literal["loading", "stale placement"]
    retry_after_s: int = 1


Decision = Serve | Forward | Refresh | Refuse


def route(
    table: Placement, group: str, holds: bool, tenant: str, forwarded_under: int | None
) -> Decision:
    """What a replica of ``group`` (holding ``tenant`` or not) does with a request for it;
    ``forwarded_under``: the sender's table version when another replica forwarded it, None
    when it came from a client."""
    if forwarded_under is not None and forwarded_under > table.version:
        return Refresh()
    owner = table.owner(tenant)
    if owner == group and holds:
        return Serve()
    if forwarded_under is None:  # to the owner, or to a peer that has loaded it (this one is
        return Forward(owner, table.version)  # restarting: the load balancer should skip it)
    if owner == group:
        return Refuse("loading")
    # forwarded once already: serve it if the tenant is here (a move's source), never forward
    return Serve() if holds else Refuse("stale placement")
