"""The loop users live in, end to end and small enough for CI: drift injected -> the OPIS alert
condition holds -> export the gallery -> retrain from the active artefact -> stage, activate ->
OPIS back under the alert bound, on the drifted tenant's data. ``pytest -s`` prints the figures.

Real parts throughout: a model trained here on sklearn's digits (digits 0-4), a running app on
SQLite, the two CLIs (``tcm-serve export-dataset``, ``tcm-train retrain``), the admin API, the
live monitor, and the alert's own factor read from the Prometheus recording rules.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as serve_cli
from service.settings import Settings
from tests.service.conftest import ADMIN_TOKEN, Digits, b64_png
from tests.service.conftest import digits as digits  # the fixture
from training.config import load_config
from training.pipeline import train_evaluate_export

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "rules"
STEPS = [
    "epochs=2",
    "steps_per_epoch=60",
    "batch_size=40",
    "m_per_class=8",
    "device=cpu",
    "augment=false",
]


def opis_factor() -> float:
    """tcm_config:opis_degraded_factor, as the recording rules define it."""
    groups = yaml.safe_load((RULES / "tcm_recording.yml").read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            if rule.get("record") == "tcm_config:opis_degraded_factor":
                return float(re.fullmatch(r"vector\((.+)\)", rule["expr"].strip()).group(1))
    raise AssertionError("no tcm_config:opis_degraded_factor rule")


def gauge(metrics: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
    assert m, f"{name} not exposed"
    return float(m.group(1))


def alert_fires(c: TestClient, factor: float) -> tuple[bool, dict]:
    """TCMOpisDegraded's condition on a fresh snapshot, from the exposed gauges: live OPIS
    across tenants over factor x the upper bound of the reference measured on the served
    galleries (floored as the rule floors it)."""
    snap = c.app.state.monitor.refresh(force=True)
    text = c.get("/metrics").text
    opis = gauge(text, "tcm_opis")
    hi = max(gauge(text, 'tcm_tenants_opis_reference{bound="hi"}'), 1e-3)
    assert snap.eligible_tenants >= 2
    print(
        f"{snap.model_version}: live OPIS {opis:.3g}, reference upper bound {hi:.3g}, "
        f"alert bound {factor * hi:.3g}; utility at tau by tenant "
        f"{[round(t.utility, 3) for t in snap.tenants.values()]}"
    )
    return opis > factor * hi, snap


@pytest.mark.timeout(600)
def test_drift_alert_export_retrain_activate(
    tmp_path: Path, digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    factor = opis_factor()
    v1 = train_evaluate_export(
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
        tmp_path / "run1",
        tmp_path / "v1",
        plots=False,
        progress=False,
    )
    store_url = f"sqlite:///{tmp_path / 'tcm.db'}"
    settings = Settings(
        artefact_path=tmp_path / "v1",
        admin_token=ADMIN_TOKEN,
        device="cpu",
        store_url=store_url,
        monitor_interval_s=3600.0,
        model_poll_s=0.1,
        model_heartbeat_s=0.2,
        model_retire_grace_s=0.2,
    )
    rng = np.random.default_rng(0)

    def enrol(c: TestClient, name: str, classes: range, inverted: bool) -> str:
        r = c.post("/v1/tenants", json={"name": name}, headers=ADMIN).json()
        idx = [
            i
            for k in classes
            for i in rng.choice(np.flatnonzero(digits.labels == k), 12, replace=False)
        ]
        items = [
            {
                "subject": f"digit-{digits.labels[i]}",
                "image": b64_png(255 - digits.images[i] if inverted else digits.images[i]),
            }
            for i in idx
        ]
        auth = {"Authorization": f"Bearer {r['api_key']}"}
        assert c.post("/v1/gallery", json={"items": items}, headers=auth).status_code == 201
        return r["tenant_id"]

    with TestClient(create_app(settings)) as c:
        # two tenants whose subjects look like the training data: one threshold fits both
        enrol(c, "a", range(0, 3), inverted=False)
        enrol(c, "b", range(3, 5), inverted=False)
        fires, _ = alert_fires(c, factor)
        assert not fires
        # drift: a tenant enrols another kind of image (unseen digits, inverted)
        drifted = enrol(c, "c", range(5, 10), inverted=True)
        fires, snap = alert_fires(c, factor)
        assert fires
        utility_before = snap.tenants[drifted].utility
        assert utility_before == min(t.utility for t in snap.tenants.values())

        # export the gallery of record, retrain from the active artefact, stage, activate
        monkeypatch.setenv("TCM_STORE_URL", store_url)
        monkeypatch.setenv("TCM_ARTEFACT_PATH", str(tmp_path / "v1"))
        result = CliRunner().invoke(
            serve_cli, ["export-dataset", "--out", str(tmp_path / "export")]
        )
        assert result.exit_code == 0, result.output
        assert "exported 120 images of 10 subjects from 3 tenants" in result.output
        # the command it prints retrains the served artefact on this export; run as printed
        # (its run and artefact folders moved into tmp_path, the test's short schedule added)
        (line,) = [x for x in result.output.splitlines() if x.startswith("retrain the served")]
        retrain_cmd, stage_cmd = line.split(": ", 1)[1].split(" && ")
        argv = shlex.split(retrain_cmd)
        assert argv[:2] == ["tcm-train", "retrain"], line
        opts = dict(zip(argv[2::2], argv[3::2], strict=True))
        assert Path(opts["--from"]) == (tmp_path / "v1").resolve(), line
        assert Path(opts["--data"]) == tmp_path / "export", line
        assert shlex.split(stage_cmd) == ["tcm-serve", "models", "stage", opts["--export"]]
        opts |= {"--out": str(tmp_path / "run2"), "--export": str(tmp_path / "v2")}

        from training.cli import app as train_cli

        result = CliRunner().invoke(
            train_cli,
            [
                "retrain",
                *[a for kv in opts.items() for a in kv],
                *[a for s in [*STEPS, "test_fraction=0.3"] for a in ("--set", s)],
            ],
        )
        assert result.exit_code == 0, result.output
        v2 = re.search(r"artefact (\S+) written", result.output).group(1)
        assert v2 != v1["model_version"]
        r = c.post("/v1/models", json={"path": str(tmp_path / "v2")}, headers=ADMIN)
        assert r.status_code == 201, r.text
        assert c.post(f"/v1/models/{v2}/activate", headers=ADMIN).status_code == 202
        deadline = time.monotonic() + 120
        while c.get("/v1/model").json()["model_version"] != v2:
            assert time.monotonic() < deadline, c.get("/v1/models", headers=ADMIN).json()
            time.sleep(0.1)
        assert c.get("/v1/model").json()["activation"]["items_embedded"] == 120

        # the monitor measures against the new artefact: the alert condition is gone
        fires, snap = alert_fires(c, factor)
        assert snap.model_version == v2
        assert not fires
        assert snap.tenants[drifted].utility > utility_before + 0.3
