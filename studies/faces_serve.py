"""`make run MODEL=faces`, end to end: a real tcm-serve process serving ``artefacts/faces``, 30
LFW identities of peopleDevTest (never trained on) enrolled over HTTP with 3 images each, and a
4th image of each matched. Run from the repository root after `make model MODEL=faces`:

    .venv/bin/python -m studies.faces_serve
"""

from __future__ import annotations

import base64
import collections
import os
import signal
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

PORT = 8765
ADMIN = {"Authorization": "Bearer " + "a" * 24}


def data_dir() -> Path:
    for candidate in (os.environ.get("TCM_DATA_DIR"), "../shared/data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise SystemExit("no shared data folder: set TCM_DATA_DIR")


def main() -> None:
    lfw = data_dir() / "lfw"
    db = Path(tempfile.mkdtemp()) / "faces.db"
    env = {**os.environ, "TCM_ARTEFACT_PATH": "artefacts/faces", "TCM_ADMIN_TOKEN": "a" * 24,
           "TCM_STORE_URL": f"sqlite:///{db}", "TCM_DEVICE": "cpu"}
    proc = subprocess.Popen([".venv/bin/tcm-serve", "--port", str(PORT), "--log-level",
                             "warning"], env=env)
    base = f"http://127.0.0.1:{PORT}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        rows = (lfw / "peopleDevTest.txt").read_text().split("\n")[1:]
        people = [r.split("\t")[0] for r in rows if "\t" in r and int(r.split("\t")[1]) >= 4]
        people = people[:30]
        archive = zipfile.ZipFile(lfw / "lfw-deepfunneled-crop160.zip")
        files = collections.defaultdict(list)
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) >= 2 and parts[-2] in people and name.endswith((".png", ".jpg")):
                files[parts[-2]].append(name)

        def b64(name: str) -> str:
            return base64.b64encode(archive.read(name)).decode()

        t = httpx.post(base + "/v1/tenants", json={"name": "faces"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {t['api_key']}"}
        items = [{"subject": p, "image": b64(f)} for p in sorted(files)
                 for f in sorted(files[p])[:3]]
        r = httpx.post(base + "/v1/gallery", json={"items": items}, headers=auth, timeout=60)
        print(f"enrolled: {r.status_code}, {len(items)} images of {len(files)} people")
        top1 = right = 0
        for p in sorted(files):
            m = httpx.post(base + "/v1/match", json={"image": b64(sorted(files[p])[3]), "k": 5},
                           headers=auth, timeout=30).json()
            top1 += m["candidates"][0]["subject"] == p
            right += m["decision"]["accepted"] and m["decision"]["subject"] == p
        print(f"model {m['model_version']}, threshold {m['threshold']:.4f}")
        print(f"rank-1 {top1}/{len(files)}; accepted as the right person at tau "
              f"{right}/{len(files)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


if __name__ == "__main__":
    main()
