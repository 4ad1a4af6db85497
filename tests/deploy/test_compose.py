"""docker-compose.yml, the GPU override and the Dockerfiles (CPU, GPU), checked without a Docker
engine: structure, files that exist, health checks, start-up order, pinned images, non-root."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERFILE_GPU = DEPLOY / "docker" / "Dockerfile.gpu"
COMPOSE_GPU = DEPLOY / "docker" / "compose.gpu.yml"


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
    used = {
        v.split(":")[0]
        for s in services.values()
        for v in s.get("volumes", [])
        if not v.startswith(".")
    }
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
    assert "./artefacts:/models:ro" in tcm["volumes"]
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
            # ./artefacts (beside the committed default, what is exported later) and ./exports
            # (the operator) are filled at run time
            if host.startswith("./") and host not in ("./artefacts", "./exports"):
                assert (ROOT / host).exists(), (name, host)
    prom = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for j in cfg["scrape_configs"]
        if j["job_name"] == "tcm-service"
        for sc in j["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == ["tcm:8000"]  # the compose service name and port


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def test_dockerfile_runs_as_non_root_and_copies_what_exists(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    copied = []
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
            copied.append(path)
    assert re.search(r"^HEALTHCHECK .*", text, re.M)
    assert re.search(r'^CMD \["tcm-serve"', text, re.M)
    # the build context's ignore file lets through exactly what is copied
    ignore = Path(f"{dockerfile}.dockerignore").read_text()
    for path in copied:
        allowed = f"!{path}/**" if (ROOT / path).is_dir() else f"!{path}"
        assert allowed in ignore.splitlines(), (dockerfile.name, allowed)


def test_gpu_dockerfile() -> None:
    text = DOCKERFILE_GPU.read_text()
    # a CUDA runtime base, pinned, in both stages
    bases = re.findall(r"^ARG CUDA_IMAGE=(\S+)", text, re.M)
    assert bases and re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", bases[0]
    )
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${CUDA_IMAGE}"] * 2
    assert "latest" not in text
    # CUDA torch pinned to the Makefile's version, from a CUDA index
    torch_pin = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M)
    makefile_pin = re.search(r"torch==(\d+\.\d+\.\d+)", (ROOT / "Makefile").read_text())
    assert torch_pin and makefile_pin and torch_pin.group(1) == makefile_pin.group(1)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+$", text, re.M)
    # faiss-gpu through the [gpu] extra, pinned, and faiss-cpu (the [serve] extra) removed
    assert re.search(r"^ARG FAISS_GPU_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert '".[serve,train,gpu]"' in text
    assert "pip uninstall -y faiss-cpu" in text
    assert text.index("pip uninstall -y faiss-cpu") < text.index("--force-reinstall --no-deps")
    assert "StandardGpuResources" in text  # the build fails on a faiss without GPU support
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert any(d.startswith("faiss-gpu") for d in extras["gpu"])
    assert any(d.startswith("faiss-cpu") for d in extras["serve"])
    # the service runs on CUDA and can write CUDA's cache on a read-only root
    assert "TCM_DEVICE=cuda" in text and "CUDA_CACHE_PATH=/tmp/" in text


def test_gpu_compose_override() -> None:
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    tcm = override["services"]["tcm"]
    assert set(override["services"]) == {"tcm"}  # layered over docker-compose.yml
    # paths in an override resolve against the first file's directory (the repository root)
    assert (ROOT / tcm["build"]["context"] / tcm["build"]["dockerfile"]).resolve() == DOCKERFILE_GPU
    tag = re.search(
        r"docker build -f deploy/docker/Dockerfile\.gpu -t (\S+) \.", DOCKERFILE_GPU.read_text()
    )
    assert tag and tcm["image"] == tag.group(1)
    from service.settings import Settings

    fields = {f"TCM_{n.upper()}" for n in Settings.model_fields}
    assert set(tcm["environment"]) <= fields
    assert tcm["environment"]["TCM_DEVICE"] == "cuda"
    (device,) = tcm["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert f"-f {COMPOSE_GPU.relative_to(ROOT)}" in COMPOSE_GPU.read_text()


def test_readme_documents_running_it() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for needed in ("docker compose up", "artefacts/default", "promtool test rules", ".env"):
        assert needed in readme, needed
    # issue 30: it said "make model" first, which does nothing for the committed default
    assert "make model" not in readme and "make model" not in COMPOSE.read_text()


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    out = []
    for v in service["volumes"]:
        host, container, *mode = v.split(":")
        out.append((host, container, mode == ["ro"]))
    return out


def _to_host(service: dict, path: str, *, writes: bool) -> str:
    """The host path a container path lands on (or the test fails: it is not mounted)."""
    for host, container, ro in _mounts(service):
        if path == container or path.startswith(container.rstrip("/") + "/"):
            assert not (writes and ro), f"{path} is on a read-only mount"
            return str(Path(host) / Path(path).relative_to(container))
    raise AssertionError(f"{path} is not on any mount of the service")


def test_the_documented_retrain_loop_works_on_this_compose_file() -> None:
    """Regression: artefacts were mounted one folder read-only (a retrained one could not be
    staged) and the Redis store was not reachable from the host (export-dataset could not
    run). The loop in deploy/README.md, step by step, against the compose configuration."""
    import shlex

    tcm = compose()["services"]["tcm"]
    readme = (DEPLOY / "README.md").read_text()
    block = readme[readme.index("The retrain loop") :]
    block = block[block.index("```") + 3 :]
    block = block[: block.index("```")].replace("\\\n", " ")
    cmds = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    inside = [c[5:] for c in cmds if c[:5] == ["docker", "compose", "exec", "tcm", "tcm-serve"]]
    assert [c[:2] for c in inside] == [
        ["export-dataset", "--out"],
        ["models", "stage"],
        ["models", "activate"],
    ]
    out = inside[0][2]
    stage = inside[1][2]
    (train,) = [c for c in cmds if c[0].endswith("tcm-train")]
    # export writes into the container where the host reads the training data
    assert _to_host(tcm, out, writes=True) == str(Path(train[train.index("--data") + 1]))
    # training exports where the container sees artefacts, and stage names it there
    assert _to_host(tcm, stage, writes=False) == str(Path(train[train.index("--export") + 1]))
    assert _to_host(tcm, tcm["environment"]["TCM_ARTEFACT_PATH"], writes=False) == str(
        Path(train[train.index("--from") + 1])
    )
    # the models commands inside the container find the service and its admin token
    assert "TCM_ADMIN_TOKEN" in tcm["environment"]
    assert tcm["ports"][0].endswith(":8000")
    # the exports folder is owned by the image's user (the root file system is read-only)
    assert re.search(r"^USER 10001", DOCKERFILE.read_text(), re.M)
    assert "chown 10001:10001 exports" in block
