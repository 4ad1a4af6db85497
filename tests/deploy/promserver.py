"""A real Prometheus server for the deploy tests: the project's prometheus.yml and rule files,
with only the scrape target and the intervals (1 s) changed."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import PROM_DIR, RULE_FILES, tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def get(self, path: str, **params: str) -> Any:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant query -> {tenant (or ''): value}."""
        return {
            s["metric"].get("tenant", ""): float(s["value"][1])
            for s in self.get("/api/v1/query", query=expr)["result"]
        }

    def value(self, expr: str, key: str = "", timeout: float = 30.0) -> float:
        """The sample of ``expr`` for tenant ``key`` ('' when unlabelled), waiting for it to be
        there: with 1 s scrapes the scrape timeout is 1 s too, and on a busy machine a scrape
        that runs over marks every series of the target stale, so a recorded series that a
        test has just seen can be absent for an evaluation or two. A read straight after
        ``wait_for`` is a read, not the property under test."""
        seen: dict[str, float] = {}

        def present() -> bool:
            seen.clear()
            seen.update(self.query(expr))
            return key in seen

        wait_for(present, timeout, f"a sample of {expr} for {key!r}", self, state=lambda: str(seen))
        return seen[key]

    def alerts(self, state: str = "firing") -> set[tuple[str, str]]:
        """(alertname, tenant label or '') of the alerts in ``state``."""
        return {
            (a["labels"]["alertname"], a["labels"].get("tenant", ""))
            for a in self.get("/api/v1/alerts")["alerts"]
            if a["state"] == state
        }

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


def wait_for(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    prom: Prometheus,
    tick: Callable[[], None] = lambda: None,
    state: Callable[[], str] | None = None,
) -> None:
    """Polls ``check`` until it holds; on timeout fails with ``state()`` (what was seen last,
    so that a failure on a busy CI machine says which part of the condition did not hold)."""
    deadline = time.monotonic() + timeout
    while True:
        tick()
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            seen = ""
            if state is not None:
                try:
                    seen = f"\nlast seen: {state()}"
                except (OSError, ValueError, KeyError) as e:
                    seen = f"\nlast seen: (unreadable: {e!r})"
            pytest.fail(f"timed out waiting for {what}{seen}\nprometheus log:\n{prom.log_tail()}")
        time.sleep(0.25)


@contextmanager
def running_prometheus(
    tmp_path: Path,
    target_port: int,
    *,
    alert_for: str | None = None,
    target_labels: dict[str, str] | None = None,
) -> Iterator[Prometheus]:
    """Prometheus scraping ``127.0.0.1:target_port`` as the tcm-service job, every second.
    ``alert_for`` replaces every alert's ``for:`` (a test cannot wait 30 minutes); the
    expressions and factors stay the project's. ``target_labels``: labels the scrape puts on
    the target's series (as the Kubernetes scrape configs put ``shard_group``)."""
    binary = tool("prometheus")
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    rule_files = [str(f) for f in RULE_FILES]
    if alert_for is not None:
        rule_files = []
        for f in RULE_FILES:
            doc = yaml.safe_load(f.read_text())
            for group in doc["groups"]:
                for rule in group["rules"]:
                    if "for" in rule:
                        rule["for"] = alert_for
            copy = tmp_path / f"rules_{f.name}"
            copy.write_text(yaml.safe_dump(doc))
            rule_files.append(str(copy))
    cfg["rule_files"] = rule_files
    port = free_port()
    for job in cfg["scrape_configs"]:
        target = (
            f"127.0.0.1:{target_port}" if job["job_name"] == "tcm-service" else f"127.0.0.1:{port}"
        )
        job["static_configs"] = [{"targets": [target]}]
        if target_labels and job["job_name"] == "tcm-service":
            job["static_configs"][0]["labels"] = dict(target_labels)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited:\n{prom.log_tail()}"
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                return r.status == 200

        wait_for(ready, 30, "prometheus to be ready", prom)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
