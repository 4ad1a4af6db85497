"""``tcm_tenant_info{tenant, name}``: tenant names on /metrics for the capped tenant label, from
the store's tenant list (both stores), so that PromQL can show names instead of hex ids."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.routers import health
from service.app import create_app
from tests.service.conftest import STORES, Api, make_settings


def tenant_info(text: str) -> dict[str, str]:
    """tenant label -> name, from an exposition."""
    (fam,) = [f for f in text_string_to_metric_families(text) if f.name == "tcm_tenant_info"]
    assert all(s.value == 1.0 for s in fam.samples)
    return {s.labels["tenant"]: s.labels["name"] for s in fam.samples}


@pytest.mark.parametrize("kind", STORES)
def test_tenant_info_names_the_capped_tenants(
    kind: str,
    artefact: Path,
    store_settings: Callable[[str], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(artefact, store_settings(kind), tenant_label_cap=2)
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        assert tenant_info(client.get("/metrics").text) == {}  # no tenants yet
        first = api.new_tenant("Acme Birds")
        second = api.new_tenant("Zoo Zürich")
        third = api.new_tenant("Late Corp")
        # names are re-read at most every 30 s: the first scrape read the empty list
        assert tenant_info(client.get("/metrics").text) == {}
        monkeypatch.setattr(health, "TENANT_NAMES_TTL_S", 0.0)
        names = tenant_info(client.get("/metrics").text)
        # the two oldest keep their id (the cap), the third is folded into `other`, as in
        # every other tenant-labelled metric
        assert names == {
            first.tenant_id: "Acme Birds",
            second.tenant_id: "Zoo Zürich",
            "other": "other",
        }
        assert third.tenant_id not in names
        r = client.delete(f"/v1/tenants/{first.tenant_id}", headers=api.admin)
        assert r.status_code in (200, 204), r.text
        assert tenant_info(client.get("/metrics").text) == {
            second.tenant_id: "Zoo Zürich",
            third.tenant_id: "Late Corp",
        }
