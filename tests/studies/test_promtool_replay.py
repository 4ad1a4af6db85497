"""studies.promtool_replay: /metrics texts -> promtool input series -> the alerts' states over
simulated time, on hand-made rules whose answer is known."""

from __future__ import annotations

from pathlib import Path

import pytest

from studies.promtool_replay import (
    AlertState,
    alert_timeline,
    first_seen,
    parse_duration,
    rule_for_seconds,
    scrape,
    series_values,
)
from tests.deploy.conftest import tool


def test_parse_duration() -> None:
    assert parse_duration("15s") == 15
    assert parse_duration("1m30s") == 90
    assert parse_duration("2h") == 7200
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("15 s")


def test_scrape_keeps_the_named_series_with_the_job_labels() -> None:
    text = (
        "# HELP tcm_x a gauge\n# TYPE tcm_x gauge\n"
        'tcm_x{tenant="a"} 0.5\ntcm_x{tenant="b"} NaN\n'
        "# HELP tcm_y another\n# TYPE tcm_y gauge\ntcm_y 3\n"
    )
    got = scrape(text, {"tcm_x"})
    assert got.keys() == {
        'tcm_x{instance="a",job="tcm-service",tenant="a"}',
        'tcm_x{instance="a",job="tcm-service",tenant="b"}',
    }
    assert got['tcm_x{instance="a",job="tcm-service",tenant="a"}'] == 0.5


def test_series_values_by_hand() -> None:
    # steps 0-2 the first stage, 3-5 the second, 6 the third (7 steps)
    stages = [(0, {"a": 1.0, "b": 2.0}), (3, {"a": 4.0}), (6, {"a": 5.0, "b": 6.0})]
    got = series_values(stages, 7)
    # promtool: "vxn" is n+1 samples, "_xn" n missing ones, "stale" one staleness marker
    assert got == {"a": "1.0x2 4.0x2 5.0", "b": "2.0x2 stale _x2 6.0"}
    with pytest.raises(ValueError):
        series_values([(1, {"a": 1.0})], 3)


def test_timeline_of_a_known_rule(tmp_path: Path) -> None:
    """x > 1 for 2m: the second stage (from 5m) makes it pending at 5m and firing 2m later."""
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n- name: g\n  rules:\n  - alert: TCMTenantLevelDegraded\n"
        "    expr: max by (tenant) (tcm_x) > 1\n    for: 2m\n"
        "    labels: {action: retrain}\n"
    )
    assert rule_for_seconds(["TCMTenantLevelDegraded"], [rules]) == {
        "TCMTenantLevelDegraded": [120.0]
    }
    gauge = "# HELP tcm_x g\n# TYPE tcm_x gauge\n"
    healthy = gauge + 'tcm_x{tenant="a"} 0\ntcm_x{tenant="b"} 0\n'
    drifted = gauge + 'tcm_x{tenant="a"} 0\ntcm_x{tenant="b"} 3\n'
    timeline = alert_timeline(
        [(0.0, healthy), (300.0, drifted)],
        horizon_s=600.0,
        step_s=60.0,
        rule_files=[rules],
        promtool=tool("promtool"),
    )
    assert sorted(timeline) == [60.0 * i for i in range(11)]
    assert all(timeline[60.0 * i] == set() for i in range(5))
    assert timeline[300.0] == {AlertState("TCMTenantLevelDegraded", "b", "retrain", "pending")}
    assert timeline[420.0] == {AlertState("TCMTenantLevelDegraded", "b", "retrain", "firing")}
    assert first_seen(timeline, since=300.0, tenant="b", state="pending") == {
        "TCMTenantLevelDegraded/retrain": 0.0
    }
    assert first_seen(timeline, since=300.0, tenant="b", state="firing") == {
        "TCMTenantLevelDegraded/retrain": 120.0
    }
    assert first_seen(timeline, since=300.0, tenant="a", state="pending") == {}
