"""Settings are validated at start-up, with messages that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import make_settings


def test_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TCM_STORE_URL", "TCM_ADMIN_TOKEN", "TCM_MAX_K"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.store_url == "sqlite:///./data/tcm.db" and s.admin_token is None
    assert s.index_factory == "Flat" and s.device == "auto"
    monkeypatch.setenv("TCM_STORE_URL", "redis://localhost:6379/2")
    monkeypatch.setenv("TCM_ADMIN_TOKEN", "a" * 20)
    monkeypatch.setenv("TCM_MAX_K", "7")
    s = Settings()
    assert s.store_url.startswith("redis://") and s.max_k == 7
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "a" * 20
    assert "a" * 20 not in repr(s)  # secrets stay out of logs


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("store_url", "postgres://x", "store_url must start with"),
        ("store_url", "sqlite:///:memory:", "in-memory"),
        ("admin_token", "short", "at least 16"),
        ("index_factory", "IDMap2,Flat", "IDMap"),
        ("device", "tpu", "device"),
        ("max_k", 0, "max_k"),
        ("embed_max_batch", 0, "embed_max_batch"),
    ],
)
def test_invalid_settings(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})


def test_bad_artefact_or_factory_fails_start_up(tmp_path: Path, artefact: Path) -> None:
    store = {"store_url": f"sqlite:///{tmp_path / 'tcm.db'}"}
    with (
        pytest.raises(ValueError, match=r"no manifest\.json"),
        TestClient(create_app(make_settings(tmp_path / "missing", store))),
    ):
        pass
    with (
        pytest.raises(RuntimeError),
        TestClient(create_app(make_settings(artefact, store, index_factory="Bogus42"))),
    ):
        pass
    if not torch.cuda.is_available():
        with (
            pytest.raises(ValueError, match="CUDA"),
            TestClient(create_app(make_settings(artefact, store, device="cuda"))),
        ):
            pass


def test_admin_api_disabled_without_token(tmp_path: Path, artefact: Path) -> None:
    s = make_settings(artefact, {"store_url": f"sqlite:///{tmp_path / 'tcm.db'}"}, admin_token=None)
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/tenants", json={"name": "x"}, headers={"Authorization": "Bearer x"})
        assert r.status_code == 401 and "disabled" in r.json()["message"]
