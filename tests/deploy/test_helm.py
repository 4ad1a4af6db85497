"""The Helm chart (deploy/helm/tcm), rendered by a real ``helm`` (``make test`` installs it from
the npm registry: deploy/helm/get_helm.py) and compared with the kustomize builds it is
generated from (deploy/helm/build_chart.py): default values render exactly the objects of
``deploy/k8s/overlays/cpu``, ``values-gpu.yaml`` those of ``overlays/gpu``, and
``monitoring.enabled`` adds ``deploy/k8s/monitoring``'s. Every rendered object validates against
the Kubernetes schemas (strict), and each value changes the field it names."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import DEPLOY
from tests.deploy.kustomize_lite import build

CHART = DEPLOY / "helm" / "tcm"
K8S = DEPLOY / "k8s"
Objs = dict[tuple[str, str], dict[str, Any]]


@pytest.fixture(scope="module")
def helm() -> str:
    path = shutil.which("helm") or shutil.which("helm", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(
            "helm is not installed: `python deploy/helm/get_helm.py --dest .venv/bin/helm` "
            "(make test does it)"
        )
    return path


def render(helm: str, *args: str, namespace: str = "tcm") -> Objs:
    r = subprocess.run(
        [helm, "template", "tcm", str(CHART), "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    objs = [d for d in yaml.safe_load_all(r.stdout) if d]
    keyed = {(d["kind"], d["metadata"]["name"]): d for d in objs}
    assert len(keyed) == len(objs), "two objects share a kind and name"
    return keyed


def kustomized(*directories: str) -> Objs:
    return {(m["kind"], m["metadata"]["name"]): m for d in directories for m in build(K8S / d)}


def _builder() -> Any:
    spec = importlib.util.spec_from_file_location("build_chart", DEPLOY / "helm" / "build_chart.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_chart", mod)  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def test_chart_is_generated_from_the_kustomize_folders(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(DEPLOY / "helm" / "build_chart.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    # --check notices an edited template, and a template that should not be there
    mod = _builder()
    out = tmp_path / "chart"
    assert mod.main(["--out", str(out)]) == 0
    assert mod.main(["--check", "--out", str(out)]) == 0
    hpa = out / "templates" / "horizontalpodautoscaler-tcm.yaml"
    hpa.write_text(hpa.read_text().replace("averageUtilization", "averageValue"))
    assert mod.main(["--check", "--out", str(out)]) == 1
    assert mod.main(["--out", str(out)]) == 0
    (out / "templates" / "extra.yaml").write_text("kind: ConfigMap\n")
    assert mod.main(["--check", "--out", str(out)]) == 1


def test_helm_lint(helm: str) -> None:
    for values in ([], ["-f", str(CHART / "values-gpu.yaml")]):
        r = subprocess.run(
            [helm, "lint", "--strict", str(CHART), *values],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr


def test_default_values_render_the_cpu_overlay(helm: str) -> None:
    assert render(helm) == kustomized("overlays/cpu")


def test_gpu_values_render_the_gpu_overlay(helm: str) -> None:
    assert render(helm, "-f", str(CHART / "values-gpu.yaml")) == kustomized("overlays/gpu")


def test_monitoring_renders_the_operator_objects(helm: str) -> None:
    objs = render(helm, "--set", "monitoring.enabled=true")
    assert objs == kustomized("overlays/cpu", "monitoring")


@pytest.mark.parametrize("version", ["1.28.0", "1.37.0"])
def test_values_change_what_they_name(helm: str, version: str) -> None:
    objs = render(
        helm,
        "--set",
        "image.repository=registry.example.com/tcm-service",
        "--set",
        "image.tag=1.2.3",
        "--set",
        "redis.enabled=false",
        "--set",
        "config.TCM_STORE_URL=redis://redis.example.internal:6379/0",
        "--set",
        "config.TCM_MONITOR_INTERVAL_S=30",  # a number on the command line: still a string
        "--set",
        "monitoring.enabled=true",
        "--set",
        "monitoring.release=monitoring",
        "--set",
        "autoscaling.minReplicas=3",
        "--set",
        "models.storageClassName=nfs",
        namespace="search",
    )
    for obj in objs.values():
        assert obj["metadata"]["namespace"] == "search"
        if obj["kind"] not in {"ServiceMonitor", "PrometheusRule"}:
            kubernetes_validate.validate(obj, version, strict=True)
    (c,) = objs[("Deployment", "tcm")]["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.example.com/tcm-service:1.2.3"
    data = objs[("ConfigMap", "tcm-config")]["data"]
    assert data["TCM_STORE_URL"] == "redis://redis.example.internal:6379/0"
    assert data["TCM_MONITOR_INTERVAL_S"] == "30"
    assert all(isinstance(v, str) for v in data.values())
    assert not {k for k in objs if k[1] == "tcm-redis"}  # no in-cluster Redis
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert objs[(kind, "tcm")]["metadata"]["labels"]["release"] == "monitoring"
    assert objs[("HorizontalPodAutoscaler", "tcm")]["spec"]["minReplicas"] == 3
    pvc = objs[("PersistentVolumeClaim", "tcm-models")]["spec"]
    assert pvc["storageClassName"] == "nfs" and pvc["accessModes"] == ["ReadWriteMany"]


def test_templates_keep_literal_braces(helm: str) -> None:
    """Grafana legends and alert annotations hold ``{{...}}``: the chart passes them through
    (escaped in the templates) instead of evaluating them."""
    objs = render(helm, "--set", "monitoring.enabled=true")
    rule = yaml.safe_dump(objs[("PrometheusRule", "tcm")])
    dashboard = objs[("ConfigMap", "tcm-grafana-dashboard")]["data"]["tcm.json"]
    assert "{{ $labels.tenant }}" in rule
    assert '"legendFormat": "{{model_version}}"' in dashboard
