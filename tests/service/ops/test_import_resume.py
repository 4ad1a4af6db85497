"""``tcm-serve import`` never reports success without storing, never duplicates on resume
(issue 25, item 9), against a real ``tcm-serve`` process:

- a second file with the same name stem derives other item ids (a short hash of its content is
  part of the default prefix), so it is stored, not "found already stored";
- a 409 on a batch that no earlier run sent is an error naming the ids (exit 1), also when the
  run is resumed and run again; only a resumed run's own pending batches count as "already";
- JSONL rows with a null ``item_id`` derive their ids from the row (as rows without one did),
  so a resend finds them stored instead of storing them again under ids the service made up;
- the state is keyed by the content of the source, ``--subjects`` and ``--ids``, the id prefix
  and the target (URL, API key): resuming with any of them changed stops, naming what changed
  (also an edit that keeps the file's size and mtime), and a touched but unchanged file resumes;
- every bad input file (object-dtype, truncated, 0-D or garbage ``.npy``, non-UTF-8 or
  non-JSON JSONL lines, NaN, huge integers, unreadable ``--subjects``, a damaged state file) is
  one line naming the file and where, exit code 1, no traceback.

Every test here fails on the code before the fix (see docs/reliability.md)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench.soak import ServerProcess, serve
from service.ops.importer import ImportError_, run_import
from tests.service.conftest import DIM
from tests.service.ops.test_import_cli import listed, run_cli


@pytest.fixture(scope="module")
def server(artefact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("import-resume")
    with serve(artefact, f"sqlite:///{work / 'tcm.db'}", work) as server:
        yield server


def new_key(server: ServerProcess) -> str:
    created = httpx.post(
        f"{server.base}/v1/tenants",
        json={"name": f"ir-{secrets.token_hex(3)}"},
        headers={"Authorization": f"Bearer {server.admin_token}"},
    )
    assert created.status_code == 201, created.text
    return created.json()["api_key"]


def vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_npy(path: Path, n: int, seed: int, subject: str = "p") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors(n, seed))
    (path.parent / "subjects.txt").write_text("".join(f"{subject}{i // 4}\n" for i in range(n)))
    return path


def cli(args: list[str], key: str, url: str) -> tuple[int, str]:
    proc = run_cli(args, key, url)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def stopped_line(out: str) -> str:
    """The one ``import stopped:`` line of a failed run (and no traceback)."""
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("import stopped:")]
    assert len(lines) == 1, out
    return lines[0]


def embeddings(server: ServerProcess, key: str) -> dict[str, tuple[str, np.ndarray]]:
    """item id -> (subject, embedding) of every item of the tenant."""
    out = {}
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}) as c:
        for it in listed(server.base, key):
            got = c.get(f"/v1/gallery/{it['item_id']}", params={"include_embedding": True})
            out[it["item_id"]] = (it["subject"], np.asarray(got.json()["embedding"]))
    return out


def importer(server: ServerProcess, key: str, source: Path, **kw: Any) -> dict[str, int]:
    options: dict[str, Any] = {
        "subjects": None,
        "ids": None,
        "id_prefix": None,
        "batch_size": 50,
        "concurrency": 1,
        "state_path": None,
        "restart": False,
        "retries": 2,
    }
    return run_import(source=source, url=server.base, api_key=key, **{**options, **kw})


class Interrupted(Exception):
    pass


def stop_after(rows: int) -> Callable[[int], None]:
    """A ``progress`` callback that interrupts the import once ``rows`` rows are recorded."""
    seen = 0

    def progress(n: int) -> None:
        nonlocal seen
        seen += n
        if seen >= rows:
            raise Interrupted

    return progress


# --- same stem, 409s ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_file_with_the_same_stem_is_stored(server: ServerProcess, tmp_path: Path) -> None:
    """Before: ``b/faces.npy`` derived the ids ``faces-<row>`` of ``a/faces.npy``, every batch
    was answered 409 for exactly its ids and counted "found already stored": exit 0, nothing
    written."""
    n = 120
    a = write_npy(tmp_path / "a" / "faces.npy", n, seed=10, subject="a")
    b = write_npy(tmp_path / "b" / "faces.npy", n, seed=11, subject="b")
    key = new_key(server)
    for src in (a, b):
        rc, out = cli(
            [str(src), "--subjects", str(src.parent / "subjects.txt"), "--batch-size", "50"],
            key,
            server.base,
        )
        assert rc == 0, out
        assert f"{n} rows: {n} stored now, 0 stored by an earlier run, 0 found" in out, out
    items = embeddings(server, key)
    assert len(items) == 2 * n
    for seed, subject in ((10, "a"), (11, "b")):
        mine = [(iid, v) for iid, v in items.items() if v[0].startswith(subject)]
        assert len(mine) == n and all(iid.startswith("faces-") for iid, _ in mine)
        rows = {int(iid.rsplit("-", 1)[1]): v for iid, v in mine}
        np.testing.assert_allclose(
            np.stack([rows[r][1] for r in range(n)]), vectors(n, seed), atol=1e-6
        )


@pytest.mark.slow
def test_a_409_on_a_fresh_run_is_an_error(server: ServerProcess, tmp_path: Path) -> None:
    """Before: a fresh run whose batch was answered 409 for exactly its ids took it for its
    own (exit 0, "found already stored") though nothing of the source was written."""
    rows = [
        {"subject": f"s{i}", "item_id": f"item-{i}", "embedding": v.tolist()}
        for i, v in enumerate(vectors(20, seed=12))
    ]
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    key = new_key(server)
    assert cli([str(first), "--batch-size", "10"], key, server.base)[0] == 0
    # another file naming the same ids (other subjects): nothing may be counted as done
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "subject": "intruder"}) + "\n" for r in rows))
    for _ in range(2):  # a second run (it finds the first's state) is refused again
        rc, out = cli([str(other), "--batch-size", "10"], key, server.base)
        assert rc == 1, out
        line = stopped_line(out)
        assert "rows 0..9: 10 item ids exist already and were not written by this import" in line
        assert "item-0" in line and "never sent before" in line, line
        assert "run the same command again" not in out  # it would fail the same way
    # the same file again once its state file is gone: a fresh run, refused as well
    first.with_name(first.name + ".import.json").unlink()
    rc, out = cli([str(first), "--batch-size", "10"], key, server.base)
    assert rc == 1 and "exist already" in stopped_line(out), out
    assert {it["subject"] for it in listed(server.base, key)} == {f"s{i}" for i in range(20)}


@pytest.mark.slow
def test_a_foreign_409_mid_way_stays_an_error_on_the_next_run(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Rows 100..149 collide with items enrolled by someone else: the import stores rows 0..99,
    stops naming the ids, and the next run (which resumes its state) stops there again instead
    of counting them "already stored"."""
    src = write_npy(tmp_path / "faces.npy", 200, seed=13)
    key = new_key(server)
    foreign = [
        {"subject": "other", "item_id": f"x-{r}", "embedding": vectors(1, r)[0].tolist()}
        for r in range(100, 150)
    ]
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}) as c:
        assert c.post("/v1/gallery", json={"items": foreign}).status_code == 201
    args = [
        str(src),
        "--subjects",
        str(tmp_path / "subjects.txt"),
        "--id-prefix",
        "x-",
        "--batch-size",
        "50",
        "--concurrency",
        "1",
    ]
    for _ in range(2):
        rc, out = cli(args, key, server.base)
        assert rc == 1, out
        assert "rows 100..149: 50 item ids exist already" in stopped_line(out), out
    state = json.loads((tmp_path / "faces.npy.import.json").read_text())
    assert state["done"] == 100 and state["pending"] == []
    subjects = {it["item_id"]: it["subject"] for it in listed(server.base, key)}
    assert len(subjects) == 150
    assert all(subjects[f"x-{r}"] == "other" for r in range(100, 150))


