"""The cores the server gives its workers: its affinity where the platform has one (Linux), the
machine's count elsewhere (macOS has no ``sched_getaffinity``), one left to the event loop."""

from __future__ import annotations

import os

import pytest

from service.engine.cores import cores_but_one


def test_affinity_less_one() -> None:
    assert cores_but_one() == max(1, len(os.sched_getaffinity(0)) - 1)


def test_without_affinity_the_machines_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cores_but_one() == 7
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one core, all to the loop
    assert cores_but_one() == 1
