"""Replicas report the same monitoring snapshot.

Regression: each replica refreshed on its own schedule, adopting the stored snapshot while it
was younger than half an interval and recomputing otherwise. With schedules out of phase (three
replicas a third of an interval apart) they took turns computing and, at every moment, reported
at least two different snapshots: `max(tcm_opis)` across replicas mixed snapshots and the
dashboards flickered. Between refreshes a replica now polls the store and publishes a newer
snapshot at once, so all report the one just computed within ``poll_s``, without computing more.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from service.metrics import ServiceMetrics
from service.monitoring import MonitorConfig
from service.monitoring.monitor import Monitor
from service.store import Store
from tests.service.monitoring.test_monitor import healthy_and_drifting, samples, synthetic_manifest

INTERVAL = 60.0


def replicas(
    store: Store, n: int, now: list[float], interval_s: float = INTERVAL
) -> tuple[list[Monitor], list[CollectorRegistry]]:
    healthy_and_drifting(store, drift=True)
    cfg = MonitorConfig(interval_s=interval_s)
    registries = [CollectorRegistry() for _ in range(n)]
    mons = [
        Monitor(
            store,
            synthetic_manifest(),
            ServiceMetrics(reg, tenant_label_cap=50),
            cfg,
            clock=lambda: now[0],
        )
        for reg in registries
    ]
    return mons, registries


def reported(mons: list[Monitor]) -> list[float | None]:
    """The snapshot each replica reports (what its tcm_monitor_* gauges expose)."""
    return [None if m.snapshot is None else m.snapshot.computed_at for m in mons]


def runs(registries: list[CollectorRegistry], result: str) -> float:
    return sum(
        samples(r).get(("tcm_monitor_runs_total", (("result", result),)), 0.0) for r in registries
    )


def test_out_of_phase_replicas_report_one_snapshot(sqlite_stores) -> None:
    now = [1000.0]
    mons, registries = replicas(sqlite_stores(), 3, now)
    poll = mons[0].poll_s
    assert 0 < poll <= INTERVAL / 4
    cycles, agreed = 4, 0
    for cycle in range(cycles):
        for i, mon in enumerate(mons):  # each replica's refresh, a third of an interval apart
            now[0] = 1000.0 + cycle * INTERVAL + i * INTERVAL / 3
            mon.refresh()
            now[0] += poll  # the others' next poll
            for other in mons:
                other.adopt_newer()
            if cycle > 0 or i == len(mons) - 1:  # once every replica has published once
                ts = reported(mons)
                assert len(set(ts)) == 1 and ts[0] is not None, (cycle, i, ts)
                agreed += 1
    assert agreed == cycles * 3 - 2
    # the gauges say the same: every replica exposes the one snapshot
    stamps = {samples(r)[("tcm_monitor_snapshot_timestamp_seconds", ())] for r in registries}
    opis = {samples(r)[("tcm_opis", ())] for r in registries}
    assert len(stamps) == 1 and len(opis) == 1
    # polling publishes what others computed and never computes: at most one computation per
    # half interval across the replicas, as before
    assert runs(registries, "computed") <= 2 * cycles + 1
    assert runs(registries, "adopted") > 0


def test_adopt_newer_takes_only_newer_snapshots_of_the_same_configuration(sqlite_stores) -> None:
    now = [1000.0]
    (a, b), (_, reg_b) = replicas(sqlite_stores(), 2, now)
    assert b.adopt_newer() is False  # nothing stored yet
    first = a.refresh()
    assert b.adopt_newer() is True and b.snapshot == first
    assert b.adopt_newer() is False  # not newer than what it reports
    now[0] += 40.0
    second = b.refresh()  # b computes (40 s > half an interval) and stores
    assert a.adopt_newer() is True and a.snapshot == second
    # a replica with another configuration (or model) never adopts it
    other = Monitor(
        a.store,
        synthetic_manifest(),
        ServiceMetrics(CollectorRegistry(), tenant_label_cap=50),
        MonitorConfig(interval_s=INTERVAL, window_s=10.0),
        clock=lambda: now[0],
    )
    assert other.adopt_newer() is False and other.snapshot is None
    adopted = samples(reg_b)[("tcm_monitor_runs_total", (("result", "adopted"),))]
    assert adopted == 1


def test_schedule_polls_between_refreshes(sqlite_stores) -> None:
    """The background schedule itself: a replica whose next refresh is seconds away reports the
    snapshot another replica just stored within about one poll."""

    async def scenario() -> None:
        now = [1000.0]
        (a, b), _ = replicas(sqlite_stores(), 2, now, interval_s=4.0)  # poll_s = 1 s
        assert b.poll_s == 1.0
        await b.start()  # computes at once, then refreshes only after about 4 s
        try:
            for _ in range(100):
                if b.snapshot is not None:
                    break
                await asyncio.sleep(0.02)
            first = b.snapshot
            assert first is not None
            now[0] += 0.5  # a computes a newer one
            newer = await asyncio.to_thread(a.refresh, force=True)
            assert newer.computed_at > first.computed_at
            loop = asyncio.get_running_loop()
            started = loop.time()
            while b.snapshot != newer:
                assert loop.time() - started < 2.5, "b did not pick it up between refreshes"
                await asyncio.sleep(0.02)
        finally:
            await b.close()

    asyncio.run(scenario())
