"""Renders the dashboard panels docs/operator.md shows, from real PromQL results.

    python docs/render_operator_panels.py            # writes docs/images/operator-*.png

What it runs, all on this machine: ``tcm-serve`` (this checkout's code, the committed default
artefact ``artefacts/default``, a fresh SQLite store, the monitor every second), a real
``prometheus`` with the project's prometheus.yml and rule files (scrape and evaluation every
second, every alert's ``for:`` cut to 20 s: nobody waits 30 minutes for a picture), and three
tenants' clients sending 1:N matches by embedding and labelled feedback over HTTP. Their probes
are built so that every score is known (genuine about 0.95, impostors about 0.2, far below
tau); after a healthy phase the "Heron Lab" tenant's impostors move above tau (a camera that
makes everyone look alike). Each panel's query is read from the dashboard JSON
(``deploy/grafana/dashboards/tcm.json``), run as a range query over the run, and plotted with
matplotlib; the alert table is the instant query at the end. Nothing is drawn that Prometheus did
not return. The numbers depend on timing, so each run's pictures differ in detail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.deploy.conftest import grafana_to_promql  # noqa: E402
from tests.deploy.promserver import free_port, running_prometheus  # noqa: E402

ADMIN = "render-admin-token-" + "r" * 16
NAMES = ("Acme Birds", "Zoo Zurich", "Heron Lab")
DRIFTER = "Heron Lab"
SUBJECTS = 5
OUT = ROOT / "docs" / "images"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tcm.json"


def serve(tmp: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCM_")}
    env |= {
        "TCM_ARTEFACT_PATH": str(ROOT / "artefacts" / "default"),
        "TCM_DEVICE": "cpu",
        "TCM_ADMIN_TOKEN": ADMIN,
        "TCM_STORE_URL": f"sqlite:///{tmp / 'tcm.db'}",
        "TCM_MONITOR_INTERVAL_S": "1",
        "TCM_MONITOR_MIN_PAIRS": "10",
    }
    port = free_port()
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((tmp / "serve.log").read_text()[-3000:])
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


class Clients:
    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, timeout=10)
        model = self.http.get("/v1/model").json()
        self.tau, dim = model["threshold"], model["embedding_dim"]
        self.rng = np.random.default_rng(11)
        basis, _ = np.linalg.qr(self.rng.standard_normal((dim, dim)))
        self.u = basis[:, :SUBJECTS].T
        self.z = basis[:, SUBJECTS]
        self.drift = False
        self.keys: dict[str, dict[str, str]] = {}
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for name in NAMES:
            r = self.http.post("/v1/tenants", json={"name": name}, headers=admin)
            r.raise_for_status()
            self.keys[name] = {"Authorization": f"Bearer {r.json()['api_key']}"}
            items = [
                {"subject": f"s{i}", "embedding": self.u[i].tolist()}
                for i in range(SUBJECTS)
                for _ in range(2)
            ]
            r = self.http.post("/v1/gallery", json={"items": items}, headers=self.keys[name])
            r.raise_for_status()

    def probe(self, subject: int, score: float) -> list[float]:
        score = float(np.clip(score, 0.0, 0.99))
        return (score * self.u[subject] + np.sqrt(1 - score**2) * self.z).tolist()

    def decide(self, name: str, genuine: bool) -> None:
        subject = int(self.rng.integers(SUBJECTS))
        if genuine:
            score = self.rng.normal(0.95, 0.01)
        elif name == DRIFTER and self.drift:
            score = self.rng.normal(self.tau + 0.05, 0.02)
        else:
            score = self.rng.normal(0.2, 0.05)
        r = self.http.post(
            "/v1/match",
            json={"embedding": self.probe(subject, score), "k": 1},
            headers=self.keys[name],
        )
        r.raise_for_status()
        truth = f"s{subject}" if genuine else None
        self.http.post(
            "/v1/feedback",
            json={"match_id": r.json()["match_id"], "true_subject": truth},
            headers=self.keys[name],
        ).raise_for_status()

    def tick(self) -> None:
        for name in NAMES:
            for genuine in (False, False, False, True):
                self.decide(name, genuine)

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(0.3)


def panel_targets(title: str) -> list[dict]:
    d = json.loads(DASHBOARD.read_text())
    (p,) = [p for p in d["panels"] if p.get("title") == title]
    return p["targets"]


def legend(fmt: str, metric: dict[str, str]) -> str:
    out = fmt
    for k, v in metric.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def plot_range(prom, title: str, start: float, end: float, path: Path, **opts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    drawn = 0
    for t in panel_targets(title):
        data = prom.get(
            "/api/v1/query_range",
            query=grafana_to_promql(t["expr"]),
            start=str(start),
            end=str(end),
            step="2",
        )
        for s in data["result"]:
            xs = [float(v[0]) - start for v in s["values"]]
            ys = [float(v[1]) for v in s["values"]]
            ax.plot(xs, ys, label=legend(t["legendFormat"], s["metric"]), lw=1.8)
            drawn += 1
    if not drawn:
        raise SystemExit(f"{title}: Prometheus returned no series")
    if opts.get("log"):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("seconds into the run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT)}")


def plot_table(prom, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (t,) = panel_targets(title)
    rows = prom.get("/api/v1/query", query=grafana_to_promql(t["expr"]))["result"]
    cols = ["alertname", "alertstate", "severity", "action", "name", "tenant"]
    cells = sorted([r["metric"].get(c, "") for c in cols] for r in rows)
    if not cells:
        raise SystemExit(f"{title}: Prometheus returned no alerts")
    fig, ax = plt.subplots(figsize=(11, 0.45 * (len(cells) + 2)), dpi=110)
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=cols, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(cols))))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proc, base = serve(tmp)
        try:
            clients = Clients(base)
            port = int(base.rsplit(":", 1)[1])
            with running_prometheus(tmp, port, alert_for="20s") as prom:
                start = time.time()
                clients.run_for(60)
                # the across-tenants reference, measured now that every tenant is healthy
                r = clients.http.post(
                    "/v1/monitor/reference", headers={"Authorization": f"Bearer {ADMIN}"}
                )
                r.raise_for_status()
                clients.run_for(20)
                clients.drift = True
                clients.run_for(100)
                end = time.time()
                plot_range(
                    prom,
                    "FPIR by tenant vs its FPIR target (labelled 1:N decisions)",
                    start,
                    end,
                    OUT / "operator-fpir.png",
                )
                plot_range(
                    prom,
                    "OPIS across tenants: live vs reference",
                    start,
                    end,
                    OUT / "operator-opis-tenants.png",
                )
                plot_table(prom, "Alerts now", OUT / "operator-alerts.png")
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
