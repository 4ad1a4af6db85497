"""``tcm-serve import``: stream millions of embeddings into a running service, resumably.

Sources (by file suffix):

- ``.npy``: a float (n, d) matrix, memory-mapped (never loaded whole); subjects come from a text
  file with one line per row (``--subjects``), item ids from ``--ids`` (same layout) or are
  ``<prefix><row>``.
- ``.jsonl``: one JSON object per line with ``subject`` and ``embedding`` (a list) or
  ``embedding_b64``, optionally ``item_id`` (default ``<prefix><line number - 1>``) and
  ``metadata``.

- ``.parquet`` (needs pyarrow: the ``parquet`` extra): columns ``subject`` (strings),
  ``embedding`` (a list or fixed-size list of float32/float64) or ``embedding_b64`` (strings),
  optionally ``item_id`` (strings; a missing or null one is ``<prefix><row>``) and ``metadata``
  (JSON objects as strings, or a struct/map column: a struct's null fields are left out).
  Streamed in record batches of the needed columns; the row count is the footer's; a resumed
  import starts at the row group holding its first row. Rows are checked before sending (null
  subject, embedding length, NaN/inf, metadata that is not plain JSON) and an error names the
  row.

Each format has one reader (``open_source``, by suffix) with ``count()`` and ``batches()``.

Each batch is one ``POST /v1/gallery`` (base64 float32 embeddings: no float parsing on either
side), which the service writes all or nothing. Progress is a small JSON state file beside the
source (``<source>.import.json``) holding the number of rows acknowledged, rewritten atomically
after each batch, so an interrupted import resumes after the last acknowledged batch. A batch
that was written but not yet recorded (the process died between the service's answer and the
state write) is sent again and answered 409 for exactly its own item ids: that counts as done,
so a resumed import never duplicates an item. Item ids must therefore be deterministic (they
are: from the file, or derived from the row number).

Batches are sent with ``tcm_client`` (``Client.enrol_raw``) under its one retry policy
(:class:`tcm_client.RetryPolicy`, ``--retries`` times per batch). A batch names every item id and
a resent one is recognised by that 409, so it is a request the service deduplicates: it is sent
as safe to repeat, and 429, 502/503/504 and transport errors are retried after ``Retry-After`` or
an exponential backoff, whichever is longer. A 422 names the source row. Several batches are in
flight at once (``--concurrency``); the state only advances over the contiguous prefix of
acknowledged batches.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from tcm_client import ApiError, Client


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


def _batched(items: Iterator[dict[str, Any]], start: int, batch_size: int) -> Iterator[Batch]:
    """Consecutive rows' items (the first is row ``start``) -> batches of ``batch_size``."""
    while chunk := list(islice(items, batch_size)):
        yield Batch(start, chunk)
        start += len(chunk)


# --- sources: one reader per format, chosen once by suffix -------------------------------------
class Source(Protocol):
    def count(self) -> int:
        """The number of rows, without reading them where the format allows."""
        ...

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        """Batches of request items from row ``start`` on."""
        ...


class NpySource:
    def __init__(self, source: Path, subjects: Path | None, ids: Path | None, id_prefix: str):
        self.source, self.subjects, self.ids, self.id_prefix = source, subjects, ids, id_prefix

    def count(self) -> int:
        return int(np.load(self.source, mmap_mode="r").shape[0])

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        matrix = np.load(self.source, mmap_mode="r")
        if matrix.ndim != 2:
            raise ImportError_(
                f"{self.source}: expected a 2-D matrix (rows x dim), got {matrix.shape}"
            )
        n = matrix.shape[0]
        if self.subjects is None:
            raise ImportError_("a .npy source needs --subjects FILE (one subject per row)")
        subject_of = _lines(self.subjects)
        item_id_of = _lines(self.ids) if self.ids is not None else None
        for name, values in (("--subjects", subject_of), ("--ids", item_id_of)):
            if values is not None and len(values) != n:
                raise ImportError_(f"{name} has {len(values)} lines, {self.source} has {n} rows")
        for lo in range(start, n, batch_size):
            hi = min(n, lo + batch_size)
            block = np.asarray(matrix[lo:hi], dtype="<f4")
            items = [
                {
                    "subject": subject_of[r],
                    "item_id": item_id_of[r] if item_id_of else f"{self.id_prefix}{r}",
                    "embedding_b64": b64_vector(block[r - lo]),
                }
                for r in range(lo, hi)
            ]
            yield Batch(lo, items)


