"""``tcm-serve import`` against a real ``tcm-serve`` process: a .npy import killed mid-way
resumes to exactly the source's items (no duplicate, none missing, the right vectors), also when
the state file lags behind what was stored; a bad JSONL row stops the import naming the row.
Parquet sources: the same items and vectors as from .npy (list, fixed-size list and base64
embeddings), metadata as JSON text, struct or map, resume after a kill, and each bad input
named by row or column."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.soak import ServerProcess, serve
from service.ops.importer import (
    ImportError_,
    _row_groups_from,
    b64_vector,
    count_rows,
    derived_id_prefix,
    open_source,
    run_import,
)
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


def kill_once_stored(proc: subprocess.Popen, state: Path, rows: int) -> int:
    """SIGKILLs a running import once its state file records ``rows`` rows (or after 60 s);
    returns the rows it had recorded."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if state.exists() and json.loads(state.read_text())["done"] >= rows:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return json.loads(state.read_text())["done"]


def lag_state(state: Path, done: int, rows: int, batch_size: int = 100) -> None:
    """Sets the state back ``rows`` rows as a kill between the service's answer and the state
    write leaves it: those batches are still pending (sent, outcome unknown)."""
    saved = json.loads(state.read_text())
    lagged = [[lo, lo + batch_size] for lo in range(done - rows, done, batch_size)]
    state.write_text(
        json.dumps({**saved, "done": done - rows, "pending": lagged + saved["pending"]})
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

        done = kill_once_stored(run_cli(args, key, server.base), state, 500)
        assert 500 <= done < N, done  # interrupted mid-way

        # the state lags behind the store (a kill between the answer and the state write):
        # the resent batches are answered 409 for exactly their ids and count as done
        lag_state(state, done, 300)
        proc = run_cli(args, key, server.base)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "found already stored" in out
        assert json.loads(state.read_text())["done"] == N

        items = listed(server.base, key)
        ids = [it["item_id"] for it in items]
        assert len(ids) == len(set(ids)) == N
        prefix = derived_id_prefix(src)
        assert prefix.startswith("faces-") and len(prefix) == len("faces-12345678-")
        assert set(ids) == {f"{prefix}{r}" for r in range(N)}
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}) as c:
            for r in (0, done - 1, done, N - 1):
                got = c.get(f"/v1/gallery/{prefix}{r}", params={"include_embedding": True}).json()
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
        more = derived_id_prefix(src2)
        assert "row 17" in " ".join(out.split()) and f"{more}17" in out, out
        after = {it["item_id"] for it in listed(server.base, key)} - set(ids)
        batches = [{f"{more}{i}" for i in range(lo, lo + 10)} for lo in (0, 10, 20)]
        assert batches[0] <= after and not after & batches[1]  # the bad row's batch: none
        # the batch after it was already in flight (2 in flight): wholly there or wholly not
        assert after & batches[2] in (set(), batches[2])


# --- Parquet ------------------------------------------------------------------------------------
P = 240  # rows of the Parquet sources (row groups of 64: the last one short)


def unit_vectors(n: int, seed: int) -> np.ndarray:
    vecs = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def embedding_column(vecs: np.ndarray, kind: str) -> pa.Array:
    """The same vectors as a Parquet embedding column of ``kind``."""
    if kind == "list_float32":
        return pa.array(list(vecs), pa.list_(pa.float32()))
    if kind == "fixed_float64":
        flat = pa.array(vecs.astype(np.float64).ravel())
        return pa.FixedSizeListArray.from_arrays(flat, DIM)
    assert kind == "b64"
    return pa.array([b64_vector(v) for v in vecs], pa.string())


def write_parquet(path: Path, columns: dict[str, Any], row_group_size: int = 64) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def subjects_of(n: int) -> list[str]:
    return [f"p{i // 4}" for i in range(n)]


