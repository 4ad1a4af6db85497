"""Embedded store: one SQLite file, for single-process deployments.

WAL journal with ``synchronous=FULL``: a write the API acknowledged survives a kill of the
process or the machine. Each reading thread gets its own connection (WAL lets readers run beside
the one writer). Deleting a tenant or an item cascades through foreign keys.

Writes go through **one writer thread** (:class:`_Writer`) that owns the only write connection:
callers queue a function of the connection and block until it is committed. The writer takes
every write queued at that moment (up to ``max_group``) into one transaction, each inside its own
``SAVEPOINT`` so that one failing write (a conflict, a constraint) is rolled back alone, and
commits once: one fsync for the group (group commit). Threads of this process therefore never
race for SQLite's write lock; before, under 200 concurrent clients a match's record write lost
that race for longer than ``busy_timeout`` and the request failed with "database is locked".
The queue is bounded (``max_queue``): when it is full the write fails at once with
:class:`StoreUnavailableError` (503, retry) instead of queueing without limit. ``busy_timeout``
still applies against *other processes* using the file (``tcm-serve export-dataset``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from service.errors import ConflictError, NotFoundError, StoreUnavailableError
from service.store.base import (
    GALLERY_CHUNK_ROWS,
    ApiKey,
    Change,
    Decision,
    Feedback,
    GalleryItem,
    GalleryVectors,
    Idempotent,
    IdempotentReplay,
    MatchRecord,
    NewItem,
    StoreInUseError,
    Tenant,
    decode_vector,
    decode_vectors,
    duplicate_name,
    encode_vector,
    metadata_of,
    tenant_name_digest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_info (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id) ON DELETE CASCADE,
    key_hash TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys(tenant_id);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id) ON DELETE CASCADE,
    item_id TEXT NOT NULL, subject TEXT NOT NULL, metadata TEXT NOT NULL,
    has_image INTEGER NOT NULL, created_at REAL NOT NULL,
    UNIQUE (tenant_id, item_id));
CREATE INDEX IF NOT EXISTS items_by_subject ON items(tenant_id, subject, seq);
-- a tenant's items in seq order: the start-up read and listings scan it instead of sorting the
-- rows (vectors included) in a temporary b-tree; built on first open of an older file
CREATE INDEX IF NOT EXISTS items_by_tenant ON items(tenant_id, seq);
CREATE TABLE IF NOT EXISTS item_images (
    seq INTEGER PRIMARY KEY REFERENCES items(seq) ON DELETE CASCADE, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
    seq INTEGER NOT NULL REFERENCES items(seq) ON DELETE CASCADE,
    model_version TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (seq, model_version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS matches (
    match_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id) ON DELETE CASCADE,
    accepted INTEGER NOT NULL, subject TEXT, top_item_id TEXT, top_subject TEXT, score REAL,
    threshold REAL NOT NULL, model_version TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS matches_by_tenant ON matches(tenant_id, created_at);
CREATE TABLE IF NOT EXISTS feedback (
    match_id TEXT PRIMARY KEY REFERENCES matches(match_id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL, true_subject TEXT, correct INTEGER, genuine INTEGER,
    outcome TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id) ON DELETE CASCADE,
    key TEXT NOT NULL, fingerprint TEXT NOT NULL, result TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (tenant_id, key)) WITHOUT ROWID;
-- the monitor reads a tenant's labelled decisions: from the feedback side, not every match
CREATE INDEX IF NOT EXISTS feedback_by_tenant ON feedback(tenant_id);
CREATE TABLE IF NOT EXISTS monitor_snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model_registry (
    id INTEGER PRIMARY KEY CHECK (id = 1), rev INTEGER NOT NULL, body TEXT NOT NULL);
-- tenant names are unique under base.tenant_name_key (its sha256 here): the primary key is the
-- unique index that refuses a second tenant of one name; deleting a tenant frees its name.
-- Filled for older files on open (oldest tenant first; a name two older tenants share stays
-- with the older one, the other keeps its name but holds no row)
CREATE TABLE IF NOT EXISTS tenant_names (
    name_digest TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL UNIQUE REFERENCES tenants(tenant_id) ON DELETE CASCADE
) WITHOUT ROWID;
"""

# OperationalErrors that mean "the database cannot be used right now", not a bug in our SQL.
_UNAVAILABLE = (
    "locked",
    "busy",
    "unable to open",
    "disk i/o",
    "readonly",
    "read-only",
    "database or disk is full",
    "no such table",
    "malformed",
    "not a database",
)


