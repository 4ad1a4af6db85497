"""The tenant-move protocol (issue 31 item 4; ``service.domain.placement``), checked by
exhaustive interleaving: every order in which replicas refresh their copy of the placement
table, load or drop the tenant, the controller steps the move, and client requests arrive at any
replica, are forwarded, delivered to any replica of a group and answered.

Properties, over every reachable end state: every request is answered by a replica that holds
the tenant (no refusal, no answer from a replica without it: never misrouted), no request is
forwarded twice, and the move finishes with only the target group holding the tenant. Each
rule of the protocol is then removed in turn (a mutant) and the check must find the request
that fails. With ``crashes=1`` any one replica may also crash at any point (losing its index
and its unanswered requests, which fail with it, as do forwards to a group left with no live
replica) and restart; the controller counts live replicas only, and a restarted replica reads
the table before it routes anything. Not modelled: the store itself (Redis Cluster's own
failover is issue 31's item 1)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest

from service.domain import placement as pl

TENANT = "acme"
GROUPS = ("S", "T", "X")


@dataclass(frozen=True)
class Protocol:
    """The rules under check; a mutant replaces one."""

    route: Callable[..., pl.Decision] = pl.route
    step: Callable[..., pl.Placement | None] = pl.next_move_step
    acknowledged: Callable[..., int] = pl.acknowledged
    refresh_on_restart: bool = True


@dataclass(frozen=True)
class Req:
    # pending | exec (at `at`) | net (to group `group`) | ok | failed
    phase: str = "pending"
    at: int = -1  # the replica answering it (exec)
    sender: int = -1  # the replica a client sent it to (it stays unanswered there)
    sent_under: int = 0  # the version under which `sender` routed it
    served_under: int = 0  # the version under which `at` accepted it
    group: str = ""
    why: str = ""


@dataclass(frozen=True)
class State:
    tables: tuple[pl.Placement, ...]  # every version so far; the last is the store's
    cached: tuple[int, ...]  # each replica's copy (a version)
    holds: tuple[bool, ...]
    reqs: tuple[Req, ...]
    alive: tuple[bool, ...]
    crashes_left: int = 0


def initial(groups_of: tuple[str, ...], requests: int, crashes: int = 0) -> State:
    table = pl.Placement(version=1, groups=GROUPS, explicit=((TENANT, "S"),))
    return State(
        tables=(table,),
        cached=tuple(1 for _ in groups_of),
        holds=tuple(g == "S" for g in groups_of),
        reqs=tuple(Req() for _ in range(requests)),
        alive=tuple(True for _ in groups_of),
        crashes_left=crashes,
    )


def unanswered(s: State, r: int) -> list[int]:
    """The versions under which replica r accepted requests still unanswered."""
    out = []
    for q in s.reqs:
        if q.phase in ("exec", "net") and q.sender == r:
            out.append(q.sent_under)
        if q.phase == "exec" and q.at == r:
            out.append(q.served_under)
    return out


def successors(s: State, groups_of: tuple[str, ...], p: Protocol) -> Iterator[State]:
    store = s.tables[-1]
    n = len(groups_of)
    live = [r for r in range(n) if s.alive[r]]
    for r in range(n):
        if not s.alive[r]:  # it restarts with an empty memory, and reads the table first
            cached = store.version if p.refresh_on_restart else s.cached[r]
            yield replace(s, alive=_set(s.alive, r, True), cached=_set(s.cached, r, cached))
            continue
        if s.crashes_left:
            yield _crash(s, r)
        if s.cached[r] < store.version:  # a replica reads the table again
            yield replace(s, cached=_set(s.cached, r, store.version))
        should = groups_of[r] in s.tables[s.cached[r] - 1].holders(TENANT)
        if should != s.holds[r]:  # loads (and follows) or drops the tenant
            yield replace(s, holds=_set(s.holds, r, should))
    # the controller: begin once, then the protocol's steps
    if store.version == 1:
        yield replace(s, tables=(*s.tables, store.begin(TENANT, "T")))
    else:
        targets = [r for r in live if groups_of[r] == "T"]
        ready = bool(targets) and all(s.holds[r] for r in targets)
        acked = min(p.acknowledged(s.cached[r], unanswered(s, r)) for r in live)
        nxt = p.step(store, TENANT, target_ready=ready, min_acknowledged=acked)
        if nxt is not None:
            yield replace(s, tables=(*s.tables, nxt))
    for i, q in enumerate(s.reqs):
        if q.phase == "pending":
            if any(o.phase == "pending" for o in s.reqs[:i]):
                continue  # requests are alike: the first pending one arrives first
            for r in live:  # the load balancer sends it to any ready replica
                table = s.tables[s.cached[r] - 1]
                if table.owner(TENANT) == groups_of[r] and not s.holds[r]:
                    continue  # not ready: it has not loaded a tenant its group owns
                d = p.route(table, groups_of[r], s.holds[r], TENANT, None)
                yield _decided(s, i, d, r, r, s.cached[r])
        elif q.phase == "net":
            # a forward goes to a live replica of the group that reports holding the tenant
            holders = [r for r in live if groups_of[r] == q.group and s.holds[r]]
            if not holders:
                yield replace(s, reqs=_set(s.reqs, i, Req("failed", why="no holder in the group")))
            for r in holders:
                cached = s.cached[r]
                d = p.route(s.tables[cached - 1], q.group, s.holds[r], TENANT, q.sent_under)
                if isinstance(d, pl.Refresh):  # one read of the table, then decide
                    cached = store.version
                    d = p.route(s.tables[cached - 1], q.group, s.holds[r], TENANT, q.sent_under)
                t = replace(s, cached=_set(s.cached, r, cached))
                yield _decided(t, i, d, r, q.sender, q.sent_under, forwarded=True)
        elif q.phase == "exec":  # answered from the index, which must hold the tenant
            done = Req("ok") if s.holds[q.at] else Req("failed", why="answered without the tenant")
            yield replace(s, reqs=_set(s.reqs, i, done))


def _crash(s: State, r: int) -> State:
    """Replica r dies: its index is gone, and so is every request it had not answered."""
    reqs = tuple(
        Req("failed", why="crashed")
        if q.phase in ("exec", "net") and r in (q.sender, q.at if q.phase == "exec" else -1)
        else q
        for q in s.reqs
    )
    return replace(
        s,
        alive=_set(s.alive, r, False),
        holds=_set(s.holds, r, False),
        reqs=reqs,
        crashes_left=s.crashes_left - 1,
    )


def _decided(
    s: State,
    i: int,
    d: pl.Decision,
    r: int,
    sender: int,
    sent_under: int,
    *,
    forwarded: bool = False,
) -> State:
    if isinstance(d, pl.Serve):
        q = Req("exec", at=r, sender=sender, sent_under=sent_under, served_under=s.cached[r])
    elif isinstance(d, pl.Forward):
        q = (
            Req("failed", why="forwarded twice")
            if forwarded
            else Req("net", sender=r, sent_under=d.version, group=d.group)
        )
    elif isinstance(d, pl.Refuse):
        q = Req("failed", why=f"refused: {d.reason}")
    else:
        q = Req("failed", why="refresh did not settle")
    return replace(s, reqs=_set(s.reqs, i, q))


def _set(t: tuple, i: int, v: object) -> tuple:
    return (*t[:i], v, *t[i + 1 :])


@dataclass
class Outcome:
    states: int
    ends: int
    failures: set[str]
    unfinished: int  # end states where the move did not finish
    wrong_holders: int  # end states where a replica holds what its final copy says it must not


def explore(
    groups_of: tuple[str, ...],
    requests: int,
    p: Protocol = Protocol(),
    crashes: int = 0,
    stop_at: Callable[[str], bool] = lambda why: False,
) -> Outcome:
    """Every reachable state from the start; ``stop_at(why)``: return at the first such failure
    (a mutant's check needs one counterexample, not the whole space)."""
    start = initial(groups_of, requests, crashes)
    seen, stack = {start}, [start]
    ends = unfinished = wrong = 0
    failures: set[str] = set()
    while stack:
        s = stack.pop()
        nexts = list(successors(s, groups_of, p))
        for q in s.reqs:
            if q.phase == "failed":
                failures.add(q.why)
                if stop_at(q.why):
                    return Outcome(len(seen), ends, failures, unfinished, wrong)
        if not nexts:
            ends += 1
            final = s.tables[-1]
            if final.moves or final.owner(TENANT) != "T" or len(s.tables) < 4:
                unfinished += 1
            if any(h != (g == "T") for h, g in zip(s.holds, groups_of, strict=True)):
                wrong += 1
        for t in nexts:
            if t not in seen:
                seen.add(t)
                stack.append(t)
    return Outcome(len(seen), ends, failures, unfinished, wrong)


# S has one replica, T two (the switch waits for both), X one that owns nothing of this tenant
FLEET = ("S", "T", "T", "X")


def test_every_interleaving_answers_every_request_and_finishes_the_move() -> None:
    out = explore(FLEET, requests=2)
    assert out.states > 10_000 and out.ends > 0  # the space really was explored
    assert out.failures == set()
    assert out.unfinished == 0 and out.wrong_holders == 0


# groups of two replicas (the shard groups): one crash must cost only what it held
PAIRS = ("S", "S", "T", "T", "X")


def test_a_crash_during_a_move_costs_only_the_dead_replicas_requests() -> None:
    out = explore(PAIRS, requests=1, crashes=1)
    assert out.states > 10_000
    assert out.failures == {"crashed"}
    assert out.unfinished == 0 and out.wrong_holders == 0


def test_a_restarted_replica_must_read_the_table_before_routing() -> None:
    mutant = Protocol(refresh_on_restart=False)
    out = explore(PAIRS, 1, mutant, crashes=1, stop_at=lambda why: why != "crashed")
    assert out.failures - {"crashed"}, out.failures


def _finish_at_once(table: pl.Placement, tenant: str, **facts: object) -> pl.Placement | None:
    return pl.next_move_step(
        table, tenant, target_ready=facts["target_ready"], min_acknowledged=10**9
    )


def _switch_before_ready(table: pl.Placement, tenant: str, **facts: object) -> pl.Placement | None:
    return pl.next_move_step(
        table, tenant, target_ready=True, min_acknowledged=facts["min_acknowledged"]
    )


@pytest.mark.parametrize(
    "mutant, failure",
    [
        # the source drops the tenant while a stale replica's forward is still on its way
        (Protocol(step=_finish_at_once), "no holder in the group"),
        # the target becomes the owner before its replicas have loaded the tenant
        (Protocol(step=_switch_before_ready), "no holder in the group"),
        # acknowledging the new version while a request routed under the old one is unanswered
        (Protocol(acknowledged=lambda version, unanswered: version), "no holder in the group"),
    ],
)
def test_each_rule_is_needed(mutant: Protocol, failure: str) -> None:
    out = explore(FLEET, requests=1, p=mutant, stop_at=lambda why: why == failure)
    assert failure in out.failures, out.failures


def test_routing_decisions() -> None:
    t = pl.Placement(version=3, groups=GROUPS, explicit=((TENANT, "S"),))
    assert pl.route(t, "S", True, TENANT, None) == pl.Serve()
    assert pl.route(t, "S", False, TENANT, None) == pl.Forward("S", 3)  # to a peer holding it
    assert pl.route(t, "S", False, TENANT, 3) == pl.Refuse("loading")  # forwarded once already
    assert pl.route(t, "X", False, TENANT, None) == pl.Forward("S", 3)
    assert pl.route(t, "X", False, TENANT, 2) == pl.Refuse("stale placement")
    assert pl.route(t, "X", True, TENANT, 2) == pl.Serve()  # a move's source still holds it
    assert pl.route(t, "X", False, TENANT, 4) == pl.Refresh()  # the sender's table is newer


def test_the_table_refuses_impossible_moves() -> None:
    t = pl.Placement(version=1, groups=GROUPS, explicit=((TENANT, "S"),))
    with pytest.raises(ValueError, match="unknown group"):
        t.begin(TENANT, "Z")
    with pytest.raises(ValueError, match="already in group"):
        t.begin(TENANT, "S")
    moving = t.begin(TENANT, "T")
    with pytest.raises(ValueError, match="already moving"):
        moving.begin(TENANT, "X")
    with pytest.raises(ValueError, match="no switched move"):
        moving.finish(TENANT)
    switched = moving.switch(TENANT)
    assert switched.owner(TENANT) == "T" and switched.holders(TENANT) == {"S", "T"}
    done = switched.finish(TENANT)
    assert done.version == 4 and done.holders(TENANT) == {"T"} and not done.moves


def test_hash_placement_is_stable_and_uses_every_group() -> None:
    t = pl.Placement(version=1, groups=GROUPS)
    owners = [t.owner(f"tenant-{i}") for i in range(300)]
    assert owners == [t.owner(f"tenant-{i}") for i in range(300)]
    assert set(owners) == set(GROUPS)
    # a big tenant pinned by an explicit entry goes where it is told
    pinned = replace(t, explicit=(("tenant-0", "X"),))
    assert pinned.owner("tenant-0") == "X"
