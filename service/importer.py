"""``tcm-serve import``: stream millions of embeddings into a running service, resumably.

Sources (by file suffix):

- ``.npy``: a float (n, d) matrix, memory-mapped (never loaded whole); subjects come from a text
  file with one line per row (``--subjects``), item ids from ``--ids`` (same layout) or are
  ``<prefix><row>``.
- ``.jsonl``: one JSON object per line with ``subject`` and ``embedding`` (a list) or
  ``embedding_b64``, optionally ``item_id`` (default ``<prefix><line number - 1>``) and
  ``metadata``.

Parquet is not offered: pyarrow is not a dependency of this project, and JSONL or ``.npy`` cover
the same data.

Each batch is one ``POST /v1/gallery`` (base64 float32 embeddings: no float parsing on either
side), which the service writes all or nothing. Progress is a small JSON state file beside the
source (``<source>.import.json``) holding the number of rows acknowledged, rewritten atomically
after each batch, so an interrupted import resumes after the last acknowledged batch. A batch
that was written but not yet recorded (the process died between the service's answer and the
state write) is sent again and answered 409 for exactly its own item ids: that counts as done,
so a resumed import never duplicates an item. Item ids must therefore be deterministic (they
are: from the file, or derived from the row number).

429/503 and transport errors are retried with exponential backoff; a 422 names the source row.
Several batches are in flight at once (``--concurrency``); the state only advances over the
contiguous prefix of acknowledged batches.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np


class ImportError_(Exception):
    """An import that cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Batch:
    start: int  # row of the source where the batch begins
    items: list[dict[str, Any]]

    @property
    def item_ids(self) -> list[str]:
        return [it["item_id"] for it in self.items]


def b64_vector(v: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode()


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def count_rows(source: Path) -> int:
    if source.suffix == ".npy":
        return int(np.load(source, mmap_mode="r").shape[0])
    if source.suffix == ".jsonl":
        with source.open("rb") as f:
            return sum(1 for line in f if line.strip())
    raise ImportError_(f"{source}: unknown format (use .npy or .jsonl)")


def read_batches(
    source: Path,
    *,
    start: int,
    batch_size: int,
    subjects: Path | None,
    ids: Path | None,
    id_prefix: str,
) -> Iterator[Batch]:
    """Batches of request items from row ``start`` on."""
    if source.suffix == ".npy":
        yield from _npy_batches(source, start, batch_size, subjects, ids, id_prefix)
    elif source.suffix == ".jsonl":
        yield from _jsonl_batches(source, start, batch_size, id_prefix)
    else:
        raise ImportError_(f"{source}: unknown format (use .npy or .jsonl)")


def _npy_batches(
    source: Path,
    start: int,
    batch_size: int,
    subjects: Path | None,
    ids: Path | None,
    id_prefix: str,
) -> Iterator[Batch]:
    matrix = np.load(source, mmap_mode="r")
    if matrix.ndim != 2:
        raise ImportError_(f"{source}: expected a 2-D matrix (rows x dim), got {matrix.shape}")
    n = matrix.shape[0]
    if subjects is None:
        raise ImportError_("a .npy source needs --subjects FILE (one subject per row)")
    subject_of = _lines(subjects)
    item_id_of = _lines(ids) if ids is not None else None
    for name, values in (("--subjects", subject_of), ("--ids", item_id_of)):
        if values is not None and len(values) != n:
            raise ImportError_(f"{name} has {len(values)} lines, {source} has {n} rows")
    for lo in range(start, n, batch_size):
        hi = min(n, lo + batch_size)
        block = np.asarray(matrix[lo:hi], dtype="<f4")
        items = [
            {
                "subject": subject_of[r],
                "item_id": item_id_of[r] if item_id_of else f"{id_prefix}{r}",
                "embedding_b64": b64_vector(block[r - lo]),
            }
            for r in range(lo, hi)
        ]
        yield Batch(lo, items)


def _jsonl_batches(source: Path, start: int, batch_size: int, id_prefix: str) -> Iterator[Batch]:
    items: list[dict[str, Any]] = []
    first = start
    row = -1
    with source.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row += 1
            if row < start:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ImportError_(
                    f"{source}: row {row} (line {row + 1}) is not JSON: {exc}"
                ) from exc
            if not isinstance(obj, dict):
                raise ImportError_(f"{source}: row {row} is not a JSON object")
            obj.setdefault("item_id", f"{id_prefix}{row}")
            items.append(obj)
            if len(items) == batch_size:
                yield Batch(first, items)
                items, first = [], row + 1
    if items:
        yield Batch(first, items)


# --- progress -----------------------------------------------------------------------------------
@dataclass
class State:
    path: Path
    source: str
    size: int
    mtime_ns: int
    done: int

    @classmethod
    def load_or_new(cls, path: Path, source: Path, *, restart: bool) -> State:
        st = source.stat()
        fresh = cls(path, str(source.resolve()), st.st_size, st.st_mtime_ns, 0)
        if restart or not path.exists():
            return fresh
        saved = json.loads(path.read_text())
        if (saved["source"], saved["size"], saved["mtime_ns"]) != (
            fresh.source,
            fresh.size,
            fresh.mtime_ns,
        ):
            raise ImportError_(
                f"{path} records an import of another (or a changed) file; "
                "pass --restart to import this one from the start"
            )
        fresh.done = int(saved["done"])
        return fresh

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "source": self.source,
                    "size": self.size,
                    "mtime_ns": self.mtime_ns,
                    "done": self.done,
                }
            )
        )
        os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new state


