"""The client installs alone, without torch (issue 30): its own distribution in ``client/``.

The wheel is built from the source folder and installed into a fresh virtual environment with
``--no-deps --no-index`` (offline); the only other things importable there are the client's own
dependencies, found by walking its ``Requires-Dist`` through this environment's metadata and
linked from this environment's site-packages (a ``.pth`` file names their folder). In that
venv the client imports, builds a ``Client``, wraps a connection error in its own type, and
``torch`` is neither loaded nor importable; ``pip check`` finds every requirement met, so the
dependency list is complete. The main distribution's ``serve`` extra requires exactly this
client version, and every install line of the service installs ``./client`` beside it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client"
DIST = "threshold-consistent-retrieval-client"
FORBIDDEN = {"torch", "faiss-cpu", "fastapi", "threshold-consistent-retrieval"}


def _closure(requirements: list[str]) -> list[md.Distribution]:
    """The installed distributions that ``requirements`` (no extras) need, recursively."""
    seen: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        dist = md.distribution(req.name)
        seen[name] = dist
        todo.extend(Requirement(r) for r in dist.requires or [])
    return list(seen.values())


def _top_level(dist: md.Distribution) -> set[str]:
    """What a distribution puts into site-packages (packages, modules, its .dist-info)."""
    names = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".pth"):
            names.add(first)
    return names


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Runs ``cmd`` without this process's PYTHON* variables (a PYTHONPATH naming the checkout
    would make the sources importable in the fresh venv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, **kw)  # type: ignore
    assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    return r


PROBE = """
import importlib.metadata as md, importlib.util, json, sys
import tcm_client
from tcm_client import Client, TransportFailure
client = Client("http://127.0.0.1:9", "key", retries=0)  # port 9: nothing listens
try:
    client.healthz()
    wrapped = None
except TransportFailure as exc:
    wrapped = type(exc.__cause__).__module__.split(".")[0]
client.close()
print(json.dumps({
    "file": tcm_client.__file__,
    "torch_loaded": "torch" in sys.modules,
    "torch_importable": importlib.util.find_spec("torch") is not None,
    "requires": md.requires("threshold-consistent-retrieval-client"),
    "cause": wrapped,
}))
"""


def test_the_client_installs_and_imports_without_torch(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    build = ["wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-w", str(wheels)]
    _run([*pip, *build, str(source)])
    (wheel,) = wheels.glob("*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([*pip, "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    where = _run([str(py), "-c", "import site; print(site.getsitepackages()[0])"])
    site = Path(where.stdout.strip())

    # only the client's dependencies, linked from this environment
    declared = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["dependencies"]
    deps = tmp_path / "deps"
    deps.mkdir()
    here = Path(md.distribution("httpx").locate_file(""))
    linked = set()
    for dist in _closure(declared):
        assert dist.metadata["Name"].lower() not in FORBIDDEN, dist.metadata["Name"]
        for name in _top_level(dist):
            (deps / name).symlink_to(here / name)
            linked.add(name)
    assert {"httpx", "pydantic", "pydantic_core", "numpy"} <= linked
    assert not {n for n in linked if n.split("-")[0] in {"torch", "fastapi", "service", "tcm"}}
    (site / "client-deps.pth").write_text(f"{deps}\n")

    probe = json.loads(_run([str(py), "-I", "-c", PROBE], cwd=tmp_path).stdout)
    assert probe["file"].startswith(str(site)), probe["file"]  # the installed copy, not ROOT's
    assert probe["torch_loaded"] is False and probe["torch_importable"] is False
    assert probe["cause"] == "httpx"  # the connection error, wrapped, kept as __cause__
    requires_dist = [Requirement(r).name.lower() for r in probe["requires"]]
    assert "torch" not in requires_dist and not set(requires_dist) & FORBIDDEN
    assert {"httpx", "pydantic", "numpy"} <= set(requires_dist)
    # every requirement of the installed client is met by what was linked: the list is complete
    check = _run([*pip, "--python", str(py), "check"])
    assert "No broken requirements" in check.stdout


def test_the_service_requires_this_client_and_installs_it_from_the_folder() -> None:
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert client["name"] == DIST
    assert f"{DIST}=={client['version']}" in main["project"]["optional-dependencies"]["serve"]
    assert "client" not in main["project"]["optional-dependencies"]  # it pulled torch
    packages = main["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not [p for p in packages if p.startswith("tcm_client")]
    # an install of the serve extra resolves the client locally (it is not on PyPI; a
    # distribution named tcm-client there is someone else's)
    places = {
        "Makefile": (ROOT / "Makefile").read_text(),
        "Dockerfile": (ROOT / "deploy/docker/Dockerfile").read_text(),
        "Dockerfile.gpu": (ROOT / "deploy/docker/Dockerfile.gpu").read_text(),
    }
    # the Makefile's extras are variables (RUN_EXTRAS := serve,pretrained): expanded first
    variables = dict(re.findall(r"^(\w+) :?= (.*)$", places["Makefile"], re.M))
    for _ in range(3):  # nested: RUN_STAMP := $(VENV)/.installed-run
        places["Makefile"] = re.sub(
            r"\$\((\w+)\)", lambda m: variables.get(m[1], m[0]), places["Makefile"]
        )
    for where, text in places.items():
        lines = [ln for ln in text.splitlines() if re.search(r"install .*\.\[[^]]*serve", ln)]
        assert lines, where
        assert all(re.search(r"install .*(-e )?\./client\b", ln) for ln in lines), (where, lines)
    # a change of the client's metadata reinstalls (the stamp every install goes through)
    assert re.search(r"^\.venv/\.installed\S*: .*client/pyproject\.toml", places["Makefile"], re.M)