# --- null item ids --------------------------------------------------------------------------------
@pytest.mark.slow
def test_jsonl_null_item_ids_resume_without_duplicates(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Before: ``"item_id": null`` was sent as is, the service made up an id, and the batches
    resent after an interruption were stored again: 400 items from 300 rows."""
    vecs = vectors(300, seed=14)
    src = tmp_path / "nulls.jsonl"
    lines = []
    for i, v in enumerate(vecs):
        row = {"subject": f"p{i // 3}", "item_id": None, "embedding": v.tolist()}
        lines.append(json.dumps(row) + ("\n\n" if i == 7 else "\n"))  # a blank line: skipped
    src.write_text("".join(lines))
    key = new_key(server)
    rc, out = cli([str(src), "--batch-size", "50"], key, server.base)
    assert rc == 0, out
    # the state lags 100 rows behind the store (a kill between the answer and the state
    # write): those batches are still pending and are sent again
    state = src.with_name(src.name + ".import.json")
    saved = json.loads(state.read_text())
    state.write_text(json.dumps({**saved, "done": 200, "pending": [[200, 250], [250, 300]]}))
    rc, out = cli([str(src), "--batch-size", "50"], key, server.base)
    assert rc == 0, out
    items = embeddings(server, key)
    assert len(items) == 300  # before: 400
    assert "300 rows: 0 stored now, 200 stored by an earlier run, 100 found already" in out, out
    by_row = {int(iid.rsplit("-", 1)[1]): v for iid, v in items.items()}
    assert all(iid.startswith("nulls-") for iid in items) and sorted(by_row) == list(range(300))
    np.testing.assert_allclose(np.stack([by_row[r][1] for r in range(300)]), vecs, atol=1e-6)


# --- the state is keyed by content and options ----------------------------------------------------
def interrupted_import(server: ServerProcess, key: str, src: Path, **kw: Any) -> None:
    with pytest.raises(Interrupted):
        importer(server, key, src, progress=stop_after(100), **kw)
    assert json.loads(src.with_name(src.name + ".import.json").read_text())["done"] == 100


@pytest.mark.slow
def test_resume_with_other_subjects_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    """Before: a resumed .npy import took its subjects from the new --subjects file: the first
    rows had the old labels, the rest the new ones, silently."""
    src = write_npy(tmp_path / "faces.npy", 200, seed=15, subject="old")
    subjects = tmp_path / "subjects.txt"
    key = new_key(server)
    interrupted_import(server, key, src, subjects=subjects)
    subjects.write_text("".join(f"new{i // 4}\n" for i in range(200)))
    with pytest.raises(ImportError_) as info:
        importer(server, key, src, subjects=subjects)
    message = str(info.value)
    assert "records an import of another (or a changed) file or with other options" in message
    assert "--subjects (was sha256" in message and "pass --restart" in message, message
    assert "\n" not in message
    assert {it["subject"][:3] for it in listed(server.base, key)} == {"old"}
    assert len(listed(server.base, key)) == 100
    # --restart is a fresh run: the 100 stored rows are not taken for its own
    with pytest.raises(ImportError_, match=r"rows 0\.\.49: 50 item ids exist already"):
        importer(server, key, src, subjects=subjects, restart=True)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["content", "ids", "id_prefix", "tenant"])
def test_resume_with_other_inputs_is_refused(
    server: ServerProcess, tmp_path: Path, change: str
) -> None:
    src = write_npy(tmp_path / "faces.npy", 200, seed=16)
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"id{i}\n" for i in range(200)))
    key = new_key(server)
    base: dict[str, Any] = {"subjects": tmp_path / "subjects.txt"}
    options = {**base, "ids": ids} if change == "ids" else base
    interrupted_import(server, key, src, **options)
    if change == "content":  # an edit keeping the size and the mtime (the old key)
        st = src.stat()
        data = bytearray(src.read_bytes())
        data[-4:] = np.float32(0.5).tobytes()
        src.write_bytes(bytes(data))
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        want = "the source's content (was sha256"
    elif change == "ids":
        ids.write_text("".join(f"other{i}\n" for i in range(200)))
        want = "--ids (was sha256"
    elif change == "id_prefix":
        options = {**base, "id_prefix": "z-"}
        want = "the item id prefix (was 'faces-"
    else:
        key = new_key(server)
        want = "the API key (another tenant, or another key)"
    with pytest.raises(ImportError_) as info:
        importer(server, key, src, **options)
    assert want in str(info.value), str(info.value)


@pytest.mark.slow
def test_resume_is_keyed_by_content_not_mtime(server: ServerProcess, tmp_path: Path) -> None:
    """A touched (or copied back) but unchanged source resumes; before, any new mtime meant
    --restart, which then re-sent everything."""
    src = write_npy(tmp_path / "faces.npy", 200, seed=17)
    key = new_key(server)
    interrupted_import(server, key, src, subjects=tmp_path / "subjects.txt")
    os.utime(src, ns=(1, 1))
    counts = importer(server, key, src, subjects=tmp_path / "subjects.txt")
    assert counts == {"total": 200, "skipped": 100, "stored": 100, "already": 0}
    assert len(listed(server.base, key)) == 200


def test_a_state_of_the_old_format_is_not_resumed(tmp_path: Path) -> None:
    """Its derived ids were ``<stem>-<row>``: resuming it would store the rest under other ids."""
    src = write_npy(tmp_path / "faces.npy", 20, seed=18)
    st = src.stat()
    state = tmp_path / "faces.npy.import.json"
    state.write_text(
        json.dumps(
            {
                "source": str(src.resolve()),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "done": 10,
            }
        )
    )
    with pytest.raises(ImportError_) as info:
        run_import(
            source=src,
            url="http://127.0.0.1:9",
            api_key="k",
            subjects=tmp_path / "subjects.txt",
            ids=None,
            id_prefix=None,
            batch_size=5,
            concurrency=1,
            state_path=None,
            restart=False,
            retries=0,
        )
    assert "written by an older tcm-serve import" in str(info.value)
    assert "pass --restart" in str(info.value)


# --- bad files: one line each ---------------------------------------------------------------------
def bad_file(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(CLI arguments, what the one line must say) for an input with one defect."""
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("".join(f"p{i}\n" for i in range(10)))
    npy = ["--subjects", str(subjects)]
    src = tmp_path / f"{case}.npy"
    if case == "object_npy":
        np.save(src, np.array([[1.0, None]] * 10, dtype=object), allow_pickle=True)
        return [str(src), *npy], f"{src}: holds Python objects (dtype object)"
    if case == "truncated_npy":
        np.save(src, vectors(10, 0))
        src.write_bytes(src.read_bytes()[:-100])
        return [str(src), *npy], f"{src}: truncated: its header says 10 rows x {DIM} float32"
    if case == "scalar_npy":
        np.save(src, np.float32(1.0))
        return [str(src), *npy], f"{src}: expected a 2-D matrix (rows x dim), got ()"
    if case == "not_npy":
        src.write_bytes(b"hello, world\n")
        return [str(src), *npy], f"{src}: not a .npy file"
    if case == "subjects_not_utf8":
        np.save(src, vectors(10, 0))
        subjects.write_bytes(b"p0\np1\np\xe92\n" + b"p\n" * 7)
        return [str(src), *npy], f"--subjects {subjects}: line 3 is not UTF-8 (byte 7"
    if case == "subjects_missing":
        np.save(src, vectors(10, 0))
        return [str(src), "--subjects", str(tmp_path / "nope.txt")], "nope.txt: cannot read it"
    if case == "nan_npy":
        v = vectors(10, 0)
        v[6, 3] = np.nan
        np.save(src, v)
        return [str(src), *npy], f"{src}: row 6: embedding holds NaN or infinity"
    good = json.dumps({"subject": "s", "embedding": [0.5] * DIM}).encode() + b"\n"
    src = tmp_path / f"{case}.jsonl"
    if case == "jsonl_not_utf8":
        src.write_bytes(good * 3 + b"\n" + b'{"subject": "caf\xe9", "embedding": []}\n')
        offset = 3 * len(good) + 1 + len(b'{"subject": "caf')
        return [str(src)], f"{src}: row 3 (line 5) is not UTF-8: byte {offset} of the file"
    if case == "jsonl_not_json":
        src.write_bytes(good + b"\n\n" + good + b'{"subject": "s", "embedding": [1,}\n')
        return [str(src)], f"{src}: row 2 (line 5) is not JSON: Expecting value at column 34"
    if case == "jsonl_nan":
        src.write_bytes(good + b'{"subject": "s", "embedding": [NaN, 1.0]}\n')
        return [str(src)], f"{src}: row 1 (line 2) is not JSON: NaN is not JSON"
    if case == "jsonl_huge_int":
        src.write_bytes(good + b'{"subject": "s", "embedding": [' + b"9" * 5000 + b"]}\n")
        return [str(src)], f"{src}: row 1 (line 2) is not JSON: Exceeds the limit"
    if case == "jsonl_item_id_not_string":
        src.write_bytes(good + b'{"subject": "s", "item_id": [1], "embedding": [1.0]}\n')
        return [str(src)], f"{src}: row 1 (line 2): item_id is not a string"
    assert case == "damaged_state"
    src.write_bytes(good)
    src.with_name(src.name + ".import.json").write_text('{"done": 3')
    return [str(src)], f"{src}.import.json is not a readable import state"


BAD_FILES = [
    "object_npy",
    "truncated_npy",
    "scalar_npy",
    "not_npy",
    "subjects_not_utf8",
    "subjects_missing",
    "nan_npy",
    "jsonl_not_utf8",
    "jsonl_not_json",
    "jsonl_nan",
    "jsonl_huge_int",
    "jsonl_item_id_not_string",
    "damaged_state",
]


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_one_line(tmp_path: Path, case: str) -> None:
    """Nothing is sent (nothing listens on the URL: the error comes first): exit code 1, one
    ``import stopped:`` line naming the file and where, no traceback, no advice to resume."""
    args, want = bad_file(tmp_path, case)
    rc, out = cli([*args, "--retries", "0"], "tcm_k_x", "http://127.0.0.1:9")
    assert rc == 1, out
    assert want in stopped_line(out), out
    assert "run the same command again" not in out