# --- sending ------------------------------------------------------------------------------------
RETRY_STATUS = {429, 502, 503, 504}


def send_batch(client: httpx.Client, batch: Batch, *, retries: int) -> str:
    """Sends one batch until it is stored; returns "stored" or "already" (a resent batch)."""
    body = json.dumps({"items": batch.items}, separators=(",", ":"))
    delay = 0.2
    for attempt in range(retries + 1):
        try:
            r = client.post(
                "/v1/gallery", content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.TransportError as exc:
            if attempt == retries:
                raise ImportError_(f"cannot reach the service: {exc}") from exc
        else:
            if r.status_code == 201:
                return "stored"
            err = _error(r)
            if r.status_code == 409 and err.get("code") == "duplicate_item_id":
                dupes = set((err.get("detail") or {}).get("item_ids", []))
                if dupes == set(batch.item_ids):
                    return "already"  # written by an interrupted run before its state was
                raise ImportError_(
                    f"rows {batch.start}..{batch.start + len(batch.items) - 1}: "
                    f"{len(dupes)} item ids exist already and were not written by this import "
                    f"(e.g. {sorted(dupes)[:3]}); use other ids (--id-prefix) or delete them"
                )
            if r.status_code == 422:
                raise ImportError_(_name_row(batch, err))
            if r.status_code not in RETRY_STATUS or attempt == retries:
                raise ImportError_(
                    f"{r.status_code} {err.get('code', '')}: {err.get('message', r.text[:300])}"
                )
            if ra := r.headers.get("Retry-After"):
                delay = max(delay, min(30.0, float(ra)))
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def _error(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _name_row(batch: Batch, err: dict[str, Any]) -> str:
    """A 422 about ``items[i]...`` (or a validation error at ``["body", "items", i, ...]``) ->
    the same message naming the source row and item id."""
    message = str(err.get("message", ""))
    detail = json.dumps(err.get("detail"))
    m = re.search(r"items\[(\d+)\]", message + detail) or re.search(r'"items", (\d+)', detail)
    where = ""
    if m is not None and int(m.group(1)) < len(batch.items):
        i = int(m.group(1))
        where = f"row {batch.start + i} (item id {batch.items[i]['item_id']!r}): "
    return f"{where}422 {err.get('code', '')}: {message} {detail[:500]}"


def run_import(
    *,
    source: Path,
    url: str,
    api_key: str,
    subjects: Path | None,
    ids: Path | None,
    id_prefix: str | None,
    batch_size: int,
    concurrency: int,
    state_path: Path | None,
    restart: bool,
    retries: int,
    progress: Any | None = None,
) -> dict[str, int]:
    """Imports ``source``; returns counts. ``progress``: a callable(advance: int) or None."""
    if not source.exists():
        raise ImportError_(f"{source} does not exist")
    total = count_rows(source)
    state = State.load_or_new(
        state_path or source.with_name(source.name + ".import.json"), source, restart=restart
    )
    prefix = id_prefix if id_prefix is not None else f"{source.stem}-"
    counts = {"total": total, "skipped": state.done, "stored": 0, "already": 0}
    if progress is not None:
        progress(state.done)
    headers = {"Authorization": f"Bearer {api_key}"}
    with (
        httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300.0) as client,
        ThreadPoolExecutor(max(1, concurrency)) as pool,
    ):
        in_flight: deque[tuple[Batch, Future[str]]] = deque()

        def settle_oldest() -> None:
            batch, fut = in_flight.popleft()
            counts[fut.result()] += len(batch.items)
            state.done = batch.start + len(batch.items)
            state.save()
            if progress is not None:
                progress(len(batch.items))

        try:
            for batch in read_batches(
                source,
                start=state.done,
                batch_size=batch_size,
                subjects=subjects,
                ids=ids,
                id_prefix=prefix,
            ):
                in_flight.append((batch, pool.submit(send_batch, client, batch, retries=retries)))
                if len(in_flight) >= concurrency:
                    settle_oldest()
            while in_flight:
                settle_oldest()
        finally:
            for _, fut in in_flight:
                fut.cancel()
    return counts
