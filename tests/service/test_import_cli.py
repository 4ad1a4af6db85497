"""``tcm-serve import`` against a real ``tcm-serve`` process: a .npy import killed mid-way
resumes to exactly the source's items (no duplicate, none missing, the right vectors), also when
the state file lags behind what was stored; a bad JSONL row stops the import naming the row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.soak import serve
from tests.service.conftest import DIM

N = 2000


def run_cli(args: list[str], key: str, url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TCM_API_KEY": key, "TCM_URL": url, "COLUMNS": "120"}
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "import", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def listed(url: str, key: str) -> list[dict]:
    out, cursor = [], None
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        while True:
            params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
            page = c.get("/v1/gallery", params=params).json()
            out += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return out


@pytest.mark.slow
def test_import_resumes_after_kill_without_duplicates(artefact: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((N, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    src = tmp_path / "faces.npy"
    np.save(src, vecs)
    (tmp_path / "subjects.txt").write_text("".join(f"p{i // 4}\n" for i in range(N)))
    state = tmp_path / "faces.npy.import.json"
    args = [str(src), "--subjects", str(tmp_path / "subjects.txt"), "--batch-size", "100"]
    with serve(artefact, f"sqlite:///{tmp_path / 'tcm.db'}", tmp_path) as server:
        created = httpx.post(
            f"{server.base}/v1/tenants",
            json={"name": "imp"},
            headers={"Authorization": f"Bearer {server.admin_token}"},
        ).json()
        key = created["api_key"]

        proc = run_cli(args, key, server.base)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it once a few batches are stored
            if state.exists() and json.loads(state.read_text())["done"] >= 500:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        done = json.loads(state.read_text())["done"]
        assert 500 <= done < N, done  # interrupted mid-way

        # the state lags behind the store (a kill between the answer and the state write):
        # the resent batches are answered 409 for exactly their ids and count as done
        saved = json.loads(state.read_text())
        state.write_text(json.dumps({**saved, "done": done - 300}))
        proc = run_cli(args, key, server.base)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "found already stored" in out
        assert json.loads(state.read_text())["done"] == N

        items = listed(server.base, key)
        ids = [it["item_id"] for it in items]
        assert len(ids) == len(set(ids)) == N
        assert set(ids) == {f"faces-{r}" for r in range(N)}
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}) as c:
            for r in (0, done - 1, done, N - 1):
                got = c.get(f"/v1/gallery/faces-{r}", params={"include_embedding": True}).json()
                assert got["subject"] == f"p{r // 4}"
                np.testing.assert_allclose(got["embedding"], vecs[r], atol=1e-6)

        # a JSONL source with a bad row: stops, names the row, nothing of its batch written
        rows = [{"subject": "j", "embedding": vecs[i].tolist()} for i in range(30)]
        rows[17]["embedding"] = rows[17]["embedding"][:-1]  # wrong dimension
        src2 = tmp_path / "more.jsonl"
        src2.write_text("".join(json.dumps(r) + "\n" for r in rows))
        proc = run_cli([str(src2), "--batch-size", "10"], key, server.base)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 1, out
        assert "row 17" in " ".join(out.split()) and "more-17" in out, out
        after = {it["item_id"] for it in listed(server.base, key)} - set(ids)
        batches = [{f"more-{i}" for i in range(lo, lo + 10)} for lo in (0, 10, 20)]
        assert batches[0] <= after and not after & batches[1]  # the bad row's batch: none
        # the batch after it was already in flight (2 in flight): wholly there or wholly not
        assert after & batches[2] in (set(), batches[2])
