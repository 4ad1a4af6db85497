"""``tcm-serve import``: stream millions of embeddings into a running service, resumably.

Sources (by file suffix):

- ``.npy``: a numeric (n, d) matrix, memory-mapped (never loaded whole); subjects come from a
  text file with one line per row (``--subjects``), item ids from ``--ids`` (same layout) or are
  derived (below). The header is checked before anything is read: a matrix of Python objects,
  another rank than 2, a non-numeric dtype or a file shorter than its header says (truncated)
  is a one-line error; a row holding NaN or infinity is refused naming the row.
- ``.jsonl``: one JSON object per line with ``subject`` and ``embedding`` (a list) or
  ``embedding_b64``, optionally ``item_id`` (a missing or null one is derived) and
  ``metadata``. Blank lines are skipped (rows count the others); a line that is not UTF-8 (the
  error names its row, line and byte offset in the file), not JSON, holds NaN/Infinity or is
  not an object stops the import naming the row and line.
- ``.parquet`` (needs pyarrow: the ``parquet`` extra): columns ``subject`` (strings),
  ``embedding`` (a list or fixed-size list of float32/float64) or ``embedding_b64`` (strings),
  optionally ``item_id`` (strings; a missing or null one is derived) and ``metadata``
  (JSON objects as strings, or a struct/map column: a struct's null fields are left out).
  Streamed in record batches of the needed columns; the row count is the footer's; a resumed
  import starts at the row group holding its first row. Rows are checked before sending (null
  subject, embedding length, NaN/inf, metadata that is not plain JSON) and an error names the
  row.

Each format has one reader (``open_source``, by suffix) with ``count()`` and ``batches()``.

**Derived item ids** are ``<prefix><row>`` (``row``: the 0-based row of the source). The
default prefix is ``<stem>-<h>-``, ``h`` the first 8 hex digits of the sha256 of the source's
bytes (:func:`derived_id_prefix`), so two different files with the same name never derive the
same ids, and every run over the same content derives the same ones. ``--id-prefix`` replaces
the whole prefix (then the caller keeps it unique).

Each batch is one ``POST /v1/gallery`` (base64 float32 embeddings: no float parsing on either
side), which the service writes all or nothing.

**Progress** is a small JSON state file beside the source (``<source>.import.json``), rewritten
atomically: ``done``, the rows acknowledged (a contiguous prefix), ``pending``, the row ranges
of the batches sent but not acknowledged (recorded before a batch is sent, removed once its
answer is settled), and ``inputs``, the fingerprint of what the import writes: the sha256 and
size of the source's bytes (streamed), of ``--subjects`` and ``--ids``, the item id prefix and
the target (the URL and a digest of the API key, never the key). A run whose inputs differ from
the state's does not resume it: it stops naming what differs (use the same file and options to
resume, or ``--restart`` / remove the state file to import from the start).

**409s.** A run that resumes a state first sends its ``pending`` batches again, exactly as they
were (same rows, same ids): one the interrupted run stored (the process died between the
service's answer and the state write) is answered 409 ``duplicate_item_id`` naming exactly its
ids and counts as "already stored", so a resumed import never duplicates an item. The same holds
for a batch retried within one run after an attempt whose answer was lost
(``ApiError.earlier_attempt_may_have_acted``). Any other 409 (a fresh run, ``--restart``, a
batch no earlier attempt sent, or one naming other ids) means the ids belong to something else:
the import stops, naming them, and nothing of that batch is written.

Batches are sent with ``tcm_client`` (``Client.enrol_raw``) under its one retry policy
(:class:`tcm_client.RetryPolicy`, ``--retries`` times per batch): every enrolment carries an
``Idempotency-Key`` and every item names its id, so it is sent as safe to repeat, and 429,
502/503/504 and transport errors are retried after ``Retry-After`` or an exponential backoff,
whichever is longer. A 422 names the source row. Several batches are in flight at once
(``--concurrency``); ``done`` only advances over the contiguous prefix of acknowledged batches.
When an import stops on an error, the batches still in flight are waited for: those the service
refused leave ``pending`` (nothing of them was written), those it stored or whose answer is
unknown stay, to be resent by the next run.

Every bad input is an :class:`ImportError_` with a one-line message naming the file (and the
row, line or byte where known); the CLI prints it without a traceback.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import hashlib
import json
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from itertools import islice, pairwise
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from tcm_client import ApiError, Client, TransportFailure


class ImportError_(Exception):
    """An import that cannot go on; the message says why and what to do. ``resumable``: the
    same command, run again, goes on (the service was unreachable or failing)."""

    resumable = False


class ServiceUnavailable(ImportError_):
    """The service could not be reached or kept failing (5xx, 429 after every retry): the
    outcome of the batch is unknown, and running the same command again resumes."""

    resumable = True


class Refused(ImportError_):
    """The service answered the batch with an error (4xx, or a 409 about ids that are not this
    import's): nothing of the batch was written."""


@dataclass(frozen=True)
class Batch:
    start: int  # row of the source where the batch begins
    items: list[dict[str, Any]]

    @property
    def item_ids(self) -> list[str]:
        return [it["item_id"] for it in self.items]

    @property
    def end(self) -> int:
        """The row after its last row."""
        return self.start + len(self.items)


Cut = Callable[[int], int]  # the size of the batch that begins at a row


def b64_vector(v: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode()


def _cut(batch_size: int, cut: Cut | None) -> Cut:
    return cut if cut is not None else (lambda _row: batch_size)


def _batched(items: Iterator[dict[str, Any]], start: int, cut: Cut) -> Iterator[Batch]:
    """Consecutive rows' items (the first is row ``start``) -> batches of ``cut(row)``."""
    while chunk := list(islice(items, cut(start))):
        yield Batch(start, chunk)
        start += len(chunk)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read_lines(path: Path, option: str) -> list[str]:
    """A ``--subjects`` / ``--ids`` file's lines, or a one-line error naming what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportError_(f"{option} {path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ImportError_(
            f"{option} {path}: line {line} is not UTF-8 (byte {exc.start} of the file: "
            f"{exc.reason})"
        ) from exc
    return text.splitlines()


# --- sources: one reader per format, chosen once by suffix -------------------------------------
class Source(Protocol):
    def count(self) -> int:
        """The number of rows, without reading them where the format allows."""
        ...

    def batches(self, start: int, batch_size: int, cut: Cut | None = None) -> Iterator[Batch]:
        """Batches of request items from row ``start`` on, of ``batch_size`` items (or
        ``cut(row)`` for the batch beginning at ``row``, when given)."""
        ...


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    data_offset: int


class NpySource:
    def __init__(self, source: Path, subjects: Path | None, ids: Path | None, id_prefix: str):
        self.source, self.subjects, self.ids, self.id_prefix = source, subjects, ids, id_prefix

    def header(self) -> NpyHeader:
        """The header, checked against the file: a (rows, dim) matrix of numbers, whole."""
        src = self.source
        try:
            with src.open("rb") as f:
                version = np.lib.format.read_magic(f)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0  # 3.0: the same, utf-8 names
                )
                shape, _fortran, dtype = read(f)
                offset = f.tell()
                size = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise ImportError_(f"{src}: cannot read it: {exc.strerror or exc}") from exc
        except (ValueError, SyntaxError, EOFError, TypeError) as exc:
            raise ImportError_(
                f"{src}: not a .npy file, or its header is damaged: {_one_line(exc)}"
            ) from exc
        if dtype.hasobject:
            raise ImportError_(
                f"{src}: holds Python objects (dtype {dtype}), not numbers: save a float "
                "matrix (np.save(path, np.asarray(x, dtype=np.float32)))"
            )
        if dtype.kind not in "fiu":
            raise ImportError_(f"{src}: dtype {dtype} is not a number type (use float32)")
        if len(shape) != 2:
            raise ImportError_(f"{src}: expected a 2-D matrix (rows x dim), got {shape}")
        if shape[1] == 0:
            raise ImportError_(f"{src}: its rows have no values (shape {shape})")
        row_bytes = shape[1] * dtype.itemsize
        need = shape[0] * row_bytes
        if size - offset < need:
            whole = max(size - offset, 0) // row_bytes
            raise ImportError_(
                f"{src}: truncated: its header says {shape[0]} rows x {shape[1]} {dtype} "
                f"({need} bytes of data), the file holds {max(size - offset, 0)} "
                f"({whole} whole rows)"
            )
        return NpyHeader(shape, dtype, offset)

    def count(self) -> int:
        return self.header().shape[0]

    def _matrix(self) -> np.ndarray:
        self.header()
        try:
            return np.load(self.source, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ImportError_(f"{self.source}: cannot map it: {_one_line(exc)}") from exc

    def batches(self, start: int, batch_size: int, cut: Cut | None = None) -> Iterator[Batch]:
        matrix = self._matrix()
        n = matrix.shape[0]
        if self.subjects is None:
            raise ImportError_("a .npy source needs --subjects FILE (one subject per row)")
        subject_of = _read_lines(self.subjects, "--subjects")
        item_id_of = _read_lines(self.ids, "--ids") if self.ids is not None else None
        for name, values in (("--subjects", subject_of), ("--ids", item_id_of)):
            if values is not None and len(values) != n:
                raise ImportError_(f"{name} has {len(values)} lines, {self.source} has {n} rows")
        size_at = _cut(batch_size, cut)
        lo = start
        while lo < n:
            hi = min(n, lo + size_at(lo))
            with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused
                block = np.asarray(matrix[lo:hi], dtype="<f4")
            if (bad := np.flatnonzero(~np.isfinite(block).all(axis=1))).size:
                raise ImportError_(
                    f"{self.source}: row {lo + int(bad[0])}: embedding holds NaN or infinity "
                    "(or beyond float32's range)"
                )
            items = [
                {
                    "subject": subject_of[r],
                    "item_id": item_id_of[r] if item_id_of else f"{self.id_prefix}{r}",
                    "embedding_b64": b64_vector(block[r - lo]),
                }
                for r in range(lo, hi)
            ]
            yield Batch(lo, items)
            lo = hi


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (embeddings and metadata must be finite numbers)")


class JsonlSource:
    def __init__(self, source: Path, id_prefix: str):
        self.source, self.id_prefix = source, id_prefix

    def _rows(self) -> Iterator[tuple[int, int, int, bytes]]:
        """(row, line number, byte offset in the file, bytes) of every non-blank line: the one
        numbering of rows (``count`` and the derived ids agree on it)."""
        row, offset = -1, 0
        try:
            with self.source.open("rb") as f:
                for line_no, raw in enumerate(f, 1):
                    at, offset = offset, offset + len(raw)
                    if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                        raw, at = raw[len(codecs.BOM_UTF8) :], at + len(codecs.BOM_UTF8)
                    if not raw.strip():
                        continue
                    row += 1
                    yield row, line_no, at, raw
        except OSError as exc:
            raise ImportError_(f"{self.source}: cannot read it: {exc.strerror or exc}") from exc

    def count(self) -> int:
        return sum(1 for _ in self._rows())

    def batches(self, start: int, batch_size: int, cut: Cut | None = None) -> Iterator[Batch]:
        return _batched(self._items(start), start, _cut(batch_size, cut))

    def _items(self, start: int) -> Iterator[dict[str, Any]]:
        for row, line_no, at, raw in self._rows():
            if row < start:
                continue
            where = f"{self.source}: row {row} (line {line_no})"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ImportError_(
                    f"{where} is not UTF-8: byte {at + exc.start} of the file ({exc.reason})"
                ) from exc
            try:
                obj = json.loads(text, parse_constant=_no_constant)
            except json.JSONDecodeError as exc:
                raise ImportError_(f"{where} is not JSON: {exc.msg} at column {exc.colno}") from exc
            except (ValueError, RecursionError) as exc:
                raise ImportError_(f"{where} is not JSON: {_one_line(exc)}") from exc
            if not isinstance(obj, dict):
                raise ImportError_(f"{where} is not a JSON object")
            if obj.get("item_id") is None:  # missing or null: derived, the same on every run
                obj["item_id"] = f"{self.id_prefix}{row}"
            elif not isinstance(obj["item_id"], str):
                raise ImportError_(f"{where}: item_id is not a string: {obj['item_id']!r:.80}")
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
            raise ImportError_(
                f"{self.source}: not a readable Parquet file: {_one_line(exc)}"
            ) from exc

    def count(self) -> int:
        with self._open() as pf:
            return int(pf.metadata.num_rows)  # the footer's count: no scan

    def batches(self, start: int, batch_size: int, cut: Cut | None = None) -> Iterator[Batch]:
        with self._open() as pf:
            layout = ParquetLayout.of(self.pa, pf.schema_arrow, self.source)
            rows = ParquetRows(self, layout, self._dim(pf, layout))
            items = (
                item
                for row, record_batch in self._record_batches(pf, layout, start, batch_size)
                for item in rows.items(record_batch, row)
            )
            yield from _batched(items, start, _cut(batch_size, cut))

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
        record_batches = pf.iter_batches(
            batch_size=batch_size, row_groups=groups, columns=layout.columns
        )
        while True:
            try:
                record_batch = next(record_batches, None)
            except (OSError, self.pa.ArrowException) as exc:  # a damaged page or row group
                raise ImportError_(
                    f"{self.source}: cannot read the rows from row {row} on: {_one_line(exc)}"
                ) from exc
            if record_batch is None:
                return
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


SUFFIXES = (".npy", ".jsonl", ".parquet")


def _check_source(source: Path, subjects: Path | None, ids: Path | None) -> str:
    """The source's format (its suffix) with the options it takes, or a one-line error."""
    suffix = source.suffix.lower()
    if suffix not in SUFFIXES:
        raise ImportError_(f"{source}: unknown format (use .npy, .jsonl or .parquet)")
    if suffix != ".npy" and (subjects is not None or ids is not None):
        raise ImportError_(
            f"--subjects and --ids are for a .npy source; {source} has its own "
            "subject and item_id fields"
        )
    return suffix


def open_source(
    source: Path, *, subjects: Path | None = None, ids: Path | None = None, id_prefix: str = ""
) -> Source:
    """The reader for ``source``'s format (by suffix): the one place formats are told apart."""
    suffix = _check_source(source, subjects, ids)
    if suffix == ".npy":
        return NpySource(source, subjects, ids, id_prefix)
    readers: dict[str, Callable[[Path, str], Source]] = {
        ".jsonl": JsonlSource,
        ".parquet": ParquetSource,
    }
    return readers[suffix](source, id_prefix)


def count_rows(source: Path) -> int:
    return open_source(source).count()


# --- what an import writes: its fingerprint ------------------------------------------------------
HASH_CHUNK = 1 << 20
STATE_VERSION = 2


def file_digest(path: Path, what: str) -> dict[str, Any]:
    """``{"sha256", "size"}`` of a file's bytes, read in 1 MiB chunks (never whole)."""
    digest, size = hashlib.sha256(), 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ImportError_(f"{what} {path}: cannot read it: {exc.strerror or exc}") from exc
    return {"sha256": digest.hexdigest(), "size": size}


def _derived_prefix(source: Path, sha256: str) -> str:
    return f"{source.stem}-{sha256[:8]}-"


def derived_id_prefix(source: Path) -> str:
    """The default prefix of ``source``'s derived item ids: ``<stem>-<first 8 hex digits of the
    sha256 of its bytes>-`` (the same for the same content, another one for another file)."""
    return _derived_prefix(source, file_digest(source, "source")["sha256"])


def import_inputs(
    source: Path,
    *,
    subjects: Path | None,
    ids: Path | None,
    id_prefix: str | None,
    url: str,
    api_key: str,
) -> dict[str, Any]:
    """The fingerprint of what an import writes, as the state file records it: the source's
    content, ``--subjects`` and ``--ids`` (content), the item id prefix in effect, and the
    target (URL; a digest of the API key, which names the tenant)."""
    src = file_digest(source, "source")
    return {
        "source": src,
        "subjects": file_digest(subjects, "--subjects") if subjects is not None else None,
        "ids": file_digest(ids, "--ids") if ids is not None else None,
        "id_prefix": id_prefix if id_prefix is not None else _derived_prefix(source, src["sha256"]),
        "target": {
            "url": url.rstrip("/"),
            "api_key_sha256": hashlib.sha256(api_key.encode()).hexdigest()[:16],
        },
    }


def _describe(name: str, saved: Any, now: Any) -> str:
    """What differs between a state's input ``name`` and this run's, in words."""

    def content(d: dict[str, Any] | None) -> str:
        return "none" if d is None else f"sha256 {d['sha256'][:12]}, {d['size']} bytes"

    if name == "source":
        return f"the source's content (was {content(saved)}, now {content(now)})"
    if name in ("subjects", "ids"):
        return f"--{name} (was {content(saved)}, now {content(now)})"
    if name == "id_prefix":
        return f"the item id prefix (was {saved!r}, now {now!r})"
    if name == "target":
        same_url = isinstance(saved, dict) and saved.get("url") == now["url"]
        return (
            "the API key (another tenant, or another key)"
            if same_url
            else (
                f"the service (was {saved.get('url') if isinstance(saved, dict) else saved!r}, "
                f"now {now['url']!r})"
            )
        )
    return name


# --- progress -----------------------------------------------------------------------------------
@dataclass
class State:
    """An import's progress (the module's docstring): ``done`` rows acknowledged, ``pending``
    row ranges sent and not acknowledged, and the ``inputs`` it belongs to."""

    path: Path
    source: str
    inputs: dict[str, Any]
    done: int = 0
    pending: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def load_or_new(
        cls, path: Path, source: Path, inputs: dict[str, Any], *, restart: bool
    ) -> State:
        fresh = cls(path, str(source.resolve()), inputs)
        if restart or not path.exists():
            return fresh
        other = (
            f"pass --restart to import {source} from the start (or remove {path}); "
            "to resume that import, run it with its own file and options"
        )
        try:
            saved = json.loads(path.read_bytes())
            if not isinstance(saved, dict):
                raise TypeError("not a JSON object")
            if "inputs" not in saved:
                raise ImportError_(
                    f"{path} was written by an older tcm-serve import that did not record the "
                    "source's content and options (its derived item ids were <stem>-<row>), so "
                    f"it cannot be resumed; {other}"
                )
            if not isinstance(saved["inputs"], dict):
                raise TypeError("'inputs' is not a JSON object")
            done = int(saved["done"])
            pending = sorted((int(s), int(e)) for s, e in saved.get("pending", []))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ImportError_(
                f"{path} is not a readable import state ({_one_line(exc)}); remove it or pass "
                "--restart"
            ) from exc
        differ = [
            _describe(name, saved["inputs"].get(name), value)
            for name, value in inputs.items()
            if saved["inputs"].get(name) != value
        ]
        if differ:
            stored = ""
            if done and saved["inputs"].get("id_prefix") != inputs["id_prefix"]:
                stored = (
                    f"; the {done} rows it stored keep their ids "
                    f"{saved['inputs'].get('id_prefix')}<row>: delete them first if {source} "
                    "replaces them"
                )
            raise ImportError_(
                f"{path} records an import of another (or a changed) file or with other "
                f"options, so it is not resumed: {'; '.join(differ)}; {other}{stored}"
            )
        ranges = [(0, done), *pending]
        if done < 0 or any(s >= e or s < prev for (_, prev), (s, e) in pairwise(ranges)):
            raise ImportError_(
                f"{path} is not a consistent import state (done {done}, pending {pending}); "
                "remove it or pass --restart"
            )
        return cls(path, fresh.source, inputs, done, pending)

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {
            "version": STATE_VERSION,
            "source": self.source,
            "inputs": self.inputs,
            "done": self.done,
            "pending": [list(r) for r in sorted(self.pending)],
        }
        try:
            tmp.write_text(json.dumps(body))
            os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new state
        except OSError as exc:
            raise ImportError_(
                f"cannot write the import state {self.path}: {exc.strerror or exc}"
            ) from exc

    def cut(self, batch_size: int) -> Cut:
        """Batch sizes from ``done`` on: each pending range again as one batch (the same rows
        as when it was first sent, so its 409 names exactly its ids), ``batch_size`` rows
        elsewhere (never across a pending range)."""
        pending = sorted(self.pending)

        def size_at(row: int) -> int:
            for s, e in pending:
                if row == s:
                    return e - s
                if row < s:
                    return min(batch_size, s - row)
            return batch_size

        return size_at


# --- sending ------------------------------------------------------------------------------------
def send_batch(client: Client, batch: Batch, resent: bool = False) -> str:
    """Sends one batch until it is stored (retried as ``client.policy`` says); returns "stored"
    or "already". ``resent``: an earlier run sent this very batch and its outcome is unknown
    (the state's ``pending``). A 409 ``duplicate_item_id`` naming exactly the batch's ids is
    "already" only then, or when an earlier attempt of this call may have stored it (its
    answer lost); any other 409 is a :class:`Refused` naming the ids."""
    ids = batch.item_ids
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise Refused(
            f"rows {batch.start}..{batch.end - 1} repeat item ids ({repeated[:3]}): item ids "
            "must be unique in the source"
        )
    try:
        # safe to repeat: it carries an Idempotency-Key and names every item id, and a repeat's
        # 409 naming exactly them is taken as "already" below, so a retry never writes twice
        client.enrol_raw(batch.items, idempotent=True)
    except TransportFailure as exc:
        raise ServiceUnavailable(f"cannot reach the service: {_one_line(exc.__cause__)}") from exc
    except ApiError as exc:
        r = exc.response
        assert r is not None
        err = _error(r)
        rows = f"rows {batch.start}..{batch.end - 1}"
        if r.status_code == 409 and err.get("code") == "duplicate_item_id":
            dupes = set((err.get("detail") or {}).get("item_ids", []))
            ours = resent or exc.earlier_attempt_may_have_acted
            if dupes == set(ids) and ours:
                return "already"  # written by an interrupted run (or attempt) before its state
            why = (
                "; this batch was never sent before, so they are not this import's"
                if not ours
                else ""
            )
            raise Refused(
                f"{rows}: {len(dupes)} item ids exist already and were not written by this "
                f"import (e.g. {sorted(dupes)[:3]}){why}; nothing of these rows was written: "
                "use other ids (--id-prefix, --ids or the file's item_id) or delete them"
            ) from exc
        if r.status_code == 422:
            raise Refused(_name_row(batch, err)) from exc
        message = (
            f"{r.status_code} {err.get('code', '')}: {_one_line(err.get('message', r.text[:300]))}"
        )
        if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
            raise Refused(message) from exc
        raise ServiceUnavailable(message) from exc
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
    return _one_line(f"{where}422 {err.get('code', '')}: {message} {detail[:500]}")


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
    if not source.is_file():
        raise ImportError_(f"{source} is not a file")
    suffix = _check_source(source, subjects, ids)
    if suffix == ".npy" and subjects is None:
        raise ImportError_("a .npy source needs --subjects FILE (one subject per row)")
    total = open_source(source, subjects=subjects, ids=ids).count()  # checks the file first
    inputs = import_inputs(
        source, subjects=subjects, ids=ids, id_prefix=id_prefix, url=url, api_key=api_key
    )
    reader = open_source(source, subjects=subjects, ids=ids, id_prefix=inputs["id_prefix"])
    state = State.load_or_new(
        state_path or source.with_name(source.name + ".import.json"),
        source,
        inputs,
        restart=restart,
    )
    resend = set(state.pending)  # sent by an interrupted run, outcome unknown
    state.save()  # before anything is sent
    counts = {"total": total, "skipped": state.done, "stored": 0, "already": 0}
    if progress is not None:
        progress(state.done)
    with (
        Client(url, api_key, retries=retries, timeout_s=300.0) as client,
        ThreadPoolExecutor(max(1, concurrency)) as pool,
    ):
        in_flight: deque[tuple[Batch, Future[str]]] = deque()

        def settle_oldest() -> None:
            batch, fut = in_flight[0]
            counts[fut.result()] += len(batch.items)
            in_flight.popleft()
            state.pending.remove((batch.start, batch.end))
            state.done = batch.end
            state.save()
            if progress is not None:
                progress(len(batch.items))

        try:
            for batch in reader.batches(state.done, batch_size, state.cut(batch_size)):
                span = (batch.start, batch.end)
                if span not in state.pending:
                    state.pending.append(span)
                    state.save()  # recorded before it is sent
                in_flight.append((batch, pool.submit(send_batch, client, batch, span in resend)))
                if len(in_flight) >= concurrency:
                    settle_oldest()
            while in_flight:
                settle_oldest()
        except BaseException:
            _stop(state, in_flight, resend)
            raise
    return counts


def _stop(state: State, in_flight: deque[tuple[Batch, Future[str]]], resend: set[Any]) -> None:
    """After an error: waits for the batches in flight and records what became of them. Those
    stored right after ``done`` advance it; a batch refused (or never sent) leaves ``pending``;
    one stored after a gap, or whose outcome is unknown, stays to be resent by the next run."""
    for _, fut in in_flight:
        fut.cancel()
    wait_for([fut for _, fut in in_flight])
    contiguous = True
    for batch, fut in in_flight:
        span = (batch.start, batch.end)
        stored = not fut.cancelled() and fut.exception() is None
        if contiguous and stored and batch.start == state.done:
            state.done = batch.end
            state.pending.remove(span)
            continue
        contiguous = False
        never_sent = fut.cancelled() and span not in resend
        if never_sent or (not fut.cancelled() and isinstance(fut.exception(), Refused)):
            state.pending.remove(span)
    with contextlib.suppress(ImportError_):  # the error being raised says more, and the
        state.save()  # state on disk is a safe one (it only lacks what was settled since)
