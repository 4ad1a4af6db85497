"""A minimal kustomize, for the subset ``deploy/k8s`` uses, so the manifests can be built and
checked on a machine without the ``kustomize``/``kubectl`` binaries.

Supported: ``resources`` (YAML files, or directories holding a kustomization), ``namespace``,
``labels`` (``includeSelectors: false``, with or without ``includeTemplates``), ``images``
(``newName``/``newTag``) and ``patches`` given inline as JSON 6902 operations with a
``kind``/``name`` target. Anything else is refused, so a kustomization that starts using another
feature fails here until this resolver learns it (``test_k8s.py`` compares the result with
``kubectl kustomize`` wherever that is installed).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]
KNOWN_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
}
POD_TEMPLATE_PATHS = {  # kind -> path of its pod template
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class KustomizeError(ValueError):
    pass


def build(directory: Path) -> list[Manifest]:
    """The manifests ``kustomize build directory`` would print (order aside)."""
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{directory} has no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kfile}: kind must be Kustomization")

    out: list[Manifest] = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            out.extend(build(path))
        elif path.is_file():
            out.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
        else:
            raise KustomizeError(f"{kfile}: resource {res} does not exist")
    ids = [(m["kind"], m["metadata"]["name"]) for m in out]
    if len(ids) != len(set(ids)):
        raise KustomizeError(f"{kfile}: duplicate resources {ids}")

    for patch in k.get("patches", []):
        _apply_patch(out, patch, kfile)
    for label in k.get("labels", []):
        _apply_labels(out, label, kfile)
    for image in k.get("images", []):
        _apply_image(out, image)
    if "namespace" in k:
        for m in out:
            if m["kind"] not in CLUSTER_SCOPED:
                m["metadata"]["namespace"] = k["namespace"]
    return out


def pod_template(m: Manifest) -> dict[str, Any] | None:
    path = POD_TEMPLATE_PATHS.get(m["kind"])
    node: Any = m
    for key in path or ():
        node = node.get(key) if isinstance(node, dict) else None
    return node if path else None


def containers(m: Manifest) -> list[dict[str, Any]]:
    tpl = pod_template(m)
    if tpl is None:
        return []
    spec = tpl["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _apply_labels(out: list[Manifest], label: dict[str, Any], kfile: Path) -> None:
    if set(label) - {"pairs", "includeSelectors", "includeTemplates"}:
        raise KustomizeError(f"{kfile}: unsupported labels fields {sorted(label)}")
    if label.get("includeSelectors", False):
        raise KustomizeError(f"{kfile}: labels.includeSelectors is not supported")
    pairs = label["pairs"]
    for m in out:
        m["metadata"].setdefault("labels", {}).update(pairs)
        tpl = pod_template(m) if label.get("includeTemplates", False) else None
        if tpl is not None:
            tpl.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            for claim in m["spec"].get("volumeClaimTemplates", []):  # StatefulSet
                claim.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            if m["kind"] == "CronJob":  # kustomize labels the Job template too
                job = m["spec"]["jobTemplate"]
                job.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def _apply_image(out: list[Manifest], image: dict[str, Any]) -> None:
    name = image["name"]
    for m in out:
        for c in containers(m):
            ref = c["image"]
            base, sep, tag = ref.partition("@") if "@" in ref else ref.rpartition(":")
            if not sep or "/" in tag:  # "name" with no tag (a ':' in a registry port is no tag)
                base, tag = ref, ""
            if base != name:
                continue
            new = image.get("newName", base)
            new_tag = image.get("newTag", tag)
            c["image"] = f"{new}:{new_tag}" if new_tag else new


def _apply_patch(out: list[Manifest], patch: dict[str, Any], kfile: Path) -> None:
    if set(patch) != {"target", "patch"} or set(patch["target"]) - {"kind", "name"}:
        raise KustomizeError(
            f"{kfile}: only inline JSON 6902 patches with a kind/name target are supported"
        )
    target = patch["target"]
    matches = [
        m
        for m in out
        if m["kind"] == target.get("kind", m["kind"])
        and m["metadata"]["name"] == target.get("name", m["metadata"]["name"])
    ]
    if not matches:
        raise KustomizeError(f"{kfile}: patch target {target} matches no resource")
    ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(f"{kfile}: a patch must be a list of JSON 6902 operations")
    for m in matches:
        for op in ops:
            json_patch(m, op)


def json_patch(doc: Manifest, op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) applied in place."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    if not parts:
        raise KustomizeError("a patch cannot replace the whole document")
    parent: Any = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    kind = op["op"]
    if kind not in {"add", "replace", "remove"}:
        raise KustomizeError(f"unsupported patch operation {kind!r}")
    if isinstance(parent, list):
        if kind == "add":
            idx = len(parent) if last == "-" else int(last)
            if not 0 <= idx <= len(parent):
                raise KustomizeError(f"index out of range in {op['path']}")
            parent.insert(idx, copy.deepcopy(op["value"]))
            return
        idx = int(last)
        if not 0 <= idx < len(parent):
            raise KustomizeError(f"index out of range in {op['path']}")
        if kind == "remove":
            del parent[idx]
        else:
            parent[idx] = copy.deepcopy(op["value"])
        return
    if kind in {"replace", "remove"} and last not in parent:
        raise KustomizeError(f"{op['path']} does not exist ({kind})")
    if kind == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(op["value"])