class JsonlSource:
    def __init__(self, source: Path, id_prefix: str):
        self.source, self.id_prefix = source, id_prefix

    def count(self) -> int:
        with self.source.open("rb") as f:
            return sum(1 for line in f if line.strip())

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        return _batched(self._items(start), start, batch_size)

    def _items(self, start: int) -> Iterator[dict[str, Any]]:
        row = -1
        with self.source.open(encoding="utf-8") as f:
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
                        f"{self.source}: row {row} (line {row + 1}) is not JSON: {exc}"
                    ) from exc
                if not isinstance(obj, dict):
                    raise ImportError_(f"{self.source}: row {row} is not a JSON object")
                obj.setdefault("item_id", f"{self.id_prefix}{row}")
                yield obj


# --- Parquet (pyarrow: the optional ``parquet`` extra) -----------------------------------------
PARQUET_EXTRA = "pip install 'threshold-consistent-retrieval[parquet]'"


def _pyarrow() -> Any:
    """pyarrow with its ``parquet`` and ``compute`` modules loaded, or a one-line ImportError_."""
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError_(f"reading .parquet needs pyarrow: {PARQUET_EXTRA}") from exc
    return pyarrow


def _is_text(pa: Any, t: Any) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(pa, t.value_type)
    names = ("is_string", "is_large_string", "is_string_view")  # string_view: pyarrow >= 16
    return any(getattr(pa.types, name, lambda _: False)(t) for name in names)


def _is_list(pa: Any, t: Any) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_plain_json(pa: Any, t: Any) -> bool:
    """Whether values of Arrow type ``t`` are JSON once converted to Python (no timestamps,
    decimals, bytes: the service stores metadata as JSON)."""
    ty = pa.types
    if ty.is_dictionary(t):
        return _is_plain_json(pa, t.value_type)
    if _is_list(pa, t):
        return _is_plain_json(pa, t.value_type)
    if ty.is_struct(t):
        return all(_is_plain_json(pa, t.field(i).type) for i in range(t.num_fields))
    if ty.is_map(t):
        return _is_text(pa, t.key_type) and _is_plain_json(pa, t.item_type)
    scalar = (ty.is_boolean, ty.is_integer, ty.is_float32, ty.is_float64, ty.is_null)
    return _is_text(pa, t) or any(check(t) for check in scalar)


