"""The drift alerts on real bird photos, through the app with the committed default model and
the project's alert rules as committed (``for: 30m`` included), in simulated time.

Three healthy tenants enrol photos of CUB species the model never saw (10 species x 8 photos
each, as in ``studies/drift_sensitivity.py``); a fourth enrols 10 other species whose photos are
all degraded (JPEG quality 1, far past the smallest degradation the study found alerting), as
images; a fifth enrols the same degraded photos' vectors as bare embeddings, which
export-dataset cannot export. The app's monitor measures after each step (refreshed on demand),
and ``promtool test rules`` replays its /metrics into the rules (``studies.promtool_replay``):

- the drifter's per-tenant alerts fire for it alone, saying ``action: retrain``; the healthy
  tenants stay quiet throughout;
- the embeddings-only tenant's alerts say ``action: investigate``, never ``retrain``, and so do
  the fleet-wide ones while it drifts;
- export-dataset takes the drifter's photos and leaves the embeddings-only tenant out.

The retrain -> stage -> activate -> clear part of the loop is tests/test_drift_loop.py's (b), on
a small digits model: retraining the Lite0 head on exported photos, and re-embedding the
galleries with it, would cost minutes of CPU here.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as serve_cli
from service.settings import Settings
from studies import drift_sensitivity as study
from studies.promtool_replay import DRIFT_ALERTS, TENANT_ALERTS, AlertState, alert_timeline
from tcm.exported import tenant_of
from tests.deploy.conftest import tool
from tests.training.conftest import DATA_DIR

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"Authorization": f"Bearer {study.ADMIN_TOKEN}"}
DEGRADED = study.Degradation("jpeg", 1)
MINUTE = 60.0
# when each stage's snapshot reaches Prometheus (the monitor's 60 s after each enrolment)
DRIFTER_SEEN, EMBEDDINGS_SEEN, END = 11 * MINUTE, 61 * MINUTE, 100 * MINUTE


@pytest.fixture(scope="module")
def photos() -> tuple[dict[str, list[tuple[str, bytes]]], list[list[study.Photo]]]:
    if not Path(DATA_DIR, "cub200_subset100").is_dir():
        pytest.fail(f"shared data sets missing at {DATA_DIR}")
    species = study.test_species_photos(Path(DATA_DIR))
    pool = study.draw_pool(species)
    order = list(np.random.default_rng(1).permutation(sorted(species)))
    rng = np.random.default_rng(2)
    tenants = [
        study.tenant_photos(pool, order[i * 10 : (i + 1) * 10], rng)
        for i in range(study.HEALTHY_FLEET + 1)
    ]
    return species, tenants


def new_tenant(c: TestClient, name: str) -> tuple[str, dict[str, str]]:
    r = c.post("/v1/tenants", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["tenant_id"], {"Authorization": f"Bearer {r.json()['api_key']}"}


def enrol_photos(
    c: TestClient, name: str, photos: list[study.Photo], files: dict, how: study.Degradation
) -> tuple[str, dict[str, str], list[str]]:
    tenant, auth = new_tenant(c, name)
    items = [
        {"subject": p[0], "image": base64.b64encode(study.degrade(files[p], how)).decode()}
        for p in photos
    ]
    r = c.post("/v1/gallery", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.text
    return tenant, auth, r.json()["item_ids"]


def at(timeline: dict[float, set[AlertState]], t: float) -> set[AlertState]:
    return {a for a in timeline[t] if a.alertname in DRIFT_ALERTS}


def test_degraded_real_photos_alert_for_their_tenant_only(
    tmp_path: Path, photos: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    promtool = tool("promtool")
    # tenant ids seed each tenant's level reference (service.monitoring.monitor
    # .reference_seed): fixed ids make the references, and so the test, the same on every run
    ids = np.random.default_rng(29)
    monkeypatch.setattr(
        "service.domain.tenants.uuid",
        SimpleNamespace(uuid4=lambda: uuid.UUID(int=int(ids.integers(2**63)) << 64 | 29)),
    )
    species, (*healthy_photos, drifter_photos) = photos
    files = {(s, name): data for s in species for name, data in species[s]}
    settings = Settings(
        artefact_path=ROOT / "artefacts" / "default",
        admin_token=study.ADMIN_TOKEN,
        device="cpu",
        store_url=f"sqlite:///{tmp_path / 'tcm.db'}",
    )
    with TestClient(create_app(settings)) as c:
        mon = c.app.state.monitor
        healthy = [
            enrol_photos(c, f"healthy-{i}", p, files, study.CLEAN)[0]
            for i, p in enumerate(healthy_photos)
        ]
        mon.refresh(force=True)
        scrapes = [(0.0, c.get("/metrics").text)]
        drifter, auth, item_ids = enrol_photos(c, "blurry-cam", drifter_photos, files, DEGRADED)
        snap = mon.refresh(force=True)
        scrapes.append((DRIFTER_SEEN, c.get("/metrics").text))
        healthy_rows = {t: snap.tenants[t] for t in healthy}
        row = snap.tenants[drifter]
        assert row.exportable_ratio == 1.0
        # the same degraded vectors, enrolled bare: nothing to export, nothing to retrain on
        vectors = [
            c.get(f"/v1/gallery/{i}", params={"include_embedding": "true"}, headers=auth).json()
            for i in item_ids
        ]
        emb_only, emb_auth = new_tenant(c, "vectors-only")
        items = [{"subject": v["subject"], "embedding": v["embedding"]} for v in vectors]
        r = c.post("/v1/gallery", json={"items": items}, headers=emb_auth)
        assert r.status_code == 201, r.text
        snap = mon.refresh(force=True)
        scrapes.append((EMBEDDINGS_SEEN, c.get("/metrics").text))
        assert snap.tenants[emb_only].exportable_ratio == 0.0

        monkeypatch.setenv("TCM_STORE_URL", settings.store_url)
        monkeypatch.setenv("TCM_ARTEFACT_PATH", str(settings.artefact_path))
        out = CliRunner().invoke(serve_cli, ["export-dataset", "--out", str(tmp_path / "export")])
        assert out.exit_code == 0, out.output
    # 4 tenants' photos (40 species x 8), none of the vectors-only tenant's items
    said = " ".join(out.output.split())
    assert "exported 320 images of 40 subjects" in said, said
    assert "80 items without a stored image left out" in said, said
    exported = {tenant_of(d.name) for d in (tmp_path / "export").iterdir() if d.is_dir()}
    assert drifter in exported and emb_only not in exported, exported

    timeline = alert_timeline(scrapes, horizon_s=END, step_s=MINUTE, promtool=promtool)
    gallery = row.by_source.gallery
    level = row.subjects.level_reference
    print(
        f"degraded ({DEGRADED.key}) tenant: utility at tau {gallery.utility:.3f} (its reference "
        f"{level.utility['lo']:.3f}-{level.utility['hi']:.3f}), FRR {gallery.frr:.3f}, "
        f"FAR {gallery.far:.3f}; healthy: "
        + ", ".join(
            f"{healthy_rows[t].by_source.gallery.utility:.3f} (reference lo "
            f"{healthy_rows[t].subjects.level_reference.utility['lo']:.3f})"
            for t in healthy
        )
    )
    # the healthy fleet alone: quiet
    for t in range(0, int(DRIFTER_SEEN), int(MINUTE)):
        assert at(timeline, t) == set(), (t, at(timeline, t))
    # pending from the first snapshot that has the drifter; firing after the rules' for: (30m)
    assert any(a.tenant == drifter for a in at(timeline, DRIFTER_SEEN + MINUTE))
    before_emb = at(timeline, EMBEDDINGS_SEEN - MINUTE)
    per_tenant = {a for a in before_emb if a.alertname in TENANT_ALERTS}
    assert {a.tenant for a in per_tenant} == {drifter}, before_emb
    assert AlertState("TCMTenantLevelDegraded", drifter, "retrain", "firing") in per_tenant
    assert {a.action for a in per_tenant} == {"retrain"}, per_tenant
    # the vectors-only tenant drifts alike: its alerts say investigate; no healthy tenant alerts
    end = at(timeline, END)
    assert AlertState("TCMTenantLevelDegraded", emb_only, "investigate", "firing") in end, end
    assert not {a for a in end if a.tenant == emb_only and a.action == "retrain"}, end
    assert {a.tenant for a in end if a.alertname in TENANT_ALERTS} == {drifter, emb_only}, end
    assert all(a.action == "investigate" for a in end if a.tenant == "" and a.action), end
    for t, alerts in timeline.items():
        assert not {a for a in alerts if a.tenant in healthy}, (t, alerts)
