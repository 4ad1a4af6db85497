"""``tcm-serve`` end to end: a real uvicorn process, its printed admin token, and acknowledged
writes surviving ``kill -9`` (SQLite WAL, synchronous=FULL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.service.conftest import unit
from tests.service.store.test_redis_down import free_port


def test_help_lists_options() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "--host" in result.output and "--port" in result.output


def test_operator_commands_start_without_the_apps_imports() -> None:
    """``tcm-serve import|models|export-dataset`` load the CLI module and their own modules
    only: neither torch nor FAISS (the app's imports, ~1.5 s per invocation on 2 cores)."""
    code = (
        "import sys, service.cli, service.ops.importer, service.ops.export; "
        "print(sorted(m for m in ('torch', 'faiss', 'service.app') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_help_lists_every_setting_with_its_default() -> None:
    """Regression: --help named none of the TCM_* settings."""
    from service.settings import Settings

    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name, field in Settings.model_fields.items():
        shown = (
            "unset"
            if field.default is None
            else (
                str(field.default).lower()
                if isinstance(field.default, bool)
                else str(field.default)
            )
        )
        assert f"TCM_{name.upper()} (default {shown})" in text, name


@pytest.mark.parametrize("broken", ["missing", "not_json", "no_weights"])
def test_a_bad_artefact_is_one_line_and_exit_2(
    tmp_path: Path, broken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a missing artefact at start-up was an 84-line traceback."""
    path = tmp_path / "artefact"
    if broken != "missing":
        path.mkdir()
        (path / "manifest.json").write_text("{" if broken == "not_json" else "{}")
    if broken == "no_weights":
        import json

        from tests.service.monitoring.test_monitor import synthetic_manifest

        (path / "manifest.json").write_text(json.dumps(synthetic_manifest().to_dict()))
    monkeypatch.setenv("TCM_ARTEFACT_PATH", str(path))
    monkeypatch.setenv("TCM_STORE_URL", f"sqlite:///{tmp_path / 'tcm.db'}")
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot serve the artefact at" in lines[0], result.output
    assert "Traceback" not in result.output


def test_invalid_settings_exit_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCM_STORE_URL", "postgres://nope")
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert "store_url" in result.output


def _start(env: dict[str, str], port: int) -> tuple[subprocess.Popen[str], str]:
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
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    token = ""
    deadline = time.monotonic() + 60
    assert proc.stderr is not None
    while not token:
        line = proc.stderr.readline()
        if "admin token for this process" in line:
            token = proc.stderr.readline().strip()
        elif line == "" and proc.poll() is not None:
            raise RuntimeError("tcm-serve exited")
        assert time.monotonic() < deadline
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, token
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "tcm-serve exited"
        assert time.monotonic() < deadline, "tcm-serve did not become ready"
        time.sleep(0.1)


def test_serve_prints_token_and_survives_kill(tmp_path: Path, artefact: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCM_")}
    env |= {
        "TCM_ARTEFACT_PATH": str(artefact),
        "TCM_DEVICE": "cpu",
        "TCM_STORE_URL": f"sqlite:///{tmp_path / 'tcm.db'}",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc, token = _start(env, port)
    try:
        assert len(token) >= 32
        r = httpx.post(
            f"{base}/v1/tenants", json={"name": "t"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 201, r.text
        auth = {"Authorization": f"Bearer {r.json()['api_key']}"}
        r = httpx.post(
            f"{base}/v1/gallery",
            headers=auth,
            json={"items": [{"subject": "a", "embedding": unit(1), "item_id": "acked"}]},
        )
        assert r.status_code == 201
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown, no checkpoint
        proc.wait(timeout=10)
        proc.stderr.close()
        proc.stdout.close()
    proc, token2 = _start(env, port)
    try:
        assert token2 != token  # generated per process
        r = httpx.post(f"{base}/v1/match", json={"embedding": unit(1)}, headers=auth)
        assert r.status_code == 200
        assert r.json()["candidates"][0]["item_id"] == "acked"
        r = httpx.get(f"{base}/v1/tenants", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401  # the old process's admin token died with it
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        proc.stderr.close()
        proc.stdout.close()