def path_from_url(url: str) -> Path:
    """``sqlite:///rel/path.db`` -> ``rel/path.db``; ``sqlite:////abs/path.db`` -> ``/abs/...``."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {url!r}")
    return Path(url.removeprefix("sqlite:///"))


def _bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


def _connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    return conn


class _Writer:
    """The one thread that writes: group commit of queued writes (see the module docstring).

    A job is ``(fn, future)``; the future gets ``fn``'s result only after the transaction holding
    it has committed, or the exception that rolled it (or the whole group) back. A failed
    ``BEGIN``/``COMMIT`` fails every job of the group and drops the connection, so the next
    group reopens the file (recovery without a restart).
    """

    def __init__(self, path: Path, timeout_s: float, *, max_queue: int, max_group: int) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.max_group = max_group
        self.groups = 0  # transactions committed or attempted, for tests and metrics
        self.largest_group = 0
        self._queue: queue.Queue[tuple[WriteFn, Future[Any]] | None] = queue.Queue(max_queue)
        self._conn: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: WriteFn) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            self._queue.put_nowait((fn, future))
        except queue.Full:
            raise StoreUnavailableError(
                f"the SQLite store at {self.path} has {self._queue.maxsize} writes queued; "
                "retry shortly"
            ) from None
        return future

    def stop(self) -> None:
        self._queue.put(None)  # after every queued write: they all complete first
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            jobs = [job]
            stop = False
            while len(jobs) < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
            self._group([j for j in jobs if j[1].set_running_or_notify_cancel()])
            if stop:
                break
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _group(self, jobs: list[tuple[WriteFn, Future[Any]]]) -> None:
        if not jobs:
            return
        self.groups += 1
        self.largest_group = max(self.largest_group, len(jobs))
        outcomes: list[tuple[bool, Any]] = []
        try:
            if self._conn is None:
                self._conn = _connect(self.path, self.timeout_s)
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            for fn, _ in jobs:
                conn.execute("SAVEPOINT job")
                try:
                    result = fn(conn)
                except Exception as exc:  # this write alone is undone; the group goes on
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((False, exc))
                else:
                    conn.execute("RELEASE job")
                    if isinstance(result, sqlite3.Cursor):
                        # never hand a cursor to another thread: finalising it there, while
                        # this thread uses the connection, is "API misuse" in SQLite
                        result.close()
                        result = None
                    outcomes.append((True, result))
            conn.execute("COMMIT")
        except Exception as exc:
            log.warning("a SQLite write group of %d failed: %s", len(jobs), exc)
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
            for _, future in jobs:
                future.set_exception(exc)
            return
        for (_, future), (ok, value) in zip(jobs, outcomes, strict=True):
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


class SQLiteStore:
    def __init__(
        self,
        path: str | Path,
        *,
        timeout_s: float = 2.0,
        max_write_queue: int = 4096,
        max_write_group: int = 256,
    ) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._local = threading.local()
        # (owner thread, connection): the thread pool retires idle threads, whose connections
        # are closed when the next one is opened
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot create the directory of {self.path}: {exc}"
            ) from exc
        with self._translate("open"):
            conn = self._conn()
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT version FROM schema_info").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_info VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path} has schema version {row[0]}, this build uses {SCHEMA_VERSION}"
                )
            self._index_tenant_names(conn)
        self._writer = _Writer(
            self.path, timeout_s, max_queue=max_write_queue, max_group=max_write_group
        )
        self._serve_lock: IO[bytes] | None = None

    def claim_serving(self) -> None:
        """An exclusive ``flock`` on ``<db>.serve.lock`` beside the database, held until
        :meth:`close` (the kernel drops it when the process dies, ``kill -9`` included)."""
        if self._serve_lock is not None:
            return
        lock_path = self.path.with_name(self.path.name + ".serve.lock")
        f = open(lock_path, "a+b")  # noqa: SIM115 - held open until close()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().decode(errors="replace").strip() or "another process"
            f.close()
            raise StoreInUseError(
                f"the SQLite store {self.path} is already served by {holder}: a SQLite store "
                "is for one tcm-serve process (it has no change feed, so a second one's "
                "indexes would never see the first one's writes). Stop the other process, use "
                "another TCM_STORE_URL, or run replicas on Redis (TCM_STORE_URL=redis://...)"
            ) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
        f.flush()
        self._serve_lock = f

    # --- plumbing --------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreUnavailableError("the store is closed")
            conn = _connect(self.path, self.timeout_s)
            self._local.conn = conn
            with self._lock:
                live = []
                for thread, other in self._connections:
                    if thread.is_alive():
                        live.append((thread, other))
                    else:
                        with contextlib.suppress(sqlite3.Error):
                            other.close()
                live.append((threading.current_thread(), conn))
                self._connections = live
        return conn

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            if any(s in str(exc).lower() for s in _UNAVAILABLE):
                raise StoreUnavailableError(
                    f"the SQLite store at {self.path} cannot be used ({what}): {exc}"
                ) from exc
            raise
        except sqlite3.IntegrityError as exc:
            # a row this write refers to is gone: its tenant (or match) was deleted by a
            # concurrent request. The client's request is refused, not a 500.
            raise ConflictError(
                f"the data this write refers to was deleted meanwhile ({what})",
                code="conflict_deleted",
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailableError(
                f"the SQLite store at {self.path} cannot be used ({what}): {exc}"
            ) from exc

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._translate(what):
            yield self._conn()

    def _write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``fn`` in the writer's transaction; returns once it is committed."""
        if self._closed:
            raise StoreUnavailableError("the store is closed")
        with self._translate(what):
            return self._writer.submit(fn).result()

    def ping(self) -> None:
        with self._read("ping") as conn:
            conn.execute("SELECT 1 FROM schema_info").fetchone()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._writer.stop()
            self._closed = True
            for _, conn in self._connections:
                with contextlib.suppress(sqlite3.Error):  # closing is best effort
                    conn.close()
            self._connections.clear()
            if self._serve_lock is not None:
                self._serve_lock.close()  # releases the flock
                self._serve_lock = None
        self._local = threading.local()

    @staticmethod
    def _index_tenant_names(conn: sqlite3.Connection) -> None:
        """Tenants written before names were unique get their row (oldest first)."""
        rows = conn.execute(
            "SELECT t.tenant_id, t.name FROM tenants t LEFT JOIN tenant_names n "
            "ON n.tenant_id = t.tenant_id WHERE n.tenant_id IS NULL "
            "ORDER BY t.created_at, t.tenant_id"
        ).fetchall()
        if not rows:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR IGNORE INTO tenant_names VALUES (?, ?)",
                [(tenant_name_digest(name), tid) for tid, name in rows],
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # --- tenants and keys ------------------------------------------------------------------
    def create_tenant(self, tenant: Tenant, key: ApiKey) -> None:
        digest = tenant_name_digest(tenant.name)

        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO tenants VALUES (?, ?, ?)",
                (tenant.tenant_id, tenant.name, tenant.created_at),
            )
            try:  # the writer runs one write at a time; the unique index holds regardless
                conn.execute("INSERT INTO tenant_names VALUES (?, ?)", (digest, tenant.tenant_id))
            except sqlite3.IntegrityError:
                held = conn.execute(
                    "SELECT tenant_id FROM tenant_names WHERE name_digest=?", (digest,)
                ).fetchone()
                raise duplicate_name(tenant.name, held[0] if held else "?") from None
            self._insert_key(conn, key)

        self._write("create tenant", body)

    @staticmethod
    def _insert_key(conn: sqlite3.Connection, key: ApiKey) -> None:
        conn.execute(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?)",
            (key.key_id, key.tenant_id, key.key_hash, key.created_at, key.revoked_at),
        )

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        with self._read("get tenant") as conn:
            row = conn.execute(
                "SELECT tenant_id, name, created_at FROM tenants WHERE tenant_id=?", (tenant_id,)
            ).fetchone()
        return Tenant(*row) if row else None

    def list_tenants(self) -> list[Tenant]:
        with self._read("list tenants") as conn:
            rows = conn.execute(
                "SELECT tenant_id, name, created_at FROM tenants ORDER BY created_at, tenant_id"
            ).fetchall()
        return [Tenant(*r) for r in rows]

    def delete_tenant(self, tenant_id: str) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            # feedback rows cascade from matches; everything else from tenants
            cur = conn.execute("DELETE FROM tenants WHERE tenant_id=?", (tenant_id,))
            return cur.rowcount > 0

        return self._write("delete tenant", body)

    def add_key(self, key: ApiKey, *, revoke_others_at: float | None = None) -> list[str]:
        def body(conn: sqlite3.Connection) -> list[str]:
            if (
                conn.execute("SELECT 1 FROM tenants WHERE tenant_id=?", (key.tenant_id,)).fetchone()
                is None
            ):
                raise NotFoundError(
                    f"no tenant {key.tenant_id!r}", detail={"tenant_id": key.tenant_id}
                )
            revoked: list[str] = []
            if revoke_others_at is not None:
                revoked = [
                    r[0]
                    for r in conn.execute(
                        "SELECT key_id FROM api_keys WHERE tenant_id=? AND revoked_at IS NULL "
                        "ORDER BY created_at",
                        (key.tenant_id,),
                    )
                ]
                conn.execute(
                    "UPDATE api_keys SET revoked_at=? WHERE tenant_id=? AND revoked_at IS NULL",
                    (revoke_others_at, key.tenant_id),
                )
            self._insert_key(conn, key)
            return revoked

        return self._write("add key", body)

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._read("get key") as conn:
            row = conn.execute(
                "SELECT key_id, tenant_id, key_hash, created_at, revoked_at "
                "FROM api_keys WHERE key_id=?",
                (key_id,),
            ).fetchone()
        return ApiKey(*row) if row else None

    def list_keys(self, tenant_id: str) -> list[ApiKey]:
        with self._read("list keys") as conn:
            rows = conn.execute(
                "SELECT key_id, tenant_id, key_hash, created_at, revoked_at "
                "FROM api_keys WHERE tenant_id=? ORDER BY created_at, key_id",
                (tenant_id,),
            ).fetchall()
        return [ApiKey(*r) for r in rows]

    def revoke_key(self, tenant_id: str, key_id: str, at: float) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT revoked_at FROM api_keys WHERE tenant_id=? AND key_id=?",
                (tenant_id, key_id),
            ).fetchone()
            if row is None:
                return False
            if row[0] is None:
                conn.execute("UPDATE api_keys SET revoked_at=? WHERE key_id=?", (at, key_id))
            return True

        return self._write("revoke key", body)

    # --- gallery ---------------------------------------------------------------------------
    def add_items(
        self,
        tenant_id: str,
        items: Sequence[NewItem],
        *,
        model_version: str,
        created_at: float,
        idempotency: Idempotent | None = None,
    ) -> list[int]:
        ids = [it.item_id for it in items]

        def body(conn: sqlite3.Connection) -> list[int]:
            # in the write transaction: a tenant delete is wholly before or after this write
            if (
                conn.execute("SELECT 1 FROM tenants WHERE tenant_id=?", (tenant_id,)).fetchone()
                is None
            ):
                raise ConflictError(
                    "the tenant was deleted while this request ran",
                    code="tenant_deleted",
                    detail={"tenant_id": tenant_id},
                )
            if idempotency is not None:
                prior = self._idempotent(conn, tenant_id, idempotency.key, now=created_at)
                if prior is not None:
                    raise IdempotentReplay(prior)
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?)",
                    (
                        tenant_id,
                        idempotency.key,
                        idempotency.fingerprint,
                        idempotency.result,
                        idempotency.expires_at,
                    ),
                )
            existing: list[str] = []
            for chunk in _chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                existing += [
                    r[0]
                    for r in conn.execute(
                        f"SELECT item_id FROM items WHERE tenant_id=? AND item_id IN ({marks})",
                        (tenant_id, *chunk),
                    )
                ]
            if existing:
                raise ConflictError(
                    "some item ids already exist in this gallery",
                    detail={"item_ids": sorted(existing)},
                    code="duplicate_item_id",
                )
            seqs = []
            for it in items:
                cur = conn.execute(
                    "INSERT INTO items (tenant_id, item_id, subject, metadata, has_image, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        tenant_id,
                        it.item_id,
                        it.subject,
                        json.dumps(dict(it.metadata)),
                        int(it.image is not None),
                        created_at,
                    ),
                )
                seq = int(cur.lastrowid)  # type: ignore[arg-type]
                seqs.append(seq)
                conn.execute(
                    "INSERT INTO embeddings VALUES (?, ?, ?)",
                    (seq, model_version, encode_vector(it.embedding)),
                )
                if it.image is not None:
                    conn.execute("INSERT INTO item_images VALUES (?, ?)", (seq, it.image))
            return seqs

        return self._write("add items", body)

    @staticmethod
    def _idempotent(
        conn: sqlite3.Connection, tenant_id: str, key: str, *, now: float
    ) -> Idempotent | None:
        row = conn.execute(
            "SELECT fingerprint, result, expires_at FROM idempotency WHERE "
            "tenant_id=? AND key=? AND expires_at>=?",
            (tenant_id, key, now),
        ).fetchone()
        return None if row is None else Idempotent(key, row[0], row[1], float(row[2]))

    def get_idempotent(self, tenant_id: str, key: str, *, now: float) -> Idempotent | None:
        with self._read("get idempotency key") as conn:
            return self._idempotent(conn, tenant_id, key, now=now)

    def get_item(
        self, tenant_id: str, item_id: str, *, model_version: str, with_image: bool = False
    ) -> GalleryItem | None:
        with self._read("get item") as conn:
            row = conn.execute(
                "SELECT i.seq, i.item_id, i.subject, i.metadata, i.created_at, i.has_image, "
                "e.vector FROM items i LEFT JOIN embeddings e ON e.seq = i.seq AND "
                "e.model_version = ? WHERE i.tenant_id=? AND i.item_id=?",
                (model_version, tenant_id, item_id),
            ).fetchone()
            if row is None:
                return None
            image = None
            if with_image and row[5]:
                img = conn.execute("SELECT data FROM item_images WHERE seq=?", (row[0],)).fetchone()
                image = bytes(img[0]) if img else None
        return GalleryItem(
            seq=row[0],
            item_id=row[1],
            subject=row[2],
            metadata=json.loads(row[3]),
            created_at=row[4],
            has_image=bool(row[5]),
            embedding=None if row[6] is None else decode_vector(row[6]),
            image=image,
        )

    def list_items(
        self, tenant_id: str, *, subject: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[GalleryItem]:
        sql = (
            "SELECT seq, item_id, subject, metadata, created_at, has_image FROM items "
            "WHERE tenant_id=? AND seq>?"
        )
        args: list[Any] = [tenant_id, after_seq]
        if subject is not None:
            sql += " AND subject=?"
            args.append(subject)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        with self._read("list items") as conn:
            rows = conn.execute(sql, args).fetchall()
        return [
            GalleryItem(
                seq=r[0],
                item_id=r[1],
                subject=r[2],
                metadata=json.loads(r[3]),
                created_at=r[4],
                has_image=bool(r[5]),
            )
            for r in rows
        ]

    def put_item(
        self, tenant_id: str, item: NewItem, *, model_version: str, created_at: float
    ) -> tuple[int, int | None]:
        def body(conn: sqlite3.Connection) -> tuple[int, int | None]:
            # in the write transaction: a tenant delete is wholly before or after this write
            if (
                conn.execute("SELECT 1 FROM tenants WHERE tenant_id=?", (tenant_id,)).fetchone()
                is None
            ):
                raise ConflictError(
                    "the tenant was deleted while this request ran",
                    code="tenant_deleted",
                    detail={"tenant_id": tenant_id},
                )
            old = conn.execute(
                "DELETE FROM items WHERE tenant_id=? AND item_id=? RETURNING seq, created_at",
                (tenant_id, item.item_id),
            ).fetchone()
            cur = conn.execute(
                "INSERT INTO items (tenant_id, item_id, subject, metadata, has_image, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    tenant_id,
                    item.item_id,
                    item.subject,
                    json.dumps(dict(item.metadata)),
                    int(item.image is not None),
                    old[1] if old else created_at,
                ),
            )
            seq = int(cur.lastrowid)  # type: ignore[arg-type]
            conn.execute(
                "INSERT INTO embeddings VALUES (?, ?, ?)",
                (seq, model_version, encode_vector(item.embedding)),
            )
            if item.image is not None:
                conn.execute("INSERT INTO item_images VALUES (?, ?)", (seq, item.image))
            return seq, None if old is None else int(old[0])

        return self._write("put item", body)

    def list_subjects(
        self, tenant_id: str, *, after: str | None = None, limit: int = 100
    ) -> list[tuple[str, int]]:
        sql = "SELECT subject, COUNT(*) FROM items WHERE tenant_id=?"
        args: list[Any] = [tenant_id]
        if after is not None:
            sql += " AND subject > ?"
            args.append(after)
        sql += " GROUP BY subject ORDER BY subject LIMIT ?"
        args.append(limit)
        with self._read("list subjects") as conn:
            return [(r[0], int(r[1])) for r in conn.execute(sql, args).fetchall()]

    def count_items(self, tenant_id: str) -> int:
        with self._read("count items") as conn:
            return int(
                conn.execute(
                    "SELECT COUNT(*) FROM items WHERE tenant_id=?", (tenant_id,)
                ).fetchone()[0]
            )

    def delete_item(self, tenant_id: str, item_id: str) -> int | None:
        def body(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "DELETE FROM items WHERE tenant_id=? AND item_id=? RETURNING seq",
                (tenant_id, item_id),
            ).fetchone()
            return None if row is None else int(row[0])

        return self._write("delete item", body)

    def delete_subject(self, tenant_id: str, subject: str) -> list[int]:
        def body(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "DELETE FROM items WHERE tenant_id=? AND subject=? RETURNING seq",
                (tenant_id, subject),
            ).fetchall()
            return sorted(int(r[0]) for r in rows)

        return self._write("delete subject", body)

    def gallery_vectors(
        self,
        tenant_id: str,
        *,
        model_version: str,
        subject: str | None = None,
        with_metadata: bool = False,
    ) -> GalleryVectors:
        sql, args = _gallery_query(tenant_id, model_version, subject, with_metadata)
        with self._read("read vectors") as conn:
            rows = conn.execute(sql, args).fetchall()
        return _vectors(rows, with_metadata=with_metadata)

    def iter_gallery_vectors(
        self, tenant_id: str, *, model_version: str, chunk_rows: int = GALLERY_CHUNK_ROWS
    ) -> Iterator[GalleryVectors]:
        with self._read("read vectors") as conn:
            cursor = conn.execute(*_gallery_query(tenant_id, model_version, None, True))
            try:
                while rows := cursor.fetchmany(chunk_rows):
                    yield _vectors(rows, with_metadata=True)
            finally:
                cursor.close()

    def items_without_embedding(
        self, tenant_id: str, *, model_version: str
    ) -> list[tuple[str, bytes | None]]:
        with self._read("read items without embedding") as conn:
            rows = conn.execute(
                "SELECT i.item_id, im.data FROM items i LEFT JOIN item_images im ON "
                "im.seq = i.seq WHERE i.tenant_id=? AND NOT EXISTS (SELECT 1 FROM embeddings e "
                "WHERE e.seq = i.seq AND e.model_version=?) ORDER BY i.seq",
                (tenant_id, model_version),
            ).fetchall()
        return [(r[0], None if r[1] is None else bytes(r[1])) for r in rows]

    def put_embeddings(
        self, tenant_id: str, vectors: Mapping[str, np.ndarray], *, model_version: str
    ) -> None:
        def body(conn: sqlite3.Connection) -> None:
            for item_id, vec in vectors.items():
                conn.execute(
                    "INSERT OR REPLACE INTO embeddings SELECT seq, ?, ? FROM items "
                    "WHERE tenant_id=? AND item_id=?",
                    (model_version, encode_vector(vec), tenant_id, item_id),
                )

        self._write("put embeddings", body)

    def vectors_of_items(
        self, tenant_id: str, item_ids: Sequence[str], *, model_version: str
    ) -> GalleryVectors:
        rows: list[Any] = []
        with self._read("read vectors") as conn:
            for chunk in _chunks(list(item_ids), 500):
                marks = ",".join("?" * len(chunk))
                rows += conn.execute(
                    "SELECT i.seq, i.item_id, i.subject, e.vector, i.metadata FROM items i "
                    "JOIN embeddings e "
                    "ON e.seq = i.seq AND e.model_version=? WHERE i.tenant_id=? AND "
                    f"i.item_id IN ({marks}) ORDER BY i.seq",
                    (model_version, tenant_id, *chunk),
                ).fetchall()
        rows.sort(key=lambda r: r[0])
        return _vectors(rows, with_metadata=True)

    # --- change feed -----------------------------------------------------------------------
    def follow_only(self, tenants: Callable[[str], bool]) -> None:
        return None  # no feed

    def change_cursor(self, tenant_id: str | None = None) -> str | None:
        return None  # one process per SQLite file: nothing to follow

    def cursor_with(self, cursor: str, tenant_id: str, position: str) -> str:
        return cursor  # (never asked: no cursor)

    def feed_covers(self, cursor: str, token: str, tenant_id: str) -> bool:
        return True  # (never asked: no cursor) every write went through this process

    def read_changes(self, cursor: str, *, block_ms: int) -> tuple[str, list[Change]]:
        return cursor, []

    def interrupt_changes(self) -> None:
        """Nothing blocks: :meth:`read_changes` returns at once."""

    # --- matches and feedback --------------------------------------------------------------
    def add_match(self, record: MatchRecord) -> None:
        r = record
        self.add_matches([r])

    def add_matches(self, records: Sequence[MatchRecord]) -> None:
        rows = [
            (
                r.match_id,
                r.tenant_id,
                int(r.accepted),
                r.subject,
                r.top_item_id,
                r.top_subject,
                r.score,
                r.threshold,
                r.model_version,
                r.created_at,
            )
            for r in records
        ]
        self._write(
            "add match",
            lambda conn: conn.executemany(
                "INSERT INTO matches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            ),
        )

    _MATCH_COLS = (
        "m.match_id, m.tenant_id, m.accepted, m.subject, m.top_item_id, "
        "m.top_subject, m.score, m.threshold, m.model_version, m.created_at"
    )
    _FEEDBACK_COLS = (
        "f.match_id, f.tenant_id, f.true_subject, f.correct, f.genuine, f.outcome, f.created_at"
    )

    @staticmethod
    def _match(r: Sequence[Any]) -> MatchRecord:
        return MatchRecord(
            match_id=r[0],
            tenant_id=r[1],
            accepted=bool(r[2]),
            subject=r[3],
            top_item_id=r[4],
            top_subject=r[5],
            score=r[6],
            threshold=r[7],
            model_version=r[8],
            created_at=r[9],
        )

    @staticmethod
    def _feedback(r: Sequence[Any]) -> Feedback | None:
        if r[0] is None:
            return None
        return Feedback(
            match_id=r[0],
            tenant_id=r[1],
            true_subject=r[2],
            correct=_bool(r[3]),
            genuine=_bool(r[4]),
            outcome=r[5],
            created_at=r[6],
        )

    def deferred_matches(self) -> tuple[int, int]:
        return 0, 0  # add_matches writes or fails: nothing waits

    def flush_deferred(self) -> int:
        return 0

    def get_match(self, tenant_id: str, match_id: str) -> MatchRecord | None:
        with self._read("get match") as conn:
            row = conn.execute(
                f"SELECT {self._MATCH_COLS} FROM matches m WHERE m.tenant_id=? AND m.match_id=?",
                (tenant_id, match_id),
            ).fetchone()
        return None if row is None else self._match(row)

    def add_feedback(self, feedback: Feedback) -> None:
        f = feedback

        def body(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM feedback WHERE match_id=?", (f.match_id,)).fetchone():
                raise ConflictError(
                    "this match already has feedback",
                    detail={"match_id": f.match_id},
                    code="feedback_exists",
                )
            conn.execute(
                "INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    f.match_id,
                    f.tenant_id,
                    f.true_subject,
                    None if f.correct is None else int(f.correct),
                    None if f.genuine is None else int(f.genuine),
                    f.outcome,
                    f.created_at,
                ),
            )

        self._write("add feedback", body)

    def list_decisions(
        self,
        tenant_id: str,
        *,
        since: float = 0.0,
        labelled_only: bool = False,
        limit: int | None = None,
    ) -> list[Decision]:
        if labelled_only:  # driven by the tenant's feedback rows (feedback_by_tenant)
            sql = (
                f"SELECT {self._MATCH_COLS}, {self._FEEDBACK_COLS} FROM feedback f "
                "JOIN matches m ON m.match_id = f.match_id WHERE f.tenant_id=? "
                "AND m.created_at>=? ORDER BY m.created_at, m.match_id"
            )
        else:
            sql = (
                f"SELECT {self._MATCH_COLS}, {self._FEEDBACK_COLS} FROM matches m LEFT JOIN "
                "feedback f ON f.match_id = m.match_id WHERE m.tenant_id=? "
                "AND m.created_at>=? ORDER BY m.created_at, m.match_id"
            )
        args: list[Any] = [tenant_id, since]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._read("list decisions") as conn:
            rows = conn.execute(sql, args).fetchall()
        return [Decision(self._match(r[:10]), self._feedback(r[10:])) for r in rows]

    def prune_decisions(self, tenant_id: str, *, before: float, keep: int) -> int:
        def prune(conn: sqlite3.Connection) -> int:
            victims = (
                "SELECT match_id FROM matches WHERE tenant_id=? AND created_at<? UNION "
                "SELECT match_id FROM (SELECT match_id FROM matches WHERE tenant_id=? "
                "ORDER BY created_at DESC, match_id DESC LIMIT -1 OFFSET ?)"
            )
            args = (tenant_id, before, tenant_id, keep)
            conn.execute(f"DELETE FROM feedback WHERE match_id IN ({victims})", args)
            return conn.execute(f"DELETE FROM matches WHERE match_id IN ({victims})", args).rowcount

        return self._write("prune decisions", prune)

    # --- monitoring ------------------------------------------------------------------------
    def put_monitor_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        body = json.dumps(snapshot, allow_nan=False, separators=(",", ":"))
        self._write(
            "put monitor snapshot",
            lambda conn: conn.execute(
                "INSERT INTO monitor_snapshot (id, body) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                (body,),
            ),
        )

    def get_monitor_snapshot(self) -> dict[str, Any] | None:
        with self._read("get monitor snapshot") as conn:
            row = conn.execute("SELECT body FROM monitor_snapshot WHERE id = 1").fetchone()
        return None if row is None else json.loads(row[0])

    # --- model registry --------------------------------------------------------------------
    # --- shard groups: a shared store's (Redis); one process per SQLite file has none ------------
    def get_placement(self) -> tuple[dict[str, Any] | None, int]:
        return None, 0

    def put_placement(self, table: Mapping[str, Any], *, expected_rev: int) -> bool:
        raise ValueError("shard groups need a shared Redis store (TCM_STORE_URL=redis...)")

    def put_replica(self, url: str, info: Mapping[str, Any], *, now: float) -> None:
        return None

    def list_replicas(self, *, now: float, max_age_s: float) -> dict[str, dict[str, Any]]:
        return {}

    def get_model_registry(self) -> tuple[dict[str, Any] | None, int]:
        with self._read("get model registry") as conn:
            row = conn.execute("SELECT rev, body FROM model_registry WHERE id = 1").fetchone()
        return (None, 0) if row is None else (json.loads(row[1]), int(row[0]))

    def put_model_registry(self, registry: Mapping[str, Any], *, expected_rev: int) -> bool:
        body = json.dumps(registry, allow_nan=False, separators=(",", ":"))

        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT rev FROM model_registry WHERE id = 1").fetchone()
            if (0 if row is None else int(row[0])) != expected_rev:
                return False
            conn.execute(
                "INSERT INTO model_registry (id, rev, body) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, body = excluded.body",
                (expected_rev + 1, body),
            )
            return True

        return self._write("put model registry", write)

    def delete_embeddings(self, model_version: str) -> int:
        return self._write(
            "delete embeddings",
            lambda conn: int(
                conn.execute(
                    "DELETE FROM embeddings WHERE model_version = ?", (model_version,)
                ).rowcount
            ),
        )


def _gallery_query(
    tenant_id: str, model_version: str, subject: str | None, with_metadata: bool
) -> tuple[str, list[Any]]:
    """The rows ``_vectors`` reads, in seq order (the ``items_by_tenant`` or
    ``items_by_subject`` index order: nothing to sort)."""
    sql = (
        "SELECT i.seq, i.item_id, i.subject, e.vector, "
        f"{'i.metadata' if with_metadata else 'NULL'} FROM items i JOIN embeddings e "
        "ON e.seq = i.seq AND e.model_version=? WHERE i.tenant_id=?"
    )
    args: list[Any] = [model_version, tenant_id]
    if subject is not None:
        sql += " AND i.subject=?"
        args.append(subject)
    return sql + " ORDER BY i.seq", args


def _vectors(rows: Sequence[Any], *, with_metadata: bool) -> GalleryVectors:
    if not rows:
        return GalleryVectors(
            np.zeros(0, np.int64),
            [],
            [],
            np.zeros((0, 0), np.float32),
            [] if with_metadata else None,
        )
    return GalleryVectors(
        seqs=np.array([r[0] for r in rows], dtype=np.int64),
        item_ids=[r[1] for r in rows],
        subjects=[r[2] for r in rows],
        vectors=decode_vectors([r[3] for r in rows]),
        metadata=[metadata_of(r[4]) for r in rows] if with_metadata else None,
    )


def _chunks(xs: Sequence[str], n: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]
