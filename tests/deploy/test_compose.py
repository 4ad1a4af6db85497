"""docker-compose.yml and the Dockerfile, checked without a Docker engine: structure, files
that exist, health checks, start-up order, pinned images, a non-root service."""

from __future__ import annotations

import re

import yaml

from tests.deploy.conftest import DEPLOY, ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_healthchecks() -> None:
    c = compose()
    services = c["services"]
    assert set(services) == {"tcm", "redis", "prometheus", "grafana"}
    for name, s in services.items():
        hc = s["healthcheck"]
        assert hc["test"][0] in {"CMD", "CMD-SHELL"} and len(hc["test"]) > 1, name
        for key in ("interval", "timeout", "retries"):
            assert key in hc, (name, key)
        assert s.get("restart") == "unless-stopped", name
    # start-up order waits for health, not just for a started container
    assert services["tcm"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # Prometheus must run while the service is down, to alert on it
    assert "depends_on" not in services["prometheus"]
    # named volumes are declared
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])
            if not v.startswith(".")}
    assert used <= set(c["volumes"])


def test_images_are_pinned() -> None:
    for name, s in compose()["services"].items():
        if "build" in s:
            continue
        image = s["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*", image), (name, image)
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert bases and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bases[0])
    assert "latest" not in text


def test_service_build_and_environment() -> None:
    tcm = compose()["services"]["tcm"]
    assert (ROOT / tcm["build"]["context"] / tcm["build"]["dockerfile"]).resolve() == DOCKERFILE
    env = tcm["environment"]
    assert env["TCM_STORE_URL"].startswith("redis://redis:6379")
    assert "${TCM_ADMIN_TOKEN:?" in env["TCM_ADMIN_TOKEN"]  # no default secret
    assert env["TCM_ARTEFACT_PATH"] == "/models/default"
    assert any(v.endswith(":/models/default:ro") for v in tcm["volumes"])
    assert "/readyz" in " ".join(tcm["healthcheck"]["test"])
    # every environment variable the compose file sets is a real setting
    from service.settings import Settings

    fields = {f"TCM_{n.upper()}" for n in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields


def test_redis_persists_with_aof() -> None:
    redis = compose()["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--appendfsync") + 1] in {"always", "everysec"}
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_prometheus_and_grafana_mount_files_that_exist() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana", "tcm"):
        for v in services[name].get("volumes", []):
            host = v.split(":")[0]
            if host.startswith("./") and not host.startswith("./artefacts"):
                assert (ROOT / host).exists(), (name, host)
    prom = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for j in cfg["scrape_configs"] if j["job_name"] == "tcm-service"
               for sc in j["static_configs"] for t in sc["targets"]]
    assert targets == ["tcm:8000"]  # the compose service name and port


def test_dockerfile_runs_as_non_root_and_copies_what_exists() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    assert re.search(r"^HEALTHCHECK .*", text, re.M)
    assert re.search(r'^CMD \["tcm-serve"', text, re.M)
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()
    assert "!service/**" in ignore and "!tcm/**" in ignore


def test_readme_documents_running_it() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for needed in ("docker compose up", "make model", "promtool test rules", ".env"):
        assert needed in readme, needed
