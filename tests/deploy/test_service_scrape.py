"""A real Prometheus scrapes a running ``tcm-serve`` while scripted clients drift one tenant.

The service runs as its own process (uvicorn, SQLite store, the monitor every second). Four
tenants enrol galleries and send 1:N matches with labelled feedback over HTTP; their probes are
embeddings built so that every score is known: genuine probes score 0.75 against their subject,
impostors about 0.2, far below tau = 0.5. Then the drifter's impostors move to about 0.6, above
tau (a new camera that makes everyone look alike). Prometheus, loading the project's rule files,
must show the drifter's FAR rising while the healthy tenants stay within target, live OPIS leaving
its baseline, and the per-tenant FAR alert pending for the drifter only; /v1/monitor agrees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tcm import (
    Baseline,
    Calibration,
    Manifest,
    Preprocessing,
    build_embedder,
    save_artefact,
    save_reference,
)
from tests.deploy.conftest import grafana_to_promql
from tests.deploy.promserver import free_port, running_prometheus, wait_for

pytestmark = pytest.mark.slow
ADMIN = "scrape-test-admin-token-" + "z" * 16
DIM = 32
TAU = 0.5
SUBJECTS = 5
NAMES = ("alpha", "beta", "gamma", "delta")
DRIFTER = "delta"


@pytest.fixture(scope="module")
def artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small CNN with a stated calibration: the clients send embeddings, so the
    weights only have to load; tau and the baseline are what the monitor compares against."""
    kwargs = {"in_channels": 1, "embedding_dim": DIM, "width": 8}
    manifest = Manifest(
        model_version="scrape-test-v1",
        architecture="small_cnn",
        architecture_kwargs=kwargs,
        preprocessing=Preprocessing(image_size=(16, 16), channels=1, mean=(0.5,), std=(0.5,)),
        embedding_dim=DIM,
        calibration=Calibration(
            tau=TAU, target_far=0.01, far_at_tau=0.01, frr_at_tau=0.05, tau_lo=0.4, tau_hi=0.6
        ),
        baseline=Baseline(
            opis=0.002,
            eps_opis=0.02,
            eps=0.05,
            recall_at_1=0.9,
            map_at_r=0.5,
            num_classes=10,
            num_images=100,
            opis_interval=(0.001, 0.004),
            reference_file="reference.safetensors",
        ),
    )
    out = tmp_path_factory.mktemp("artefact")
    # held-out "classes": noisy directions, as an export keeps them for the across-subjects
    # reference
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, DIM))
    labels = np.repeat(np.arange(40), 6)
    x = centres[labels] + 0.6 * rng.standard_normal((len(labels), DIM))
    save_reference(out, torch.from_numpy(x), torch.from_numpy(labels))
    save_artefact(out, build_embedder("small_cnn", **kwargs), manifest)
    return out


