"""``tcm-serve export-dataset``: the gallery of record as an image folder tcm-train reads, and
``tcm-serve models ...`` against a running service."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as serve_cli
from service.ops.export import class_folder, export_dataset
from tests.service.conftest import (
    ADMIN_TOKEN,
    STORES,
    Digits,
    b64_png,
    make_settings,
    make_version,
    unit,
)
from tests.service.test_cli import _start, free_port
from training.config import load_config
from training.data import load_raw

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_class_folders_are_safe_and_distinct() -> None:
    names = {class_folder("t1", s) for s in ("a/b", "a_b", "a b", "../x", "", "ünï", "a" * 500)}
    assert len(names) == 7
    for n in names:
        assert n.startswith("t1__") and "/" not in n and ".." not in n and len(n) < 90


@pytest.mark.parametrize("kind", STORES)
def test_export_dataset(
    kind: str, artefact: Path, store_settings, digits: Digits, tmp_path: Path
) -> None:
    settings = make_settings(artefact, store_settings(kind))
    with TestClient(create_app(settings)) as c:
        tenants = {}
        for name, subjects in (("a", ["x@1", "y"]), ("b", ["x@1"]), ("skip", ["z"])):
            r = c.post("/v1/tenants", json={"name": name}, headers=ADMIN).json()
            auth = {"Authorization": f"Bearer {r['api_key']}"}
            tenants[name] = r["tenant_id"]
            items = [
                {"subject": s, "image": b64_png(digits.images[10 * j + i]), "item_id": f"i{j}-{i}"}
                for j, s in enumerate(subjects)
                for i in range(3)
            ]
            items.append({"subject": "vec", "embedding": unit(3), "item_id": "vec-only"})
            items.append({"subject": "lonely", "image": b64_png(digits.images[99])})
            assert c.post("/v1/gallery", json={"items": items}, headers=auth).status_code == 201
        match = c.post(
            "/v1/match", json={"image": b64_png(digits.images[10]), "k": 1}, headers=auth
        ).json()
        c.post(
            "/v1/feedback", json={"match_id": match["match_id"], "true_subject": "z"}, headers=auth
        )
        store = c.app.state.runtime.store
        out = tmp_path / "export"
        summary = export_dataset(
            store, out, tenants=[tenants["a"], tenants["b"]], min_images_per_subject=2
        )
        assert summary["num_classes"] == 3 and summary["num_images"] == 9
        assert summary["items_without_image"] == {
            tenants["a"]: ["vec-only"],
            tenants["b"]: ["vec-only"],
        }
        assert summary["feedback_records"] == 0  # the labelled match was the skipped tenant's
        assert {v["subject"] for v in summary["classes"].values()} == {"x@1", "y"}
        # the bytes are the enrolled ones, and tcm-train reads the folder as it is
        folder = out / class_folder(tenants["a"], "y")
        assert sorted(p.read_bytes() for p in folder.iterdir()) == sorted(
            base64.b64decode(b64_png(digits.images[10 + i])) for i in range(3)
        )
        train, test = load_raw(
            load_config(None, ["dataset=imagefolder", f"data_dir={out}", "test_fraction=0.34"])
        )
        assert len(train.labels) + len(test.labels) == 9
        assert json.loads((out / "export.json").read_text())["num_images"] == 9
        everyone = export_dataset(store, tmp_path / "all")
        assert everyone["feedback_records"] == 1 and len(everyone["tenants"]) == 3
        line = json.loads((tmp_path / "all" / "feedback.jsonl").read_text())
        assert line["feedback"]["true_subject"] == "z"
        with pytest.raises(ValueError, match="not empty"):
            export_dataset(store, out)
        with pytest.raises(ValueError, match="no such tenants"):
            export_dataset(store, tmp_path / "none", tenants=["nope"])
    # the command line, on the same store (the service is stopped: nothing else needed)
    env = {
        "TCM_ARTEFACT_PATH": str(artefact),
        "TCM_STORE_URL": settings.store_url,
        "TCM_REDIS_KEY_PREFIX": settings.redis_key_prefix,
    }
    result = CliRunner().invoke(
        serve_cli, ["export-dataset", "--out", str(tmp_path / "cli")], env=env
    )
    assert result.exit_code == 0, result.output
    assert "exported 12 images of 4 subjects from 3 tenants" in result.output
    result = CliRunner().invoke(
        serve_cli, ["export-dataset", "--out", str(tmp_path / "cli")], env=env
    )
    assert result.exit_code == 1 and "not empty" in result.output


def test_export_refuses_a_store_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: run from another folder, the default sqlite:///./data/tcm.db was created
    empty and "exported 0 images" with exit 0."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        serve_cli,
        ["export-dataset", "--out", "out"],
        env={"TCM_STORE_URL": "sqlite:///./data/tcm.db"},
    )
    assert result.exit_code == 1
    assert "no store at sqlite:///./data/tcm.db" in result.output
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()
    # a store that exists but holds nothing (another prefix, a fresh file) is refused too
    from service.settings import Settings
    from service.store import open_store

    open_store(Settings(store_url=f"sqlite:///{tmp_path / 'empty.db'}")).close()
    result = CliRunner().invoke(
        serve_cli,
        ["export-dataset", "--out", "out"],
        env={"TCM_STORE_URL": f"sqlite:///{tmp_path / 'empty.db'}"},
    )
    assert result.exit_code == 1 and "holds no tenants" in result.output


def test_models_cli_against_a_running_service(tmp_path: Path, artefact: Path) -> None:
    v2 = make_version(artefact, tmp_path / "v2", "digits-test-v2", 7)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCM_")}
    env |= {
        "TCM_ARTEFACT_PATH": str(artefact),
        "TCM_DEVICE": "cpu",
        "TCM_STORE_URL": f"sqlite:///{tmp_path / 'tcm.db'}",
        "TCM_MODEL_POLL_S": "0.1",
        "TCM_MODEL_RETIRE_GRACE_S": "0.1",
    }
    port = free_port()
    proc, token = _start(env, port)
    cli_env = {"TCM_ADMIN_TOKEN": token, "TCM_URL": f"http://127.0.0.1:{port}"}
    run = CliRunner()
    try:
        r = run.invoke(serve_cli, ["models", "stage", str(v2)], env=cli_env)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["model_version"] == "digits-test-v2"
        assert "staged digits-test-v2" in r.output  # the version, said plainly
        r = run.invoke(serve_cli, ["models", "activate", "digits-test-v2"], env=cli_env)
        assert r.exit_code == 0, r.output
        assert "digits-test-v2 is active" in r.output
        # the progress it waited through (regression: it used to wait silently)
        assert re.search(r"digits-test-v2: (loading|embedding|switching|done)", r.output), r.output
        r = run.invoke(serve_cli, ["models", "list"], env=cli_env)
        body = json.loads(r.stdout)
        assert body["active"] == body["served"] == "digits-test-v2"
        r = run.invoke(serve_cli, ["models", "rollback"], env=cli_env)
        assert r.exit_code == 0 and "digits-test-v1 is active" in r.output
        r = run.invoke(serve_cli, ["models", "activate", "nope"], env=cli_env)
        assert r.exit_code == 1 and "404" in r.output
        r = run.invoke(serve_cli, ["models", "list"], env={**cli_env, "TCM_ADMIN_TOKEN": "x" * 20})
        assert r.exit_code == 1 and "401" in r.output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        proc.stderr.close()
        proc.stdout.close()


@pytest.mark.parametrize("subject", ["Cactus Wren", "a__b", "__x__", "日本"])
def test_training_reads_back_the_tenant_of_every_exported_folder(subject: str) -> None:
    """The export's folder names and the retrain's per-tenant split share one contract
    (tcm.exported): whatever the subject, the folder maps back to its tenant."""
    from tcm.exported import tenant_of

    tid = "0f3a9be1c7d2e5aa0f3a9be1c7d2e5aa"
    assert tenant_of(class_folder(tid, subject)) == tid
    assert tenant_of("plain-class") is None and tenant_of("__x") is None
