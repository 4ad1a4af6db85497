"""``tcm_tenant_expected_fpir_ratio{tenant}``: each tenant's FPIR target, the served model's
expected FPIR at tau against a gallery of that tenant's size, from the artefact's open-set tails
(``tcm.openset``), as a running app publishes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tcm import read_manifest, save_openset
from tcm.openset import ProbeTails, fpir, fpir_gallery, probe_tails
from tests.service.conftest import Api, make_settings, unit


def expected_fpir(text: str) -> dict[str, float]:
    fams = [f for f in text_string_to_metric_families(text)]
    (fam,) = [f for f in fams if f.name == "tcm_tenant_expected_fpir_ratio"]
    return {s.labels["tenant"]: s.value for s in fam.samples}


def test_each_tenant_gets_the_expected_fpir_at_its_gallery_size(
    artefact: Path, tmp_path: Path
) -> None:
    # the test artefact with an open-set section: tails of held-out-like embeddings whose
    # impostor scores straddle tau
    served = tmp_path / "artefact"
    shutil.copytree(artefact, served)
    manifest = read_manifest(served)
    tau = manifest.calibration.tau
    # (the digits artefact's tau is about 0.9995: classes of one direction, slightly apart)
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(30), 4)
    x = rng.standard_normal(16) + 0.005 * rng.standard_normal((len(labels), 16))
    tails = probe_tails(x.astype(np.float32), labels)
    doc = json.loads((served / "manifest.json").read_text())
    doc["openset"] = {"file": save_openset(served, tails)}
    (served / "manifest.json").write_text(json.dumps(doc))
    assert 0.0 < fpir(tails, tau, 1) < fpir(tails, tau, 6) < 1.0  # the gauge has room to move

    settings = make_settings(
        served, {"store_url": f"sqlite:///{tmp_path / 'tcm.db'}"}, tenant_label_cap=2
    )
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        small, large, folded = api.new_tenant(), api.new_tenant(), api.new_tenant()
        api.enrol(small, [{"subject": "a", "embedding": unit(1)}])
        api.enrol(large, [{"subject": f"s{i}", "embedding": unit(10 + i)} for i in range(6)])
        api.enrol(folded, [{"subject": "z", "embedding": unit(50)}])
        got = expected_fpir(client.get("/metrics").text)
        # one series per tenant that keeps its id; the folded 'other' has none (its items are
        # several tenants' galleries, no one gallery's size)
        assert got == pytest.approx(
            {small.tenant_id: fpir(tails, tau, 1), large.tenant_id: fpir(tails, tau, 6)}
        )
        assert got[large.tenant_id] > got[small.tenant_id]  # it grows with the gallery


def test_no_open_set_section_no_series(artefact: Path, tmp_path: Path) -> None:
    assert read_manifest(artefact).openset is None
    settings = make_settings(artefact, {"store_url": f"sqlite:///{tmp_path / 'tcm.db'}"})
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        api.enrol(api.new_tenant(), [{"subject": "a", "embedding": unit(1)}])
        assert expected_fpir(client.get("/metrics").text) == {}


def test_the_expected_fpir_follows_the_gallerys_subjects_not_only_its_photos(
    artefact: Path, tmp_path: Path
) -> None:
    """Photos of one subject hit a stranger's probe together: a tenant of 2 subjects x 3
    photos expects less FPIR than one of 6 subjects x 1 (tcm.openset.fpir_gallery). Tails
    written before they kept classes fall back to 6 photos of 6 subjects."""
    served = tmp_path / "artefact"
    shutil.copytree(artefact, served)
    tau = read_manifest(served).calibration.tau
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(30), 4)
    x = rng.standard_normal(16) + 0.005 * rng.standard_normal((len(labels), 16))
    tails = probe_tails(x.astype(np.float32), labels)
    assert tails.has_classes
    doc = json.loads((served / "manifest.json").read_text())
    doc["openset"] = {"file": save_openset(served, tails)}
    (served / "manifest.json").write_text(json.dumps(doc))
    few = fpir_gallery(tails, tau, {3: 2})
    assert few < fpir_gallery(tails, tau, {1: 6}) - 1e-3  # the two shapes are told apart

    settings = make_settings(served, {"store_url": f"sqlite:///{tmp_path / 'tcm.db'}"})
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        grouped, spread = api.new_tenant(), api.new_tenant()
        api.enrol(grouped, [{"subject": f"s{i // 3}", "embedding": unit(i)} for i in range(6)])
        api.enrol(spread, [{"subject": f"s{i}", "embedding": unit(20 + i)} for i in range(6)])
        got = expected_fpir(client.get("/metrics").text)
        assert got[grouped.tenant_id] == pytest.approx(few)
        assert got[spread.tenant_id] == pytest.approx(fpir_gallery(tails, tau, {1: 6}))
        # a removal changes the shape: subject s0 keeps 2 photos
        (first,) = api.enrol(grouped, [{"subject": "s0", "embedding": unit(40)}])
        assert client.delete(f"/v1/gallery/{first}", headers=grouped.auth).status_code == 204
        items = client.get("/v1/gallery", headers=grouped.auth).json()["items"]
        s0 = [i["item_id"] for i in items if i["subject"] == "s0"]
        assert client.delete(f"/v1/gallery/{s0[0]}", headers=grouped.auth).status_code == 204
        got = expected_fpir(client.get("/metrics").text)
        assert got[grouped.tenant_id] == pytest.approx(fpir_gallery(tails, tau, [2, 3]))

    old = ProbeTails(tails.top, tails.impostors, tails.mate)  # no classes kept
    save_openset(served, old)
    settings = make_settings(served, {"store_url": f"sqlite:///{tmp_path / 'tcm2.db'}"})
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        grouped = api.new_tenant()
        api.enrol(grouped, [{"subject": f"s{i // 3}", "embedding": unit(i)} for i in range(6)])
        got = expected_fpir(client.get("/metrics").text)
        assert got[grouped.tenant_id] == pytest.approx(fpir(old, tau, 6))
