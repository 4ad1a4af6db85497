"""Verify by subject compares pairs in bounded memory, and a cap bounds the pairs.

Regression (issue 15): ``{"a": {"subject": "big"}, "b": {"subject": "big"}}`` with 16,000
items under one subject took a real server from 386 MB to 1.43 GB peak RSS for one request (a
full ``a @ b.T``). Here, scaled to 8,000 items (a 256 MB score matrix the old code built), a
real ``tcm-serve`` process's peak RSS (``VmHWM``) may grow by at most 64 MB over the request.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bench.soak import serve
from service.pairwise import max_inner_product
from service.store import NewItem, Tenant
from service.store.sqlite import SQLiteStore
from service.tenants import new_key
from tests.service.conftest import DIM, Api, make_settings, unit

BIG = 8000
HWM_BOUND_MB = 64


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.slow
def test_verify_big_subject_against_itself_stays_within_memory(
    tmp_path: Path, artefact: Path
) -> None:
    db = tmp_path / "tcm.db"
    store = SQLiteStore(db)
    key, token = new_key("t" * 32, time.time())
    store.create_tenant(Tenant("t" * 32, "big", time.time()), key)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((BIG, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for start in range(0, BIG, 1000):
        store.add_items(
            "t" * 32,
            [NewItem(f"i{i}", "big", vectors[i], {}, None) for i in range(start, start + 1000)],
            model_version="digits-test-v1",
            created_at=time.time(),
        )
    store.close()
    expected = float((vectors @ vectors.T).max())  # here, in the test process
    auth = {"Authorization": f"Bearer {token}"}
    env = {"TCM_MAX_VERIFY_PAIRS": str(BIG * BIG), "TCM_MONITOR_ENABLED": "false"}
    with serve(artefact, f"sqlite:///{db}", tmp_path, extra_env=env) as server:
        # warm-up: the same subject loaded and scored against one vector (O(n) memory)
        r = httpx.post(
            f"{server.base}/v1/verify",
            headers=auth,
            timeout=60,
            json={"a": {"subject": "big"}, "b": {"embedding": unit(1)}},
        )
        assert r.status_code == 200, r.text
        before = vm_hwm_mb(server.pid)
        r = httpx.post(
            f"{server.base}/v1/verify",
            headers=auth,
            timeout=60,
            json={"a": {"subject": "big"}, "b": {"subject": "big"}},
        )
        assert r.status_code == 200, r.text
        grown = vm_hwm_mb(server.pid) - before
        assert r.json()["score"] == pytest.approx(min(1.0, expected), abs=1e-5)
        assert r.json()["accepted"] is True
    print(f"verify {BIG} x {BIG} pairs: peak RSS grew {grown:.1f} MB (bound {HWM_BOUND_MB})")
    assert grown < HWM_BOUND_MB, f"peak RSS grew {grown:.0f} MB"


def test_pairs_over_the_cap_are_422(artefact: Path, store_settings) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = make_settings(artefact, store_settings("sqlite"), max_verify_pairs=12)
    with TestClient(create_app(settings)) as c:
        api = Api(c, settings)
        t = api.new_tenant()
        api.enrol(t, [{"subject": "a", "embedding": unit(i)} for i in range(4)])
        api.enrol(t, [{"subject": "b", "embedding": unit(10 + i)} for i in range(3)])
        api.enrol(t, [{"subject": "c", "embedding": unit(20 + i)} for i in range(4)])
        ok = c.post(
            "/v1/verify", json={"a": {"subject": "a"}, "b": {"subject": "b"}}, headers=t.auth
        )
        assert ok.status_code == 200, ok.text  # 12 pairs: at the cap
        r = c.post(
            "/v1/verify", json={"a": {"subject": "a"}, "b": {"subject": "c"}}, headers=t.auth
        )
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "too_many_pairs"
        assert r.json()["detail"] == {"pairs": 16, "max_verify_pairs": 12}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 4),
    st.integers(1, 5),
    st.data(),
)
def test_max_inner_product_matches_the_full_matrix(n, m, d, block, data) -> None:
    """Oracle: ``(a @ b.T).max()``, for every tiling (blocks smaller, equal, larger)."""
    floats = st.floats(-4, 4, width=32, allow_nan=False)
    a = data.draw(arrays(np.float32, (n, d), elements=floats))
    b = data.draw(arrays(np.float32, (m, d), elements=floats))
    assert max_inner_product(a, b, block=block) == float((a @ b.T).max())
