"""The drift loop end to end with a real Prometheus, on a model trained here (sklearn's digits,
trained on 0-4, held out 5-9: its reference file keeps the held-out classes).

(a) one tenant whose subjects drift (it enrols inverted digits as new subjects): the
    across-subjects alerts fire, for it and pooled; before that, healthy, nothing fires;
(b) three healthy tenants and one drifting (all its images inverted): TCMTenantInconsistent
    fires for the drifter only; then export -> retrain -> stage -> activate, and the alerts
    clear, the drifter's utility at tau having risen;
(c) healthy galleries over ten seeds (3 images per subject, the case whose sampling noise made
    the old comparison alert): the alert conditions, with the rules' own factors, counted; the
    false-alert rate is printed (``pytest -s``) and must be 0.

The service runs in this process (uvicorn in a thread, SQLite store, monitor every second);
Prometheus loads the project's rule files with every ``for:`` shortened to 2 s.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as serve_cli
from service.settings import Settings
from studies.promtool_replay import DRIFT_ALERTS
from tests.deploy.promserver import Prometheus, free_port, running_prometheus, wait_for
from tests.service.conftest import ADMIN_TOKEN, Digits, b64_png
from tests.service.conftest import digits as digits  # the fixture
from tests.service.monitoring.test_drift_signals import config_factor
from training.config import load_config
from training.pipeline import train_evaluate_export

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# upper bounds of the waits for Prometheus to see a condition (never sleeps: a passing run takes
# as long as the condition takes): generous, since CI machines are busy and a real Prometheus,
# a real server and a retrain share their two cores
PATIENCE_S = 120

STEPS = [
    "epochs=2",
    "steps_per_epoch=60",
    "batch_size=40",
    "m_per_class=8",
    "device=cpu",
    "augment=false",
]
HELD_OUT = range(5, 10)
FAILED_RUNS = 'tcm_monitor_runs_total{result="failed"}'


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v1")
    train_evaluate_export(
        load_config(
            None,
            [
                "dataset=digits",
                "arch=small_cnn",
                "width=16",
                "embedding_dim=32",
                "image_size=16",
                "tcm=true",
                *STEPS,
            ],
        ),
        out / "run",
        out / "artefact",
        plots=False,
        progress=False,
    )
    return out / "artefact"


def settings_for(tmp_path: Path, artefact: Path) -> Settings:
    return Settings(
        artefact_path=artefact,
        admin_token=ADMIN_TOKEN,
        device="cpu",
        store_url=f"sqlite:///{tmp_path / 'tcm.db'}",
        monitor_interval_s=1.0,
        monitor_min_pairs=10,
        model_poll_s=0.1,
        model_heartbeat_s=0.2,
        model_retire_grace_s=0.2,
    )


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The app behind a real HTTP port (uvicorn in a thread), for Prometheus to scrape."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def enrol(
    http: httpx.Client | TestClient,
    digits: Digits,
    rng: np.random.Generator,
    name: str,
    *,
    per: int,
    inverted: bool = False,
    tenant: str | None = None,
    classes: range | list[int] = HELD_OUT,
) -> tuple[str, dict[str, str]]:
    """A tenant (new unless ``tenant``) enrols ``per`` images of each of ``classes`` (held-out
    digits), one subject per digit (possibly the same images twice: a subject's enrolments)."""
    if tenant is None:
        r = http.post("/v1/tenants", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201, r.text
        tenant, key = r.json()["tenant_id"], r.json()["api_key"]
        enrol.keys[tenant] = key  # type: ignore[attr-defined]
    auth = {"Authorization": f"Bearer {enrol.keys[tenant]}"}  # type: ignore[attr-defined]
    idx = [
        i
        for k in classes
        for i in rng.choice(np.flatnonzero(digits.labels == k), per, replace=False)
    ]
    items = [
        {
            "subject": f"digit-{digits.labels[i]}",
            "image": b64_png(255 - digits.images[i] if inverted else digits.images[i]),
        }
        for i in idx
    ]
    r = http.post("/v1/gallery", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.text
    return tenant, auth


enrol.keys = {}  # type: ignore[attr-defined]


def drift_alerts(prom: Prometheus, state: str) -> set[tuple[str, str]]:
    return {a for a in prom.alerts(state) if a[0] in DRIFT_ALERTS}


def snapshot_versions(prom: Prometheus) -> set[str]:
    result = prom.get("/api/v1/query", query="tcm_monitor_snapshot_info")["result"]
    return {r["metric"]["model_version"] for r in result}


def hold_quiet(prom: Prometheus, seconds: float) -> None:
    """Nothing drift-related pending or firing for ``seconds`` (longer than ``for:`` 2 s)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        noisy = drift_alerts(prom, "pending") | drift_alerts(prom, "firing")
        assert not noisy, noisy
        time.sleep(0.5)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artefact whose numbers are known: the synthetic identities of
    tests/service/monitoring/test_drift_signals.py (held-out embeddings in its reference file)
    with an untrained small CNN (clients send embeddings: the weights only have to load). The digits
    model is too weak to tell one subject from another on 3 images (its utility over the range
    is ~0.1 for every held-out digit), so a subject-level drift needs clearer identities."""
    import dataclasses
    import json

    import torch

    from tcm import build_embedder, save_artefact, save_reference
    from tests.service.monitoring.test_monitor import DIM, identities, synthetic_manifest

    out = tmp_path_factory.mktemp("synthetic")
    x, y = identities(np.random.default_rng(321), 120, 10, noise=0.9)
    name = save_reference(out, torch.from_numpy(x), torch.from_numpy(y))
    kwargs = {"in_channels": 1, "embedding_dim": DIM, "width": 8}
    m = synthetic_manifest()
    m = dataclasses.replace(
        m, architecture_kwargs=kwargs, baseline=dataclasses.replace(m.baseline, reference_file=name)
    )
    save_artefact(out, build_embedder("small_cnn", **kwargs), m)
    assert json.loads((out / "manifest.json").read_text())["baseline"]["reference_file"]
    return out


def enrol_vectors(
    http: httpx.Client, auth: dict[str, str], x: np.ndarray, labels: np.ndarray, prefix: str
) -> None:
    items = [
        {"subject": f"{prefix}{k}", "embedding": v.tolist()} for v, k in zip(x, labels, strict=True)
    ]
    r = http.post("/v1/gallery", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.text


def test_a_one_tenant_whose_subjects_drift(tmp_path: Path, synthetic: Path) -> None:
    from tests.service.monitoring.test_monitor import identities

    rng = np.random.default_rng(1)
    with (
        serving(settings_for(tmp_path, synthetic)) as base,
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        r = http.post("/v1/tenants", json={"name": "solo"}, headers=ADMIN)
        solo, auth = r.json()["tenant_id"], {"Authorization": f"Bearer {r.json()['api_key']}"}
        # 30 subjects of 3 images, from the model's own distribution: healthy
        enrol_vectors(http, auth, *identities(rng, 30, 3, noise=0.9), prefix="s")
        port = int(base.rsplit(":", 1)[1])
        with running_prometheus(tmp_path, port, alert_for="2s") as prom:
            wait_for(
                lambda: (
                    prom.query("tenant:tcm_subjects_opis_over_reference:ratio")[solo] >= 0
                    and prom.query("tcm:subjects_opis_over_reference:ratio")[""] >= 0
                ),
                PATIENCE_S,
                "OPIS across subjects and its reference for the one tenant",
                prom,
            )
            hold_quiet(prom, 4.0)
            healthy = prom.value("tenant:tcm_subjects_opis_over_reference:ratio", solo)
            # drift: 15 new subjects whose images the model cannot hold together (a camera it
            # has not seen): their genuine pairs collapse while the others' do not
            enrol_vectors(http, auth, *identities(rng, 15, 3, noise=2.5), prefix="new")
            wanted = {("TCMSubjectsOpisDegraded", solo), ("TCMSubjectsOpisPooledDegraded", "")}
            wait_for(
                lambda: wanted <= drift_alerts(prom, "firing"),
                PATIENCE_S,
                "the across-subjects alerts to fire",
                prom,
            )
            drifted = prom.value("tenant:tcm_subjects_opis_over_reference:ratio", solo)
            print(
                f"(a) one tenant: live / reference upper bound {healthy:.3g} healthy, "
                f"{drifted:.3g} after drift (alert factor "
                f"{config_factor('subjects_opis_factor')})"
            )
            assert drifted > config_factor("subjects_opis_factor") > healthy


def test_b_one_drifting_tenant_then_retrain_clears(
    tmp_path: Path, v1: Path, digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(2)
    settings = settings_for(tmp_path, v1)
    with serving(settings) as base, httpx.Client(base_url=base, timeout=30) as http:
        # healthy tenants enrol digits like those the model was trained on; the drifter enrols
        # digits it has never seen, inverted (as tests/test_retrain_loop.py)
        healthy = [
            enrol(http, digits, rng, name, per=4, classes=range(0, 5))[0]
            for name in ("b", "c", "d")
        ]
        # the monitor may have measured the reference when only two had enrolled (the first
        # snapshot where it is defined): the operator re-measures it once all are served
        r = http.post("/v1/monitor/reference", headers=ADMIN)
        assert r.status_code == 200 and r.json()["reference"]["tenants"] == 3, r.text
        port = int(base.rsplit(":", 1)[1])
        with running_prometheus(tmp_path, port, alert_for="2s") as prom:
            wait_for(
                lambda: "" in prom.query('tcm_tenants_opis_reference{bound="hi"}'),
                PATIENCE_S,
                "the across-tenants reference",
                prom,
            )
            hold_quiet(prom, 4.0)
            drifter, _ = enrol(http, digits, rng, "e", per=4, inverted=True)
            wait_for(
                lambda: ("TCMTenantInconsistent", drifter) in drift_alerts(prom, "firing"),
                2 * PATIENCE_S,
                "TCMTenantInconsistent for the drifter",
                prom,
            )
            firing = drift_alerts(prom, "firing") | drift_alerts(prom, "pending")
            assert not {("TCMTenantInconsistent", t) for t in healthy} & firing, firing
            fired = {
                a
                for a in drift_alerts(prom, "firing")
                if a[0] in ("TCMTenantInconsistent", "TCMOpisDegraded", "TCMEpsOpisDegraded")
            }
            before = prom.value('tcm_tenant_utility_ratio{source="pooled"}', drifter)

            # the loop: export what the service holds, retrain from v1, stage, activate
            monkeypatch.setenv("TCM_STORE_URL", settings.store_url)
            monkeypatch.setenv("TCM_ARTEFACT_PATH", str(v1))
            r = CliRunner().invoke(serve_cli, ["export-dataset", "--out", str(tmp_path / "export")])
            assert r.exit_code == 0, r.output
            from training.cli import app as train_cli

            r = CliRunner().invoke(
                train_cli,
                [
                    "retrain",
                    "--from",
                    str(v1),
                    "--data",
                    str(tmp_path / "export"),
                    "--out",
                    str(tmp_path / "run2"),
                    "--export",
                    str(tmp_path / "v2"),
                    *[a for s in [*STEPS, "test_fraction=0.3"] for a in ("--set", s)],
                ],
            )
            assert r.exit_code == 0, r.output
            v2 = re.search(r"artefact (\S+) written", r.output).group(1)
            r = http.post("/v1/models", json={"path": str(tmp_path / "v2")}, headers=ADMIN)
            assert r.status_code == 201, r.text
            assert http.post(f"/v1/models/{v2}/activate", headers=ADMIN).status_code == 202

            def cleared() -> bool:
                # (no snapshot for a moment after the switch: the monitor recomputes for v2)
                versions = snapshot_versions(prom)
                # the across-tenants alerts that fired for v1 are gone (the across-subjects
                # ones depend on v2's own held-out classes, a handful cut from the export)
                return versions == {v2} and not (drift_alerts(prom, "firing") & fired)

            def seen() -> str:
                return (
                    f"versions {sorted(snapshot_versions(prom))} (want {{{v2!r}}}); "
                    f"firing {sorted(drift_alerts(prom, 'firing'))}; fired on v1 {sorted(fired)}; "
                    f"deviation {prom.query('tcm_tenant_deviation')}; "
                    f"deviation ref {prom.query('tcm_tenants_deviation_reference')}; "
                    f"opis {prom.query('tcm_opis')}; "
                    f"opis ref {prom.query('tcm_tenants_opis_reference')}; "
                    f"failed monitor runs {prom.query(FAILED_RUNS)}"
                )

            wait_for(
                cleared,
                2 * PATIENCE_S,
                "the drift alerts to clear on the new model",
                prom,
                state=seen,
            )
            after = prom.value('tcm_tenant_utility_ratio{source="pooled"}', drifter)
            deviation = prom.value("tcm_tenant_deviation", drifter)
            bound = config_factor("tenant_deviation_factor") * max(
                prom.value("max(tcm_tenants_deviation_reference)"),
                config_factor("opis_reference_floor"),
            )
            print(
                f"(b) drifter's utility at tau {before:.3f} -> {after:.3f} after retraining; "
                f"its deviation {deviation:.3g} against the bound {bound:.3g}; "
                f"healthy tenants quiet; alerts cleared on {v2}"
            )
            # not worse; better on every run since the retrain holds out classes within each
            # tenant (training.data.export_groups): 0.00 -> 0.29-0.88 over 5 runs on the 2-core
            # VM, the drifter's deviation 0.004-0.029 against bounds 0.063-0.136 (before, a draw
            # over all classes could hold out the drifter's inverted digits: 0.00 -> 0.00-0.78,
            # and once, in CI, the alert did not clear). Runs differ: the tenants' ids name the
            # exported folders, so each run's classes are drawn in another order.
            assert after >= before


def test_c_healthy_galleries_over_seeds_raise_no_alert(
    tmp_path: Path, v1: Path, digits: Digits
) -> None:
    """Ten healthy tenants of 3 images per subject join three others the across-tenants
    reference was measured on: the reference is re-measured on the fleet as it is now (it
    follows joins, issue 29), and each alert's condition with the rules' factors stays quiet,
    per tenant and overall."""
    subj, tenants_factor, err_factor = (
        config_factor("subjects_opis_factor"),
        config_factor("opis_degraded_factor"),
        config_factor("tenant_deviation_factor"),
    )
    with TestClient(create_app(settings_for(tmp_path, v1))) as c:
        mon = c.app.state.monitor
        for i in range(3):
            enrol(c, digits, np.random.default_rng(100 + i), f"ref{i}", per=3)
        ref = mon.refresh(force=True).tenants_reference
        assert ref is not None and ref.tenants == 3
        seeds = [
            enrol(c, digits, np.random.default_rng(s), f"seed{s}", per=3)[0] for s in range(10)
        ]
        snap = mon.refresh(force=True)
        first, ref = ref, snap.tenants_reference  # re-measured: 10 tenants joined
        assert ref != first
        assert ref.tenants + (ref.left_out_tenant is not None) == 13, ref
        # re-measured on demand too (admin only), on every tenant now served: the same
        assert c.post("/v1/monitor/reference").status_code == 401
        r = c.post("/v1/monitor/reference", headers=ADMIN)
        assert r.status_code == 200 and r.json()["status"] == "measured", r.text
        assert r.json()["reference"]["tenants"] == ref.tenants
        assert mon.snapshot.tenants_reference.deviation == ref.deviation
    rows = {t: snap.tenants[t] for t in seeds}
    subjects_alerts = [
        t for t, row in rows.items() if row.subjects.opis > subj * row.subjects.reference.hi
    ]
    floor = config_factor("opis_reference_floor")
    error_bound = err_factor * max(ref.deviation["hi"], floor)
    tenant_alerts = [t for t, row in rows.items() if row.deviation > error_bound]
    ratios = [row.subjects.opis / row.subjects.reference.hi for row in rows.values()]
    pooled = snap.subjects.pooled
    print(
        f"(c) 10 healthy tenants, 3 images per subject: across subjects live/ref-hi "
        f"{np.round(ratios, 2).tolist()} (alert above {subj}): {len(subjects_alerts)}/10; "
        f"deviation max {max(row.deviation for row in rows.values()):.3g} vs "
        f"bound {error_bound:.3g}: {len(tenant_alerts)}/10 (reference over {ref.tenants} "
        f"tenants, left out {ref.left_out_tenant}); OPIS across 13 tenants "
        f"{snap.opis:.3g} vs {tenants_factor} x ref hi {ref.opis_interval[1]:.3g}; "
        f"pooled across subjects {pooled.opis:.3g} vs ref {pooled.reference}"
    )
    assert subjects_alerts == [] and tenant_alerts == []
    assert pooled.opis <= subj * pooled.reference.hi
    assert snap.opis <= tenants_factor * max(ref.opis_interval[1], 1e-3)