@pytest.fixture
def service(tmp_path: Path, artefact: Path) -> Iterator[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCM_")}
    env |= {
        "TCM_ARTEFACT_PATH": str(artefact),
        "TCM_DEVICE": "cpu",
        "TCM_ADMIN_TOKEN": ADMIN,
        "TCM_STORE_URL": f"sqlite:///{tmp_path / 'tcm.db'}",
        "TCM_MONITOR_INTERVAL_S": "1",
        "TCM_MONITOR_MIN_PAIRS": "10",
    }
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "tcm-serve did not become ready"
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


class Clients:
    """Four tenants' clients: galleries of orthonormal subjects, probes with known scores."""

    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, timeout=10)
        self.rng = np.random.default_rng(7)
        self.drift = False
        self.keys: dict[str, dict[str, str]] = {}
        self.ids: dict[str, str] = {}  # tenant name -> tenant id
        basis, _ = np.linalg.qr(self.rng.standard_normal((DIM, DIM)))
        self.u = basis[:, :SUBJECTS].T  # one direction per subject
        self.w = basis[:, SUBJECTS : 2 * SUBJECTS].T  # the second image's own variation
        self.z = basis[:, 2 * SUBJECTS]  # orthogonal to every gallery item
        for name in NAMES:
            r = self.http.post(
                "/v1/tenants", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN}"}
            )
            assert r.status_code == 201, r.text
            self.ids[name] = r.json()["tenant_id"]
            self.keys[name] = {"Authorization": f"Bearer {r.json()['api_key']}"}
            items = [
                {"subject": f"s{i}", "embedding": v.tolist()}
                for i in range(SUBJECTS)
                for v in (self.u[i], 0.8 * self.u[i] + 0.6 * self.w[i])
            ]
            r = self.http.post("/v1/gallery", json={"items": items}, headers=self.keys[name])
            assert r.status_code == 201, r.text

    def probe(self, subject: int, score: float) -> list[float]:
        score = float(np.clip(score, 0.0, 0.95))
        return (score * self.u[subject] + np.sqrt(1 - score**2) * self.z).tolist()

    def decide(self, name: str, genuine: bool) -> None:
        subject = int(self.rng.integers(SUBJECTS))
        if genuine:
            score = self.rng.normal(0.75, 0.03)
        elif name == DRIFTER and self.drift:
            score = self.rng.normal(0.6, 0.03)
        else:
            score = self.rng.normal(0.2, 0.05)
        r = self.http.post(
            "/v1/match",
            json={"embedding": self.probe(subject, score), "k": 1},
            headers=self.keys[name],
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["decision"]["accepted"] == (body["decision"]["score"] >= TAU)
        truth = f"s{subject}" if genuine else None  # impostors are not enrolled at all
        r = self.http.post(
            "/v1/feedback",
            json={"match_id": body["match_id"], "true_subject": truth},
            headers=self.keys[name],
        )
        assert r.status_code in (200, 201), r.text

    def verify_once(self) -> None:
        r = self.http.post(
            "/v1/verify",
            json={"a": {"embedding": self.probe(0, 0.9)}, "b": {"subject": "s0"}},
            headers=self.keys[NAMES[0]],
        )
        assert r.status_code == 200, r.text

    def tick(self) -> None:
        for name in NAMES:
            for _ in range(4):
                self.decide(name, genuine=False)
            self.decide(name, genuine=True)

    def by_name(self, values: dict[str, float]) -> dict[str, float]:
        names = {v: k for k, v in self.ids.items()}
        return {names.get(t, t): v for t, v in values.items()}


def test_prometheus_sees_one_tenant_drift_on_the_running_service(
    service: str, tmp_path: Path
) -> None:
    port = int(service.rsplit(":", 1)[1])
    clients = Clients(service)
    # the scrape labels the replica with its shard group, as the Kubernetes scrape configs do,
    # so the dashboard's "Shard groups" row answers too
    with running_prometheus(tmp_path, port, target_labels={"shard_group": "g1"}) as prom:

        def far() -> dict[str, float]:
            return clients.by_name(prom.query("tenant:tcm_fpir:ratio_rate5m"))

        def opis_ratio() -> float:
            return prom.query("tcm:opis_over_reference:ratio")[""]

        def healthy_everywhere() -> bool:
            return set(far()) == set(NAMES) and opis_ratio() >= 0

        wait_for(
            healthy_everywhere, 40, "per-tenant FAR and OPIS from the service", prom, clients.tick
        )
        assert all(v <= 0.01 for v in far().values()), far()
        assert prom.query('up{job="tcm-service"}')[""] == 1.0
        # the across-tenants reference is first measured as soon as 2 tenants have enough
        # pairs, which may be before all four do; re-measure it now that every tenant is
        # healthy, as an operator would once the tenants have joined
        r = clients.http.post("/v1/monitor/reference", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200 and r.json()["status"] == "measured", r.text
        opis_before = opis_ratio()
        assert opis_before < 2.0

        clients.drift = True
        wait_for(lambda: far()[DRIFTER] > 0.3, 40, "the drifter's FAR to rise", prom, clients.tick)
        rates = far()
        for name in NAMES:
            if name != DRIFTER:
                assert rates[name] <= 0.01, rates
        wait_for(
            lambda: opis_ratio() > 2.0, 40, "live OPIS above twice its baseline", prom, clients.tick
        )

        # the alert for the drifter's FAR is pending (it fires after its `for:`), no one else's
        def pending() -> set[str]:
            alerts = prom.get("/api/v1/alerts")["alerts"]
            return {
                clients.by_name({a["labels"].get("tenant", ""): 0.0}).popitem()[0]
                for a in alerts
                if a["labels"]["alertname"] == "TCMTenantFPIRHigh"
            }

        wait_for(
            lambda: pending() == {DRIFTER},
            40,
            "TCMTenantFPIRHigh pending for the drifter",
            prom,
            clients.tick,
        )

        # every expression of every Grafana panel returns series from this Prometheus
        clients.verify_once()
        dashboard = json.loads(
            (
                Path(__file__).resolve().parents[2]
                / "deploy"
                / "grafana"
                / "dashboards"
                / "tcm.json"
            ).read_text()
        )
        # one replica never forwards: a series of forwarded requests needs a fleet of groups
        # (tests/service/test_shard_groups.py counts them on one)
        unanswerable = {"Forwarded to another group"}
        exprs = {
            t["expr"]: p["title"]
            for p in dashboard["panels"]
            for t in p.get("targets", [])
            if p["title"] not in unanswerable
        }
        assert len(exprs) > 40

        def empty() -> list[str]:
            return [
                f"{title}: {e}"
                for e, title in exprs.items()
                if not prom.get("/api/v1/query", query=grafana_to_promql(e))["result"]
            ]

        deadline = time.monotonic() + 30
        while (missing := empty()) and time.monotonic() < deadline:
            clients.tick()
            time.sleep(0.5)
        assert not missing, "dashboard queries without series:\n" + "\n".join(missing)

        # the service's own JSON view says the same as what Prometheus scraped
        view = clients.http.get("/v1/monitor", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        snap = view["snapshot"]
        assert snap["opis"] > 2 * snap["baseline"]["opis"]
        # both drift signals, with their references, survive the typed answer
        assert snap["subjects"]["pooled"]["opis"] is not None
        assert snap["subjects"]["pooled"]["reference"]["matched"] is True
        assert snap["tenants_reference"]["tenants"] == len(NAMES)
        assert snap["opis"] > 2 * snap["tenants_reference"]["opis_interval"][1]
        row = snap["tenants"][clients.ids[DRIFTER]]
        assert row["subjects"]["eligible_subjects"] == SUBJECTS and row["deviation"] > 0
        drifter = snap["tenants"][clients.ids[DRIFTER]]
        assert drifter["far"] > max(
            snap["tenants"][clients.ids[n]]["far"] for n in NAMES if n != DRIFTER
        )
        scraped = prom.value("tcm_opis")
        assert scraped > 2 * snap["baseline"]["opis"]