@dataclass(frozen=True)
class ParquetLayout:
    """A Parquet source's columns, checked once against its schema."""

    embedding: str  # "embedding" (a list of floats) or "embedding_b64" (base64 text)
    fixed_dim: int | None  # the embedding column's size when it is a fixed_size_list
    item_id: bool
    metadata: str | None  # None, "json" (text holding JSON objects) or "nested" (struct / map)

    @property
    def columns(self) -> list[str]:
        optional = [("item_id", self.item_id), ("metadata", self.metadata is not None)]
        return ["subject", self.embedding] + [name for name, has in optional if has]

    @classmethod
    def of(cls, pa: Any, schema: Any, source: Path) -> ParquetLayout:
        names = set(schema.names)
        if "subject" not in names:
            raise ImportError_(f"{source}: no 'subject' column (its columns: {sorted(names)})")
        given = [name for name in ("embedding", "embedding_b64") if name in names]
        if len(given) != 1:
            raise ImportError_(
                f"{source}: has {'both' if given else 'neither'} of the columns 'embedding' "
                "(a list of floats) and 'embedding_b64' (base64 text); it needs exactly one"
            )
        wanted = {
            "subject": ("strings", lambda t: _is_text(pa, t)),
            "embedding": ("a list of float32 or float64", lambda t: _is_float_list(pa, t)),
            "embedding_b64": ("base64 strings", lambda t: _is_text(pa, t)),
            "item_id": ("strings", lambda t: _is_text(pa, t)),
            "metadata": (
                "JSON objects as strings, or a struct/map of strings, numbers, booleans, "
                "lists and structs",
                lambda t: _is_text(pa, t) or (_is_nested(pa, t) and _is_plain_json(pa, t)),
            ),
        }
        for name, (want, fits) in wanted.items():
            if name in names and not fits(schema.field(name).type):
                raise ImportError_(
                    f"{source}: column {name!r} is {schema.field(name).type}, expected {want}"
                )
        emb_type = schema.field(given[0]).type
        metadata = None
        if "metadata" in names:
            metadata = "json" if _is_text(pa, schema.field("metadata").type) else "nested"
        return cls(
            embedding=given[0],
            fixed_dim=emb_type.list_size if pa.types.is_fixed_size_list(emb_type) else None,
            item_id="item_id" in names,
            metadata=metadata,
        )


def _is_float_list(pa: Any, t: Any) -> bool:
    return _is_list(pa, t) and (
        pa.types.is_float32(t.value_type) or pa.types.is_float64(t.value_type)
    )


def _is_nested(pa: Any, t: Any) -> bool:
    return pa.types.is_struct(t) or pa.types.is_map(t)


def _row_groups_from(metadata: Any, start: int) -> tuple[list[int], int]:
    """The row groups from the one holding row ``start`` on, and how many of its first rows
    come before ``start`` (from the file's footer: nothing is read)."""
    first = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if start < first + rows:
            return list(range(group, metadata.num_row_groups)), start - first
        first += rows
    return [], 0


class ParquetSource:
    """Columns ``subject``, ``embedding`` (list of floats) or ``embedding_b64``, optional
    ``item_id`` and ``metadata``; streamed record batch by record batch."""

    def __init__(self, source: Path, id_prefix: str):
        self.pa = _pyarrow()
        self.source, self.id_prefix = source, id_prefix

    def _open(self) -> Any:
        try:
            return self.pa.parquet.ParquetFile(self.source)
        except (OSError, self.pa.ArrowException) as exc:
            raise ImportError_(f"{self.source}: not a readable Parquet file: {exc}") from exc

    def count(self) -> int:
        with self._open() as pf:
            return int(pf.metadata.num_rows)  # the footer's count: no scan

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        with self._open() as pf:
            layout = ParquetLayout.of(self.pa, pf.schema_arrow, self.source)
            rows = ParquetRows(self, layout, self._dim(pf, layout))
            items = (
                item
                for row, record_batch in self._record_batches(pf, layout, start, batch_size)
                for item in rows.items(record_batch, row)
            )
            yield from _batched(items, start, batch_size)

    def _dim(self, pf: Any, layout: ParquetLayout) -> tuple[int, str] | None:
        """The length every embedding must have, and where it comes from."""
        if layout.fixed_dim is not None:
            return layout.fixed_dim, "the column's fixed size"
        if layout.embedding != "embedding" or pf.metadata.num_rows == 0:
            return None
        first = next(pf.iter_batches(batch_size=1, columns=["embedding"])).column(0)
        if first.null_count:
            raise ImportError_(f"{self.source}: row 0: embedding is null")
        return len(first[0]), "the length of row 0"

    def _record_batches(
        self, pf: Any, layout: ParquetLayout, start: int, batch_size: int
    ) -> Iterator[tuple[int, Any]]:
        """(row of its first row, record batch) from row ``start`` on: whole row groups before
        ``start`` are never read; the rows of its own group before it are dropped as Arrow
        slices, never converted."""
        groups, skip = _row_groups_from(pf.metadata, start)
        if not groups:
            return
        row = start
        for record_batch in pf.iter_batches(
            batch_size=batch_size, row_groups=groups, columns=layout.columns
        ):
            if skip >= record_batch.num_rows:
                skip -= record_batch.num_rows
                continue
            record_batch, skip = record_batch.slice(skip), 0
            yield row, record_batch
            row += record_batch.num_rows


