"""``tcm-serve tenants ...`` against a running ``tcm-serve`` (a real uvicorn process on SQLite):
operators create tenants and rotate their keys without curl (issue 30)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from service.cli import app as serve_cli
from tests.service.test_cli import _start, free_port


@pytest.fixture(scope="module")
def service(artefact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tcm-serve process; yields the CLI's environment (its URL and admin token)."""
    tmp = tmp_path_factory.mktemp("tenants-cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCM_")}
    env |= {
        "TCM_ARTEFACT_PATH": str(artefact),
        "TCM_DEVICE": "cpu",
        "TCM_STORE_URL": f"sqlite:///{tmp / 'tcm.db'}",
        "TCM_MONITOR_ENABLED": "false",
    }
    port = free_port()
    proc, token = _start(env, port)
    try:
        yield {"TCM_ADMIN_TOKEN": token, "TCM_URL": f"http://127.0.0.1:{port}"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        for stream in (proc.stderr, proc.stdout):
            if stream is not None:
                stream.close()


def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stdout + stderr) of ``tcm-serve *args``."""
    r = CliRunner().invoke(serve_cli, list(args), env=env)
    return r.exit_code, r.stdout, r.output


def status_with(env: dict[str, str], api_key: str) -> int:
    """What the service answers a request made with ``api_key``."""
    r = httpx.get(
        f"{env['TCM_URL']}/v1/gallery", headers={"Authorization": f"Bearer {api_key}"}, timeout=10
    )
    return r.status_code


def test_create_list_issue_and_revoke_keys(service: dict[str, str]) -> None:
    code, out, text = cli(service, "tenants", "create", "Acme Corp")
    assert code == 0, text
    created = json.loads(out)
    assert created["name"] == "Acme Corp" and created["api_key"].startswith("tcm_")
    assert "shown once" in text
    tid, first_key = created["tenant_id"], created["api_key"]
    assert status_with(service, first_key) == 200  # a working key

    code, out, text = cli(service, "tenants", "list")
    assert code == 0, text
    listed = json.loads(out)["tenants"]
    assert [t["tenant_id"] for t in listed if t["name"] == "Acme Corp"] == [tid]
    assert "api_key" not in out  # listing never shows secrets

    # rotation without downtime, naming the tenant by name: both keys work until the revoke
    code, out, text = cli(service, "tenants", "issue-key", "acme corp")
    assert code == 0, text
    second = json.loads(out)
    assert second["tenant_id"] == tid and second["revoked_key_ids"] == []
    assert status_with(service, first_key) == 200 and status_with(service, second["api_key"]) == 200

    code, out, text = cli(service, "tenants", "keys", tid)
    assert code == 0, text
    keys = {k["key_id"]: k["active"] for k in json.loads(out)["keys"]}
    assert keys == {created["key_id"]: True, second["key_id"]: True}

    code, _, text = cli(service, "tenants", "revoke-key", tid, created["key_id"])
    assert code == 0, text
    assert f"revoked key {created['key_id']} of tenant {tid}" in text
    assert status_with(service, first_key) == 401 and status_with(service, second["api_key"]) == 200

    # a leaked key: a new one, every other revoked in the same step
    code, out, text = cli(service, "tenants", "issue-key", tid, "--revoke-existing")
    assert code == 0, text
    third = json.loads(out)
    assert third["revoked_key_ids"] == [second["key_id"]]
    assert status_with(service, second["api_key"]) == 401
    assert status_with(service, third["api_key"]) == 200


def test_errors_are_one_line_and_an_exit_code(service: dict[str, str]) -> None:
    code, _, text = cli(service, "tenants", "create", "Duplicate Co")
    assert code == 0, text
    code, _, text = cli(service, "tenants", "create", "duplicate co ")
    assert code == 1 and "409 duplicate_tenant_name" in text, text
    assert "Traceback" not in text

    code, _, text = cli(service, "tenants", "keys", "no-such-tenant")
    assert code == 1 and "no tenant has the id or name 'no-such-tenant'" in text, text
    code, _, text = cli(service, "tenants", "revoke-key", "Duplicate Co", "0123456789abcdef")
    assert code == 1 and "404" in text, text

    wrong = {**service, "TCM_ADMIN_TOKEN": "x" * 20}
    code, _, text = cli(wrong, "tenants", "list")
    assert code == 1 and "401" in text, text
    # the option wins over the environment
    code, out, text = cli(wrong, "tenants", "list", "--admin-token", service["TCM_ADMIN_TOKEN"])
    assert code == 0 and "tenants" in json.loads(out), text
    no_token = {"TCM_URL": service["TCM_URL"], "TCM_ADMIN_TOKEN": ""}
    code, _, text = cli(no_token, "tenants", "list")
    assert code == 2 and "TCM_ADMIN_TOKEN" in text, text
    unreachable = {**service, "TCM_URL": f"http://127.0.0.1:{free_port()}"}
    code, _, text = cli(unreachable, "tenants", "list")
    assert code == 1 and "cannot reach" in text, text
