"""The Makefile's two install sets, read from what ``make -n`` would run on a machine with no
virtual environment yet: ``make run`` installs only what serving the default model needs
(``[serve,pretrained]`` and the torch pin), ``make test`` adds the rest on top of it (issue 30:
``make run`` built a 2.0 GB environment of 113 packages, dev, faces and parquet included)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# what serving the committed default model needs, and what it must not drag in
RUN_NEEDS = {"serve", "pretrained"}
NOT_FOR_RUN = {"dev", "faces", "parquet", "train", "gpu"}


def dry_run(target: str, tmp_path: Path, *args: str) -> list[str]:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed")
    r = subprocess.run(
        [make, "-n", target, f"VENV={tmp_path / 'venv'}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def installs(lines: list[str]) -> list[tuple[str, set[str]]]:
    """(what, extras) of every ``pip install``: the editable project with its extras, or a
    requirement such as the torch pin (no extras)."""
    out = []
    for line in lines:
        if not re.search(r"\bpip install\b", line) or "--upgrade pip" in line:
            continue
        m = re.search(r'-e "\.\[([a-z0-9,_-]+)\]"', line)
        if m:
            out.append((".", set(m.group(1).split(","))))
        else:
            out.append((line.split(" pip install ", 1)[1].replace("-q", "").strip(), set()))
    return out


def test_make_run_installs_only_what_serving_the_default_model_needs(tmp_path: Path) -> None:
    lines = dry_run("run", tmp_path)
    found = installs(lines)
    project = [extras for what, extras in found if what == "."]
    assert project == [RUN_NEEDS], found
    assert not NOT_FOR_RUN & project[0]
    assert set(EXTRAS) >= RUN_NEEDS
    # the torch pin stays, the CPU wheel the machines hold
    pins = [what for what, _ in found if "torch" in what]
    assert pins and re.fullmatch(r'"torch==\d+\.\d+\.\d+"', pins[0]), pins
    assert found.index((pins[0], set())) < found.index((".", RUN_NEEDS))  # torch first
    # and then it serves the committed default model (nothing to train)
    assert (ROOT / "artefacts" / "default" / "manifest.json").is_file()
    assert not [ln for ln in lines if "tcm-train" in ln]
    assert re.search(r"TCM_ARTEFACT_PATH=artefacts/default \S*tcm-serve", " ".join(lines))
    assert not [ln for ln in lines if ".installed-test" in ln]


def test_make_test_adds_the_rest_on_top(tmp_path: Path) -> None:
    lines = dry_run("test", tmp_path)
    project = [extras for what, extras in installs(lines) if what == "."]
    # first the run set (its own stamp), then one install that only adds
    assert project[0] == RUN_NEEDS and len(project) == 2, project
    assert project[1] >= RUN_NEEDS
    assert {"dev", "faces", "parquet", "train"} <= project[1]
    assert set(EXTRAS) - project[1] <= {"gpu", "client"}  # all but the CUDA and client-only sets
    stamps = [ln.split()[-1] for ln in lines if ln.startswith("touch ")]
    assert [Path(s).name for s in stamps] == [".installed-run", ".installed-test"]
    # and the test tools it installs when missing: promtool, helm
    assert any("apt-get install" in ln and "prometheus" in ln for ln in lines)
    assert any("deploy/helm/get_helm.py" in ln for ln in lines)


def test_other_models_get_the_full_set(tmp_path: Path) -> None:
    """MODEL=faces serves through dlib (the faces extra): make run installs the full set."""
    lines = dry_run("run", tmp_path, "MODEL=faces", "MODEL_DIR=" + str(tmp_path / "faces"))
    project = [extras for what, extras in installs(lines) if what == "."]
    assert project[0] == RUN_NEEDS and "faces" in project[1], project
