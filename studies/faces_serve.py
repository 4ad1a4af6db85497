"""`make run MODEL=faces`, end to end over HTTP: a real tcm-serve process serving
``artefacts/faces``, LFW peopleDevTest identities (never trained on: the served head trains on
peopleDevTrain) enrolled with 3 photos each, a 4th photo of each matched (rank-1, and accepted as
the right person at the one global threshold), and one photo each of other peopleDevTest people
who are *not* enrolled (a correct answer is a rejection). Photos are sent as the JPEG files LFW
ships; the service detects, aligns and describes them.

    .venv/bin/python -m studies.faces_serve [--people 100] [--strangers 100]

Writes ``docs/results/faces_serve.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=100)
    p.add_argument("--strangers", type=int, default=100)
    p.add_argument("--artefact", default="artefacts/faces")
    p.add_argument("--out", type=Path, default=Path("docs/results/faces_serve.json"))
    args = p.parse_args()
    lfw = data_dir() / "lfw"
    db = Path(tempfile.mkdtemp()) / "faces.db"
    env = {
        **os.environ,
        "TCM_ARTEFACT_PATH": args.artefact,
        "TCM_ADMIN_TOKEN": "a" * 24,
        "TCM_STORE_URL": f"sqlite:///{db}",
        "TCM_DEVICE": "cpu",
    }
    proc = subprocess.Popen(
        [".venv/bin/tcm-serve", "--port", str(PORT), "--log-level", "warning"], env=env
    )
    base = f"http://127.0.0.1:{PORT}"
    started = time.perf_counter()
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        rows = [
            r.split("\t")
            for r in (lfw / "peopleDevTest.txt").read_text().split("\n")[1:]
            if "\t" in r
        ]
        people = [n for n, c in rows if int(c) >= 4][: args.people]
        strangers = [n for n, c in rows if 2 <= int(c) < 4][: args.strangers]
        archive = zipfile.ZipFile(lfw / "lfw-deepfunneled-crop160.zip")

        def b64(name: str, num: int) -> str:
            member = f"lfw-deepfunneled-c160/{name}/{name}_{num:04d}.jpg"
            return base64.b64encode(archive.read(member)).decode()

        t = httpx.post(base + "/v1/tenants", json={"name": "faces"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {t['api_key']}"}
        client = httpx.Client(base_url=base, headers=auth, timeout=300)
        enrolled, refused = 0, []
        for person in people:  # one request per person: a photo without a face fails only it
            items = [{"subject": person, "image": b64(person, n)} for n in (1, 2, 3)]
            r = client.post("/v1/gallery", json={"items": items})
            if r.status_code == 201:
                enrolled += 1
            else:
                refused.append(
                    {"person": person, "status": r.status_code, "code": r.json().get("code")}
                )
        gallery = set(people) - {x["person"] for x in refused}

        def match(name: str, num: int) -> httpx.Response:
            return client.post("/v1/match", json={"image": b64(name, num), "k": 5})

        with ThreadPoolExecutor(4) as pool:
            known = list(pool.map(lambda n: (n, match(n, 4)), sorted(gallery)))
            unknown = list(pool.map(lambda n: (n, match(n, 1)), strangers))
        top1 = right = no_face = 0
        threshold = version = None
        for name, r in known:
            if r.status_code != 200:
                no_face += 1
                continue
            m = r.json()
            threshold, version = m["threshold"], m["model_version"]
            top1 += m["candidates"][0]["subject"] == name
            right += m["decision"]["accepted"] and m["decision"]["subject"] == name
        false_accepts = sum(
            r.status_code == 200 and r.json()["decision"]["accepted"] for _, r in unknown
        )
        stranger_ok = sum(r.status_code == 200 for _, r in unknown)
        result = {
            "model_version": version,
            "threshold": threshold,
            "people": len(people),
            "enrolled_people": enrolled,
            "enrol_refused": refused,
            "queries": len(known),
            "query_refused": no_face,
            "rank1": top1,
            "rank1_rate": top1 / max(1, len(known)),
            "accepted_right_person": right,
            "accept_rate": right / max(1, len(known)),
            "strangers": len(unknown),
            "strangers_answered": stranger_ok,
            "strangers_falsely_accepted": false_accepts,
            "wall_seconds": time.perf_counter() - started,
        }
        print(json.dumps(result, indent=1))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


if __name__ == "__main__":
    main()