@pytest.fixture(scope="module")
def server(artefact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One ``tcm-serve`` for the Parquet tests (each uses its own tenant)."""
    work = tmp_path_factory.mktemp("parquet-serve")
    with serve(artefact, f"sqlite:///{work / 'tcm.db'}", work) as server:
        yield server


def new_key(server: ServerProcess) -> str:
    created = httpx.post(
        f"{server.base}/v1/tenants",
        json={"name": f"pq-{secrets.token_hex(3)}"},
        headers={"Authorization": f"Bearer {server.admin_token}"},
    )
    assert created.status_code == 201, created.text
    return created.json()["api_key"]


def import_file(server: ServerProcess, key: str, source: Path, **kw: Any) -> dict[str, int]:
    options: dict[str, Any] = {
        "subjects": None,
        "ids": None,
        "id_prefix": None,
        "batch_size": 50,
        "concurrency": 2,
        "state_path": None,
        "restart": False,
        "retries": 2,
    }
    return run_import(source=source, url=server.base, api_key=key, **{**options, **kw})


def by_row(items: list[dict], prefix: str) -> dict[int, str]:
    """Derived item ids ``<prefix><row>`` -> {row: subject}."""
    assert all(it["item_id"].startswith(prefix) for it in items)
    return {int(it["item_id"][len(prefix) :]): it["subject"] for it in items}


def stored_vectors(server: ServerProcess, key: str, item_ids: list[str]) -> np.ndarray:
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}) as c:
        got = [
            c.get(f"/v1/gallery/{i}", params={"include_embedding": True}).json()["embedding"]
            for i in item_ids
        ]
    return np.asarray(got)


@pytest.fixture(scope="module")
def npy_import(
    server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[dict], str]:
    """The reference: ``P`` rows imported from a .npy matrix (ids ``faces-<hash>-<row>``)."""
    work = tmp_path_factory.mktemp("npy-ref")
    np.save(work / "faces.npy", unit_vectors(P, seed=1))
    (work / "subjects.txt").write_text("".join(s + "\n" for s in subjects_of(P)))
    key = new_key(server)
    counts = import_file(server, key, work / "faces.npy", subjects=work / "subjects.txt")
    assert counts["stored"] == P
    return key, listed(server.base, key), derived_id_prefix(work / "faces.npy")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["list_float32", "fixed_float64", "b64"])
def test_parquet_import_equals_npy(
    server: ServerProcess, npy_import: tuple[str, list[dict], str], tmp_path: Path, kind: str
) -> None:
    vecs = unit_vectors(P, seed=1)
    src = write_parquet(
        tmp_path / "faces.parquet",
        {
            "subject": subjects_of(P),
            ("embedding_b64" if kind == "b64" else "embedding"): embedding_column(vecs, kind),
        },
    )
    key = new_key(server)
    counts = import_file(server, key, src)
    assert counts == {"total": P, "skipped": 0, "stored": P, "already": 0}
    npy_key, npy_items, npy_prefix = npy_import
    # listed in enrolment order, which two batches in flight may swap: compared as mappings
    # (of rows: each file derives its ids from its own content)
    items = listed(server.base, key)
    prefix = derived_id_prefix(src)
    assert prefix.startswith("faces-") and prefix != npy_prefix
    assert len(items) == len(npy_items) == P
    assert by_row(items, prefix) == by_row(npy_items, npy_prefix)
    sample = [*range(0, P, 7), P - 1]
    np.testing.assert_allclose(
        stored_vectors(server, key, [f"{prefix}{r}" for r in sample]),
        stored_vectors(server, npy_key, [f"{npy_prefix}{r}" for r in sample]),
        atol=1e-6,
    )


@pytest.mark.slow
@pytest.mark.parametrize("form", ["json_string", "struct", "map"])
def test_parquet_metadata_and_item_ids(server: ServerProcess, tmp_path: Path, form: str) -> None:
    n = 20
    meta = [{"camera": f"c{i % 3}", "n": str(i)} if i % 5 else None for i in range(n)]
    if form == "json_string":
        column = pa.array([json.dumps(m) if m else None for m in meta], pa.string())
    elif form == "struct":
        column = pa.array(meta, pa.struct([("camera", pa.string()), ("n", pa.string())]))
    else:
        column = pa.array(meta, pa.map_(pa.string(), pa.string()))
    ids = [f"item.{i}" if i % 2 else None for i in range(n)]  # null: the derived id
    src = write_parquet(
        tmp_path / "meta.parquet",
        {
            "subject": subjects_of(n),
            "embedding": embedding_column(unit_vectors(n, 2), "list_float32"),
            "item_id": pa.array(ids, pa.string()),
            "metadata": column,
        },
        row_group_size=8,
    )
    key = new_key(server)
    import_file(server, key, src, batch_size=6)
    got = {it["item_id"]: it["metadata"] for it in listed(server.base, key)}
    want = {(ids[i] or f"{derived_id_prefix(src)}{i}"): (meta[i] or {}) for i in range(n)}
    assert got == want


@pytest.mark.slow
def test_parquet_import_resumes_after_kill_without_duplicates(
    server: ServerProcess, tmp_path: Path
) -> None:
    vecs = unit_vectors(N, seed=3)
    src = write_parquet(
        tmp_path / "big.parquet",
        {"subject": subjects_of(N), "embedding": embedding_column(vecs, "list_float32")},
        row_group_size=256,  # resumes mid-group: the rows of the group before it are dropped
    )
    state = tmp_path / "big.parquet.import.json"
    key = new_key(server)
    done = kill_once_stored(
        run_cli([str(src), "--batch-size", "100"], key, server.base), state, 500
    )
    assert 500 <= done < N, done
    # the state lags behind the store by whole batches (a kill between the answer and the state
    # write): the resent batches are found stored (409 for exactly their ids), not doubled
    lag_state(state, done, 300)
    proc = run_cli([str(src), "--batch-size", "100"], key, server.base)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "found already stored" in out
    assert json.loads(state.read_text())["done"] == N
    ids = [it["item_id"] for it in listed(server.base, key)]
    assert len(ids) == len(set(ids)) == N
    prefix = derived_id_prefix(src)
    assert set(ids) == {f"{prefix}{r}" for r in range(N)}
    rows = [0, done - 301, done - 300, done, N - 1]
    np.testing.assert_allclose(
        stored_vectors(server, key, [f"{prefix}{r}" for r in rows]), vecs[rows], atol=1e-6
    )


def test_parquet_resume_starts_at_the_row_group_of_its_first_row(tmp_path: Path) -> None:
    src = write_parquet(
        tmp_path / "r.parquet",
        {
            "subject": subjects_of(P),
            "embedding": embedding_column(unit_vectors(P, 4), "list_float32"),
        },
    )
    pf = pq.ParquetFile(src)
    assert _row_groups_from(pf.metadata, 0) == ([0, 1, 2, 3], 0)
    assert _row_groups_from(pf.metadata, 130) == ([2, 3], 2)  # groups of 64: 128 | 130
    assert _row_groups_from(pf.metadata, P) == ([], 0)
    reader = open_source(src, id_prefix="r-")
    assert reader.count() == P
    batches = list(reader.batches(130, 50))
    assert [(b.start, len(b.items)) for b in batches] == [(130, 50), (180, 50), (230, 10)]
    assert [it["item_id"] for b in batches for it in b.items] == [f"r-{r}" for r in range(130, P)]
    assert list(reader.batches(P, 50)) == []


def bad_parquet(tmp_path: Path, case: str) -> Path:
    """A Parquet source with one defect (at row 37 where it is a row's)."""
    n, bad = 50, 37
    vecs = unit_vectors(n, 5).astype(np.float64)
    columns: dict[str, Any] = {"subject": subjects_of(n)}
    emb: list[Any] = list(vecs)
    if case == "no_subject":
        del columns["subject"]
    elif case == "null_subject":
        columns["subject"] = [None if i == bad else s for i, s in enumerate(subjects_of(n))]
    elif case == "short_embedding":
        emb[bad] = vecs[bad][:-1]
    elif case in ("nan", "inf", "beyond_float32"):
        emb[bad] = vecs[bad].copy()
        emb[bad][3] = {"nan": np.nan, "inf": -np.inf, "beyond_float32": 1e300}[case]
    elif case == "null_embedding":
        emb[bad] = None
    if case == "both":
        columns["embedding_b64"] = [b64_vector(v) for v in vecs]
    if case == "metadata_nan":
        columns["metadata"] = pa.array(
            [{"q": float("nan") if i == bad else 0.5} for i in range(n)],
            pa.struct([("q", pa.float64())]),
        )
    if case == "metadata_not_object":
        columns["metadata"] = ['{"a": "b"}' if i != bad else "[1, 2]" for i in range(n)]
    if case == "metadata_timestamp":
        columns["metadata"] = pa.array(
            [{"t": 0} for _ in range(n)], pa.struct([("t", pa.timestamp("s"))])
        )
    if case != "neither":
        columns["embedding"] = pa.array(emb, pa.list_(pa.float64()))
    return write_parquet(tmp_path / f"{case}.parquet", columns, row_group_size=16)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_subject", "no 'subject' column"),
        ("null_subject", "row 37: subject is null"),
        ("short_embedding", "row 37: embedding has 63 values, expected 64"),
        ("null_embedding", "row 37: embedding is null"),
        ("nan", "row 37: embedding holds NaN or infinity"),
        ("inf", "row 37: embedding holds NaN or infinity"),
        ("beyond_float32", "row 37: embedding holds NaN or infinity"),
        ("both", "has both of the columns 'embedding'"),
        ("neither", "has neither of the columns 'embedding'"),
        ("metadata_nan", "row 37: metadata is not plain JSON"),
        ("metadata_not_object", "row 37: metadata is not a JSON object"),
        ("metadata_timestamp", "column 'metadata' is struct<t: timestamp"),  # Parquet: [s] is [ms]
    ],
)
def test_bad_parquet_names_the_row_or_column(tmp_path: Path, case: str, message: str) -> None:
    src = bad_parquet(tmp_path, case)
    with pytest.raises(ImportError_) as info:
        list(open_source(src, id_prefix="x-").batches(0, 10))
    assert message in str(info.value), str(info.value)
    assert str(src) in str(info.value)


@pytest.mark.slow
def test_bad_parquet_stops_the_cli_naming_the_row(server: ServerProcess, tmp_path: Path) -> None:
    src = bad_parquet(tmp_path, "nan")
    key = new_key(server)
    proc = run_cli([str(src), "--batch-size", "10"], key, server.base)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "row 37: embedding holds NaN or infinity" in " ".join(out.split()), out
    stored = {it["item_id"] for it in listed(server.base, key)}
    prefix = derived_id_prefix(src)
    assert stored <= {f"{prefix}{r}" for r in range(30)}  # nothing from the bad row's batch on


def test_parquet_without_pyarrow_says_which_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = bad_parquet(tmp_path, "nan")
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.compute"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` now fails
    with pytest.raises(ImportError_) as info:
        count_rows(src)
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'threshold-consistent-retrieval[parquet]'" in message, message
