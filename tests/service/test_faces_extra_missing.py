"""A face artefact where the ``faces`` extra is not installed (the default Docker image) is
refused at start-up with one actionable line: which modules are missing, the extra to install
and the Docker image target that has it (issue 30: the image gave a bare ModuleNotFoundError for
``facekit``). A real ``tcm-serve`` process runs with the modules hidden by an import blocker
(``sitecustomize`` on PYTHONPATH raising ModuleNotFoundError for them), as in an image built
without them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tcm import Baseline, Calibration, Manifest, Preprocessing, build_embedder, save_artefact
from tests.service.store.test_redis_down import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
BLOCKER = """\
import os
import sys

HIDDEN = set(os.environ["TCM_TEST_HIDDEN_MODULES"].split(","))


class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Hide())
"""


def face_artefact(out: Path) -> Path:
    """A face artefact (its ``face`` section is what makes it one); the refusal comes before
    its model files are looked at."""
    head = build_embedder("face_head", in_dim=128, embedding_dim=128, kind="linear").eval()
    manifest = Manifest(
        model_version="faces-extra-test-v1",
        architecture="face_head",
        architecture_kwargs={"in_dim": 128, "embedding_dim": 128, "kind": "linear"},
        preprocessing=Preprocessing(
            image_size=(150, 150), channels=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
        ),
        embedding_dim=128,
        calibration=Calibration(
            tau=0.9, target_far=1e-3, far_at_tau=1e-3, frr_at_tau=0.05, tau_lo=0.85, tau_hi=0.95
        ),
        baseline=Baseline(
            opis=1e-3,
            eps_opis=0.0,
            eps=0.05,
            recall_at_1=0.99,
            map_at_r=0.9,
            num_classes=3,
            num_images=9,
        ),
        dataset={"name": "test"},
        created_at="2026-01-01T00:00:00Z",
        face={
            "detector": "dlib-hog",
            "aligner": "dlib-5-point",
            "descriptor": "dlib-resnet",
            "head": {"kind": "linear", "tcm": False},
            "options": {},
            "model_files": {"dlib_face_recognition_resnet_model_v1.dat": "0" * 64},
        },
    )
    save_artefact(out, head, manifest)
    return out


def serve(tmp_path: Path, artefact: Path, hidden: str) -> tuple[int, str, str]:
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCM_")}
    env |= {
        "PYTHONPATH": str(tmp_path / "blocker"),
        "TCM_TEST_HIDDEN_MODULES": hidden,
        "TCM_ARTEFACT_PATH": str(artefact),
        "TCM_STORE_URL": f"sqlite:///{tmp_path / 'tcm.db'}",
        "TCM_ADMIN_TOKEN": "x" * 32,
        "TCM_DEVICE": "cpu",
        "TCM_MONITOR_ENABLED": "false",
    }
    port = str(free_port())
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", port],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize(
    "hidden",
    [
        "dlib,face_recognition_models",  # the image's service with facekit, without the extra
        "facekit,dlib,face_recognition_models",  # an installation without facekit at all
        "dlib",
    ],
)
def test_face_artefact_without_the_faces_extra_is_refused_clearly(
    tmp_path: Path, hidden: str
) -> None:
    art = face_artefact(tmp_path / "faces")
    code, stdout, stderr = serve(tmp_path, art, hidden)
    assert code != 0, "tcm-serve started without dlib"
    records = [json.loads(ln) for ln in stderr.splitlines() if ln.startswith("{")]
    refusals = [
        r for r in records if r["level"] == "ERROR" and "is a face model" in r.get("message", "")
    ]
    assert len(refusals) == 1, stderr[-3000:]
    message = refusals[0]["message"]
    assert "\n" not in message  # one line
    m = re.search(r"\(([a-z_, ]+) not installed\)", message)
    assert m is not None and set(m.group(1).split(", ")) == set(hidden.split(",")), message
    assert "pip install '.[serve,pretrained,faces]'" in message
    assert "--target faces" in message
    # the named target exists in the Dockerfile and installs the faces extra
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM \S+ AS faces$", dockerfile, re.M)
    assert '".[serve,pretrained,faces]"' in dockerfile
    # no bare import error, no traceback: the line above is all the operator reads
    assert "ModuleNotFoundError" not in stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert any(
        r["message"] == "start-up refused: FacesExtraMissing (logged above)" for r in records
    )
    assert "Application startup failed" in stderr  # and the process says it stopped


def test_the_blocker_really_hides_the_modules(tmp_path: Path) -> None:
    """The same blocker, asked directly: the hidden modules do not import in that process, the
    others still do (so the refusal above is the service's, not a broken interpreter)."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TCM_TEST_HIDDEN_MODULES": "facekit,dlib"}
    code = (
        "import importlib\n"
        "for m in ('facekit', 'dlib'):\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ModuleNotFoundError:\n"
        "        print('hidden', m)\n"
        "import service.engine.faces, tcm\n"
        "print('ok')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hidden", "facekit", "hidden", "dlib", "ok"]
