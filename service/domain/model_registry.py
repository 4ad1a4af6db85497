"""The model registry: which artefact versions the service knows, which one is active, the
activation in progress, and the history of switches. It lives in the store (one JSON document
behind a compare-and-set revision), so every replica sharing the store agrees on it.

The document::

    {"versions":   {version: {"path", "registered_at", "architecture", "embedding_dim",
                              "threshold", "baseline_opis", "baseline_eps_opis", "created_at"}},
     "active":     version | null,
     "activation": null | {"version", "from", "kind", "started_at", "heartbeat", "owner",
                           "state", "error"?},
     "history":    [{"version", "from", "kind", "at", "skipped"}],   (newest last, capped)
     "purged":     [versions whose embeddings retention dropped],
     "configured": the version TCM_ARTEFACT_PATH named at the first start (the store's first model),
     "tenant_references": {version: the across-tenants drift reference measured on the served
                           galleries (service.monitoring.subjects.tenant_reference)},
     "tenant_reference_members": {version: the tenants that reference was measured on (the
                                  monitor re-measures it when one of them leaves)}}

Transitions are pure functions of the document (:func:`register`, :func:`begin`,
:func:`commit`, :func:`abandon`); :class:`ModelRegistry` applies one with a compare-and-set
retry loop, so two replicas (or two admins) racing cannot overwrite each other.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import ConflictError, NotFoundError
from service.store import Store
from tcm import Manifest

HISTORY_CAP = 100
Doc = dict[str, Any]


def empty() -> Doc:
    return {
        "versions": {},
        "active": None,
        "activation": None,
        "history": [],
        "purged": [],
        "configured": None,
        "tenant_references": {},
        "tenant_reference_members": {},
    }


def record_of(manifest: Manifest, path: Path | str, *, now: float) -> dict[str, Any]:
    return {
        "path": str(Path(path).resolve()),
        "registered_at": now,
        "architecture": manifest.architecture,
        "embedding_dim": manifest.embedding_dim,
        "threshold": manifest.calibration.tau,
        "baseline_opis": manifest.baseline.opis,
        "baseline_eps_opis": manifest.baseline.eps_opis,
        "created_at": manifest.created_at,
        "weights_sha256": manifest.weights_sha256,
    }


def register(doc: Doc, manifest: Manifest, path: Path | str, *, now: float) -> Doc:
    """Stages a version (idempotent for the same path; another path for a known version is a
    conflict: versions are immutable)."""
    version = manifest.model_version
    new = record_of(manifest, path, now=now)
    old = doc["versions"].get(version)
    if old is not None:
        if old["path"] != new["path"] and old.get("weights_sha256") == new["weights_sha256"]:
            doc["versions"][version] = {**old, "path": new["path"]}  # the same artefact, moved
        elif old["path"] != new["path"]:
            raise ConflictError(
                f"model version {version} is already registered from {old['path']}; a version "
                "names one artefact forever: export the new one under a new version",
                code="version_conflict",
                detail={"model_version": version, "path": old["path"]},
            )
        return doc
    doc["versions"][version] = new
    doc["purged"] = [v for v in doc["purged"] if v != version]
    return doc


def previous(doc: Doc) -> str | None:
    """The rollback target: the version that was active before the active one was activated.
    Rollbacks step back through the history (activate v1, v2, v3; rollback -> v2; rollback ->
    v1), never toggle between the last two: the history is replayed as a stack, an activation
    pushing its version and a rollback popping the one it left. (The history is capped: the
    stack starts at its oldest entry's ``from``.)"""
    stack: list[str] = []
    for entry in doc["history"]:
        if not stack and entry["from"] is not None:
            stack.append(entry["from"])
        if entry["kind"] == "rollback":
            if stack and stack[-1] == entry["from"]:
                stack.pop()
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])
        elif not stack or stack[-1] != entry["version"]:
            stack.append(entry["version"])
    if len(stack) < 2 or stack[-1] != doc["active"]:
        return None
    return stack[-2]


def begin(doc: Doc, version: str, *, kind: str, owner: str, now: float) -> Doc:
    if version not in doc["versions"]:
        raise NotFoundError(
            f"no registered model version {version!r}: stage it first (POST /v1/models)",
            detail={"model_version": version},
        )
    act = doc["activation"]
    if act is not None and act["state"] == "running":
        raise ConflictError(
            f"an activation of {act['version']} is in progress; wait for it "
            "(GET /v1/models) before starting another",
            code="activation_in_progress",
            detail={"activation": act},
        )
    if doc["active"] == version:
        raise ConflictError(
            f"{version} is already the active model",
            code="already_active",
            detail={"model_version": version},
        )
    doc["activation"] = {
        "version": version,
        "from": doc["active"],
        "kind": kind,
        "started_at": now,
        "heartbeat": now,
        "owner": owner,
        "state": "running",
    }
    return doc


def commit(
    doc: Doc, version: str, *, kind: str, now: float, skipped: dict[str, int] | None = None
) -> Doc:
    """Makes ``version`` active (the switch) and records it in the history."""
    act = doc["activation"]
    if act is not None and act["version"] == version:
        doc["activation"] = None
    if doc["active"] != version:
        doc["history"].append(
            {
                "version": version,
                "from": doc["active"],
                "kind": kind,
                "at": now,
                "skipped": dict(skipped or {}),
            }
        )
        doc["history"] = doc["history"][-HISTORY_CAP:]
        doc["active"] = version
    doc["purged"] = [v for v in doc["purged"] if v != version]
    return doc


def abandon(doc: Doc, version: str, *, error: str) -> Doc:
    """Ends a running activation of ``version`` without switching (the active model stays)."""
    act = doc["activation"]
    if act is not None and act["version"] == version and act["state"] == "running":
        doc["activation"] = {**act, "state": "failed", "error": error}
    return doc


def retained(doc: Doc, keep: int) -> list[str]:
    """The active version and the ``keep - 1`` most recently active before it, newest first:
    their embeddings are kept (rollback is then only a switch)."""
    out: list[str] = []
    back = previous(doc)  # the rollback target first: a rollback is then only a switch
    for v in [doc["active"], back, *(e["from"] for e in reversed(doc["history"]))]:
        if v is not None and v not in out:
            out.append(v)
        if len(out) >= keep:
            break
    return out


def to_purge(doc: Doc, keep: int) -> list[str]:
    act = doc["activation"]
    busy = {act["version"]} if act and act["state"] == "running" else set()
    kept = set(retained(doc, keep)) | busy
    return [v for v in doc["versions"] if v not in kept and v not in doc["purged"]]


@dataclass
class ModelRegistry:
    """The registry document in the store, changed by compare-and-set (blocking methods)."""

    store: Store

    def read(self) -> Doc:
        doc, _ = self.store.get_model_registry()
        return _normalised(doc)

    def update(self, change: Callable[[Doc], Doc], *, attempts: int = 20) -> Doc:
        """Applies ``change`` to the current document and writes it back, retrying when another
        writer got there first. Exceptions raised by ``change`` propagate (nothing written)."""
        for _ in range(attempts):
            doc, rev = self.store.get_model_registry()
            new = change(copy.deepcopy(_normalised(doc)))
            if self.store.put_model_registry(new, expected_rev=rev):
                return new
            time.sleep(0.01)
        raise ConflictError(
            "the model registry kept changing under this request; retry", code="concurrent_update"
        )


def _normalised(doc: Doc | None) -> Doc:
    base = empty()
    if doc:
        base.update(doc)
    return base