class ParquetRows:
    """Record batches -> request items, checking each row (errors name the source row)."""

    def __init__(self, src: ParquetSource, layout: ParquetLayout, dim: tuple[int, str] | None):
        self.pa, self.source, self.id_prefix = src.pa, src.source, src.id_prefix
        self.layout, self.dim = layout, dim

    def at(self, row: int, message: str) -> ImportError_:
        return ImportError_(f"{self.source}: row {row}: {message}")

    def items(self, record_batch: Any, row0: int) -> list[dict[str, Any]]:
        n, layout = record_batch.num_rows, self.layout
        subjects = self._texts(record_batch.column("subject"), "subject", row0)
        if layout.embedding == "embedding":
            vectors = self._vectors(record_batch.column("embedding"), row0)
        else:
            vectors = self._texts(record_batch.column("embedding_b64"), "embedding_b64", row0)
        ids = record_batch.column("item_id").to_pylist() if layout.item_id else [None] * n
        metadata = (
            self._metadata(record_batch.column("metadata"), row0) if layout.metadata else [None] * n
        )
        items = []
        for i in range(n):
            item = {
                "subject": subjects[i],
                "item_id": ids[i] if ids[i] is not None else f"{self.id_prefix}{row0 + i}",
                "embedding_b64": vectors[i],
            }
            if metadata[i]:
                item["metadata"] = metadata[i]
            items.append(item)
        return items

    def _first_null(self, column: Any) -> int | None:
        if not column.null_count:
            return None
        return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])

    def _texts(self, column: Any, name: str, row0: int) -> list[str]:
        if (i := self._first_null(column)) is not None:
            raise self.at(row0 + i, f"{name} is null")
        return column.to_pylist()

    def _vectors(self, column: Any, row0: int) -> list[str]:
        """A list<float> column -> base64 float32, each row checked (length, nulls, finite)."""
        if (i := self._first_null(column)) is not None:
            raise self.at(row0 + i, "embedding is null")
        if len(column) == 0 or self.dim is None:
            return []
        dim, dim_from = self.dim
        lengths = self.pa.compute.list_value_length(column).to_numpy(zero_copy_only=False)
        if (wrong := np.flatnonzero(lengths != dim)).size:
            i = int(wrong[0])
            raise self.at(
                row0 + i, f"embedding has {lengths[i]} values, expected {dim} ({dim_from})"
            )
        values = column.flatten()
        if (j := self._first_null(values)) is not None:
            raise self.at(row0 + j // dim, "embedding holds a null value")
        with np.errstate(over="ignore"):  # float64 beyond float32's range -> inf, refused below
            matrix = values.to_numpy(zero_copy_only=False).astype("<f4").reshape(-1, dim)
        if (bad := np.flatnonzero(~np.isfinite(matrix).all(axis=1))).size:
            raise self.at(
                row0 + int(bad[0]), "embedding holds NaN or infinity (or beyond float32's range)"
            )
        return [b64_vector(v) for v in matrix]

    def _metadata(self, column: Any, row0: int) -> list[dict[str, Any] | None]:
        if self.layout.metadata == "json":
            values = [
                self._json_object(text, row0 + i) for i, text in enumerate(column.to_pylist())
            ]
        else:
            try:
                values = column.to_pylist(maps_as_pydicts="strict")
            except (KeyError, ValueError, self.pa.ArrowException) as exc:
                raise ImportError_(f"{self.source}: column 'metadata': {exc}") from exc
            if self.pa.types.is_struct(column.type):  # a struct's null fields: keys not given
                values = [v and {k: x for k, x in v.items() if x is not None} for v in values]
        for i, value in enumerate(values):
            try:
                json.dumps(value, allow_nan=False)
            except ValueError as exc:
                raise self.at(row0 + i, f"metadata is not plain JSON: {exc}") from exc
        return values

    def _json_object(self, text: str | None, row: int) -> dict[str, Any] | None:
        if text is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self.at(row, f"metadata is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise self.at(row, f"metadata is not a JSON object: {text[:80]!r}")
        return value


def open_source(
    source: Path, *, subjects: Path | None = None, ids: Path | None = None, id_prefix: str = ""
) -> Source:
    """The reader for ``source``'s format (by suffix): the one place formats are told apart."""
    suffix = source.suffix.lower()
    if suffix == ".npy":
        return NpySource(source, subjects, ids, id_prefix)
    readers: dict[str, Callable[[Path, str], Source]] = {
        ".jsonl": JsonlSource,
        ".parquet": ParquetSource,
    }
    if suffix not in readers:
        raise ImportError_(f"{source}: unknown format (use .npy, .jsonl or .parquet)")
    if subjects is not None or ids is not None:
        raise ImportError_(
            f"--subjects and --ids are for a .npy source; {source} has its own "
            "subject and item_id fields"
        )
    return readers[suffix](source, id_prefix)


def count_rows(source: Path) -> int:
    return open_source(source).count()


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
def send_batch(client: Client, batch: Batch) -> str:
    """Sends one batch until it is stored (retried as ``client.policy`` says); returns "stored"
    or "already" (a resent batch)."""
    try:
        # safe to repeat: every item names its id, and a repeat's 409 naming exactly them is
        # taken as "already" below, so a retry never writes anything twice
        client.enrol_raw(batch.items, idempotent=True)
    except httpx.TransportError as exc:
        raise ImportError_(f"cannot reach the service: {exc}") from exc
    except ApiError as exc:
        r = exc.response
        assert r is not None
        err = _error(r)
        if r.status_code == 409 and err.get("code") == "duplicate_item_id":
            dupes = set((err.get("detail") or {}).get("item_ids", []))
            if dupes == set(batch.item_ids):
                return "already"  # written by an interrupted run before its state was
            raise ImportError_(
                f"rows {batch.start}..{batch.start + len(batch.items) - 1}: "
                f"{len(dupes)} item ids exist already and were not written by this import "
                f"(e.g. {sorted(dupes)[:3]}); use other ids (--id-prefix) or delete them"
            ) from exc
        if r.status_code == 422:
            raise ImportError_(_name_row(batch, err)) from exc
        raise ImportError_(
            f"{r.status_code} {err.get('code', '')}: {err.get('message', r.text[:300])}"
        ) from exc
    return "stored"


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
    prefix = id_prefix if id_prefix is not None else f"{source.stem}-"
    reader = open_source(source, subjects=subjects, ids=ids, id_prefix=prefix)
    total = reader.count()
    state = State.load_or_new(
        state_path or source.with_name(source.name + ".import.json"), source, restart=restart
    )
    counts = {"total": total, "skipped": state.done, "stored": 0, "already": 0}
    if progress is not None:
        progress(state.done)
    with (
        Client(url, api_key, retries=retries, timeout_s=300.0) as client,
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
            for batch in reader.batches(state.done, batch_size):
                in_flight.append((batch, pool.submit(send_batch, client, batch)))
                if len(in_flight) >= concurrency:
                    settle_oldest()
            while in_flight:
                settle_oldest()
        finally:
            for _, fut in in_flight:
                fut.cancel()
    return counts
