"""The published OpenAPI contract, checked by schemathesis against a real ``tcm-serve``.

Every check and every phase (examples, coverage, fuzzing, stateful: the links in the schema
lead from an enrolment to its item, from a tenant to its keys), once with a tenant key over the
tenant operations and once with the admin token over the admin ones, bounded (``-n``,
deterministic generation) so both runs take well under a minute; 0 failures required.
Schemathesis' ``positive_data_acceptance`` is replaced by the hooks' variant that also accepts
refusals for content no schema can state (undecodable image bytes, a folder without an
artefact): see ``schemathesis_hooks.py``. This is what the issue's run found 13 failures in
(ST202 schema looser than validation, ST205 wrong ``Allow``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench import soak
from tests.service.conftest import ADMIN_TOKEN, unit

TENANT_TAGS = ["gallery", "match", "verify", "embed", "feedback", "monitor", "model", "health"]
ADMIN_TAGS = ["tenants", "models", "monitor"]
ST = str(Path(sys.executable).with_name("st"))


@contextlib.contextmanager
def serve(artefact: Path, tmp: Path) -> Iterator[tuple[str, str]]:
    """A tcm-serve on its own SQLite store, with a tenant and a few items: (base URL, the
    tenant's key). The tenant and admin runs get one each: the admin run's stateful phase
    deletes tenants it finds, which must not be the one the tenant run uses."""
    tmp.mkdir(parents=True, exist_ok=True)
    limits = {
        "TCM_MAX_BATCH_ITEMS": "8",
        "TCM_MAX_K": "10",
        "TCM_MONITOR_INTERVAL_S": "2",
        "TCM_MONITOR_MIN_PAIRS": "2",
    }
    with soak.serve(
        artefact, f"sqlite:///{tmp / 'tcm.db'}", tmp, admin_token=ADMIN_TOKEN, extra_env=limits
    ) as server:
        base = server.base
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        created = httpx.post(f"{base}/v1/tenants", json={"name": "contract"}, headers=admin).json()
        auth = {"Authorization": f"Bearer {created['api_key']}"}
        items = [
            {
                "subject": f"s{i % 2}",
                "embedding": unit(i),
                "item_id": f"item{i}",
                "metadata": {"g": i % 2},
            }
            for i in range(4)
        ]
        assert (
            httpx.post(f"{base}/v1/gallery", json={"items": items}, headers=auth).status_code == 201
        )
        yield base, created["api_key"]


def _schemathesis(base: str, token: str, tags: list[str], report: Path) -> subprocess.Popen[str]:
    cmd = [
        ST,
        "run",
        f"{base}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "-n",
        "5",
        "--generation-deterministic",
        "--no-color",
        "--max-failures",
        "20",
        "-H",
        f"Authorization: Bearer {token}",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
    ]
    for t in tags:
        cmd += ["--include-tag", t]
    env = os.environ | {
        "SCHEMATHESIS_HOOKS": "tests.service.schemathesis_hooks",
        "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
    }
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=report.parent,  # its cache goes there, not into the checkout
    )


def test_schemathesis_finds_no_contract_failure(artefact: Path, tmp_path: Path) -> None:
    """Both keys' runs side by side, each must end with 0 failures."""
    (tmp_path / "t").mkdir()
    (tmp_path / "a").mkdir()
    with (
        serve(artefact, tmp_path / "t") as (base, tenant_key),
        serve(artefact, tmp_path / "a") as (admin_base, _),
    ):
        runs = {
            "tenant": _schemathesis(base, tenant_key, TENANT_TAGS, tmp_path / "t.xml"),
            "admin": _schemathesis(admin_base, ADMIN_TOKEN, ADMIN_TAGS, tmp_path / "a.xml"),
        }
        _check(runs)


def _check(runs: dict[str, subprocess.Popen[str]]) -> None:
    for who, proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        summary = [
            line.strip() for line in out.splitlines() if "generated" in line or "Tested:" in line
        ]
        print(who, summary)
        assert proc.returncode == 0, out[-6000:]
        # the run got past authentication to the service's logic, and found nothing
        assert " passed" in out and "unique failure" not in out, out[-3000:]
