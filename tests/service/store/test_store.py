"""The store contract, checked against both implementations directly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.errors import ConflictError
from service.settings import Settings
from service.store import (
    ApiKey,
    Change,
    Feedback,
    MatchRecord,
    NewItem,
    Store,
    Tenant,
    open_store,
)
from service.store.sqlite import SQLiteStore
from tests.service.conftest import ALL_STORES

V1, V2 = "m-v1", "m-v2"


@pytest.fixture(params=ALL_STORES)
def store(request: pytest.FixtureRequest, store_settings, artefact: Path) -> Iterator[Store]:
    s = open_store(Settings(artefact_path=artefact, **store_settings(request.param)))
    try:
        yield s
    finally:
        s.close()


def vec(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def tenant(store: Store, tid: str, t: float = 1.0) -> ApiKey:
    key = ApiKey(f"key-{tid}", tid, "h" * 64, t)
    store.create_tenant(Tenant(tid, f"name-{tid}", t), key)
    return key


def items(
    n: int, *, prefix: str = "i", subject=lambda i: f"s{i % 2}", image: bool = False
) -> list[NewItem]:
    return [
        NewItem(
            item_id=f"{prefix}{i}",
            subject=subject(i),
            embedding=vec(i),
            metadata={"n": i},
            image=b"img%d" % i if image else None,
        )
        for i in range(n)
    ]


def test_implements_protocol(store: Store) -> None:
    assert isinstance(store, Store)
    store.ping()


def test_tenants_and_keys(store: Store) -> None:
    k1 = tenant(store, "ta", 1.0)
    tenant(store, "tb", 2.0)
    assert [t.tenant_id for t in store.list_tenants()] == ["ta", "tb"]
    assert store.get_tenant("ta") == Tenant("ta", "name-ta", 1.0)
    assert store.get_tenant("zz") is None
    assert store.get_key(k1.key_id) == k1 and store.get_key("nope") is None
    k2 = ApiKey("key-ta-2", "ta", "g" * 64, 3.0)
    assert store.add_key(k2) == []
    k3 = ApiKey("key-ta-3", "ta", "f" * 64, 4.0)
    assert store.add_key(k3, revoke_others_at=5.0) == ["key-ta", "key-ta-2"]
    keys = store.list_keys("ta")
    assert [k.key_id for k in keys] == ["key-ta", "key-ta-2", "key-ta-3"]
    assert [k.revoked_at for k in keys] == [5.0, 5.0, None]
    assert store.revoke_key("ta", "key-ta-3", 6.0)
    assert store.revoke_key("ta", "key-ta-3", 7.0)  # idempotent, first time kept
    assert store.get_key("key-ta-3").revoked_at == 6.0
    assert not store.revoke_key("tb", "key-ta-3", 8.0)  # another tenant's key
    assert not store.revoke_key("ta", "nope", 8.0)


def test_gallery_items(store: Store) -> None:
    tenant(store, "t")
    tenant(store, "u")
    seqs = store.add_items("t", items(5, image=True), model_version=V1, created_at=10.0)
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    with pytest.raises(ConflictError) as err:
        store.add_items(
            "t", [*items(1, prefix="new"), *items(2)], model_version=V1, created_at=11.0
        )
    assert err.value.detail == {"item_ids": ["i0", "i1"]}
    assert store.count_items("t") == 5 and store.get_item("t", "new0", model_version=V1) is None
    # same ids in another tenant are independent
    other = store.add_items("u", items(2), model_version=V1, created_at=12.0)
    assert len(set(other)) == 2  # seqs are unique within a tenant (Cluster: one counter each)

    got = store.get_item("t", "i3", model_version=V1, with_image=True)
    assert got is not None and got.seq == seqs[3] and got.subject == "s1"
    assert got.metadata == {"n": 3} and got.created_at == 10.0 and got.has_image
    assert got.image == b"img3"
    np.testing.assert_array_equal(got.embedding, vec(3))
    assert store.get_item("t", "i3", model_version=V2).embedding is None
    assert store.get_item("u", "i3", model_version=V1) is None

    page = store.list_items("t", limit=2)
    assert [i.item_id for i in page] == ["i0", "i1"] and page[0].embedding is None
    page = store.list_items("t", after_seq=page[-1].seq, limit=10)
    assert [i.item_id for i in page] == ["i2", "i3", "i4"]
    assert [i.item_id for i in store.list_items("t", subject="s1")] == ["i1", "i3"]

    gv = store.gallery_vectors("t", model_version=V1)
    assert gv.item_ids == [f"i{i}" for i in range(5)] and list(gv.seqs) == seqs
    assert gv.subjects == ["s0", "s1", "s0", "s1", "s0"]
    np.testing.assert_array_equal(gv.vectors, np.stack([vec(i) for i in range(5)]))
    sub = store.gallery_vectors("t", model_version=V1, subject="s1")
    assert sub.item_ids == ["i1", "i3"] and sub.vectors.shape == (2, 8)
    assert len(store.gallery_vectors("t", model_version=V2)) == 0

    # a new model version: backfill from images
    missing = store.items_without_embedding("t", model_version=V2)
    assert missing == [(f"i{i}", b"img%d" % i) for i in range(5)]
    store.put_embeddings("t", {"i1": vec(101), "i4": vec(104), "ghost": vec(0)}, model_version=V2)
    assert [m[0] for m in store.items_without_embedding("t", model_version=V2)] == [
        "i0",
        "i2",
        "i3",
    ]
    assert store.gallery_vectors("t", model_version=V2).item_ids == ["i1", "i4"]
    assert store.get_item("t", "ghost", model_version=V2) is None
    np.testing.assert_array_equal(store.get_item("t", "i1", model_version=V1).embedding, vec(1))

    assert store.delete_item("t", "i1") == seqs[1]
    assert store.delete_item("t", "i1") is None
    assert store.delete_item("u", "i0") == other[0]
    assert store.get_item("t", "i0", model_version=V1) is not None  # t's i0 untouched
    assert store.delete_subject("t", "s0") == [seqs[0], seqs[2], seqs[4]]
    assert store.delete_subject("t", "s0") == []
    assert [i.item_id for i in store.list_items("t")] == ["i3"]
    # seqs are never reused, and freed ids can come back
    again = store.add_items("t", items(1), model_version=V1, created_at=13.0)
    assert again[0] > max(seqs + other)


def test_iter_gallery_vectors_streams_what_gallery_vectors_reads(store: Store) -> None:
    """The start-up rebuild's streamed read: the same rows as one ``gallery_vectors`` read,
    in seq order, in chunks of at most ``chunk_rows``, items without an embedding for the
    version skipped, metadata parsed (the empty object too), other tenants never included."""
    tenant(store, "t")
    tenant(store, "u")
    store.add_items("u", items(3, prefix="u"), model_version=V1, created_at=1.0)
    store.add_items("t", items(23), model_version=V1, created_at=1.0)
    store.add_items(
        "t",
        [NewItem(item_id="plain", subject="s9", embedding=vec(99), metadata={})],
        model_version=V1,
        created_at=2.0,
    )
    # ids from before the id pattern may hold the key separator or the escape character: the
    # Redis page script must build their keys as key_part does
    store.add_items(
        "t",
        [
            NewItem(item_id=i, subject="old", embedding=vec(50 + n))
            for n, i in enumerate(["a:b", "c%d", "e%3Af"])
        ],
        model_version=V1,
        created_at=3.0,
    )
    store.put_embeddings("t", {"i5": vec(205), "i6": vec(206)}, model_version=V2)
    whole = store.gallery_vectors("t", model_version=V1, with_metadata=True)
    assert len(whole) == 27 and whole.item_ids[-3:] == ["a:b", "c%d", "e%3Af"]
    chunks = list(store.iter_gallery_vectors("t", model_version=V1, chunk_rows=7))
    assert [len(c) for c in chunks] == [7, 7, 7, 6]
    assert np.concatenate([c.seqs for c in chunks]).tolist() == whole.seqs.tolist()
    assert [i for c in chunks for i in c.item_ids] == whole.item_ids
    assert [x for c in chunks for x in c.subjects] == whole.subjects
    assert [m for c in chunks for m in c.metadata] == whole.metadata
    assert whole.metadata[23] == {} and whole.metadata[4] == {"n": 4}
    np.testing.assert_array_equal(np.concatenate([c.vectors for c in chunks]), whole.vectors)
    assert all(c.vectors.dtype == np.float32 and c.vectors.flags.writeable for c in chunks)
    # a delete between two chunks moves no later item past the reader's position
    reader = store.iter_gallery_vectors("t", model_version=V1, chunk_rows=7)
    first = next(reader)
    store.delete_item("t", first.item_ids[0])
    store.delete_item("t", first.item_ids[1])
    rest = [i for c in reader for i in c.item_ids]
    assert rest == whole.item_ids[7:]
    (v2,) = store.iter_gallery_vectors("t", model_version=V2, chunk_rows=7)
    assert v2.item_ids == ["i5", "i6"]
    np.testing.assert_array_equal(v2.vectors, np.stack([vec(205), vec(206)]))
    assert list(store.iter_gallery_vectors("nobody", model_version=V1)) == []


def test_matches_and_feedback(store: Store) -> None:
    tenant(store, "t")
    tenant(store, "u")
    for i in range(4):
        store.add_match(
            MatchRecord(
                match_id=f"m{i}",
                tenant_id="t",
                accepted=i % 2 == 0,
                subject="s" if i % 2 == 0 else None,
                top_item_id=None if i == 3 else "it",
                top_subject=None if i == 3 else "s",
                score=None if i == 3 else 0.5 + i / 10,
                threshold=0.6,
                model_version=V1,
                created_at=100.0 + i,
            )
        )
    assert store.get_match("u", "m0") is None
    m1 = store.get_match("t", "m1")
    assert m1 == MatchRecord("m1", "t", False, None, "it", "s", 0.6, 0.6, V1, 101.0)
    assert (
        store.get_match("t", "m3").score is None and store.get_match("t", "m3").top_subject is None
    )
    fb = Feedback("m1", "t", None, None, False, "true_reject", 200.0)
    store.add_feedback(fb)
    with pytest.raises(ConflictError):
        store.add_feedback(Feedback("m1", "t", "s", None, True, "false_reject", 201.0))
    store.add_feedback(Feedback("m2", "t", "s", None, True, "true_accept", 202.0))
    store.add_feedback(Feedback("m3", "t", None, False, None, "false_reject", 203.0))
    decisions = store.list_decisions("t")
    assert [d.match.match_id for d in decisions] == ["m0", "m1", "m2", "m3"]
    assert decisions[0].feedback is None and decisions[1].feedback == fb
    assert decisions[2].feedback.true_subject == "s"
    assert decisions[3].feedback.correct is False and decisions[3].feedback.genuine is None
    labelled = store.list_decisions("t", labelled_only=True)
    assert [d.match.match_id for d in labelled] == ["m1", "m2", "m3"]
    assert [d.match.match_id for d in store.list_decisions("t", since=102.0)] == ["m2", "m3"]
    assert len(store.list_decisions("t", limit=2)) == 2
    assert store.list_decisions("u") == []


def test_delete_tenant_cascades(store: Store) -> None:
    tenant(store, "t")
    tenant(store, "keep")
    store.add_items("t", items(3, image=True), model_version=V1, created_at=1.0)
    store.add_items("keep", items(2), model_version=V1, created_at=1.0)
    store.add_match(MatchRecord("mt", "t", True, "s", "i0", "s", 0.9, 0.5, V1, 1.0))
    store.add_feedback(Feedback("mt", "t", "s", None, True, "true_accept", 2.0))
    assert store.delete_tenant("t") and not store.delete_tenant("t")
    assert store.get_tenant("t") is None and store.get_key("key-t") is None
    assert store.count_items("t") == 0 and store.list_decisions("t") == []
    assert store.get_item("t", "i0", model_version=V1) is None
    assert store.list_keys("t") == []
    assert store.count_items("keep") == 2 and store.get_key("key-keep") is not None


def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db" / "tcm.db"
    s = SQLiteStore(path)
    tenant(s, "t")
    s.add_items("t", items(2), model_version=V1, created_at=1.0)
    s.close()
    s2 = SQLiteStore(path)
    assert s2.count_items("t") == 2
    (mode,) = s2._conn().execute("PRAGMA journal_mode").fetchone()
    (sync,) = s2._conn().execute("PRAGMA synchronous").fetchone()
    assert mode == "wal" and sync == 2  # FULL
    s2.close()


def test_change_feed(store: Store) -> None:
    cursor = store.change_cursor()
    if isinstance(store, SQLiteStore):
        assert cursor is None  # single process: nothing to follow
        return
    assert cursor is not None
    tenant(store, "t")
    seqs = store.add_items("t", items(3), model_version=V1, created_at=1.0)
    with pytest.raises(ConflictError):  # a failed write leaves no change behind
        store.add_items("t", items(1), model_version=V1, created_at=1.0)
    store.delete_item("t", "i1")
    store.delete_subject("t", "s0")
    store.put_embeddings("t", {"i1": vec(5)}, model_version=V2)
    put_seq, _old = store.put_item(
        "t", NewItem(item_id="p", subject="s", embedding=vec(7)), model_version=V1, created_at=2.0
    )
    cursor, changes = store.read_changes(cursor, block_ms=100)
    # an add names its items' seqs (row-aligned) where it knows them, so the replica that wrote
    # them skips reading back what its index already holds
    assert changes == [
        Change("add", "t", ("i0", "i1", "i2"), tuple(seqs)),
        Change("remove", "t", seqs=(seqs[1],)),
        Change("remove", "t", seqs=(seqs[0], seqs[2])),
        Change("add", "t", ("i1",)),
        Change("add", "t", ("p",), (put_seq,)),
    ]
    assert store.read_changes(cursor, block_ms=50) == (cursor, [])
    store.delete_tenant("t")
    cursor, changes = store.read_changes(cursor, block_ms=100)
    assert changes == [Change("drop_tenant", "t")]
    assert store.read_changes(cursor, block_ms=50) == (cursor, [])
    tenant(store, "u")
    store.add_items("u", items(2), model_version=V1, created_at=1.0)
    gv = store.vectors_of_items("u", ["i1", "nope", "i0"], model_version=V1)
    assert gv.item_ids == ["i0", "i1"] and gv.vectors.shape == (2, 8)
    assert len(store.vectors_of_items("u", ["i0"], model_version=V2)) == 0


def test_sqlite_vectors_of_items(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "tcm.db")
    tenant(s, "u")
    s.add_items("u", items(2), model_version=V1, created_at=1.0)
    gv = s.vectors_of_items("u", ["i1", "nope", "i0"], model_version=V1)
    assert gv.item_ids == ["i0", "i1"] and gv.vectors.shape == (2, 8)
    s.close()


def test_sqlite_closes_connections_of_retired_threads(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "tcm.db")
    tenant(s, "t")
    for _ in range(5):
        t = threading.Thread(target=lambda: s.get_tenant("t"))
        t.start()
        t.join()
    s.get_tenant("t")
    assert len(s._connections) <= 2  # this thread's, and at most the last worker's
    s.close()


def test_put_item_and_list_subjects(store: Store) -> None:
    tenant(store, "t1")
    store.add_items("t1", items(5), model_version=V1, created_at=2.0)
    assert store.list_subjects("t1") == [("s0", 3), ("s1", 2)]
    assert store.list_subjects("t1", after="s0") == [("s1", 2)]
    assert store.list_subjects("t1", limit=1) == [("s0", 3)]
    # replace: new seq, the old one returned, created_at kept, other versions' vectors gone
    store.put_embeddings("t1", {"i1": vec(9)}, model_version=V2)
    old = store.get_item("t1", "i1", model_version=V1)
    assert old is not None
    seq, replaced = store.put_item(
        "t1", NewItem("i1", "s9", vec(7), {"x": 1}), model_version=V1, created_at=5.0
    )
    assert replaced == old.seq and seq > old.seq
    new = store.get_item("t1", "i1", model_version=V1)
    assert new is not None and (new.subject, new.metadata, new.created_at) == ("s9", {"x": 1}, 2.0)
    np.testing.assert_allclose(new.embedding, vec(7))
    assert store.get_item("t1", "i1", model_version=V2).embedding is None  # type: ignore[union-attr]
    assert store.list_subjects("t1") == [("s0", 3), ("s1", 1), ("s9", 1)]
    seq2, none = store.put_item(
        "t1", NewItem("fresh", "s1", vec(8)), model_version=V1, created_at=6.0
    )
    assert none is None and seq2 > seq
    got = store.vectors_of_items("t1", ["i1", "fresh"], model_version=V1)
    assert got.item_ids == ["i1", "fresh"] and got.metadata == [{"x": 1}, {}]
    full = store.gallery_vectors("t1", model_version=V1, with_metadata=True)
    assert full.metadata is not None and len(full.metadata) == len(full) == 6
    # an emptied subject leaves the listing
    store.delete_item("t1", "i1")
    assert [s for s, _ in store.list_subjects("t1")] == ["s0", "s1"]
    store.delete_subject("t1", "s0")
    assert store.list_subjects("t1") == [("s1", 2)]
    assert store.list_subjects("other") == []


@pytest.mark.redis
def test_redis_subjects_listing_of_a_tenant_from_before_it(store_settings, artefact: Path) -> None:
    """Tenants enrolled before the subject listing existed are indexed on first listing."""
    s = open_store(Settings(artefact_path=artefact, **store_settings("redis")))
    try:
        tenant(s, "old")
        s.add_items("old", items(4), model_version=V1, created_at=1.0)
        s.r.delete(s._tenant("old", "subjects"))  # type: ignore[attr-defined]
        s.r.hdel(s._tenant("old"), "subjects_indexed")  # type: ignore[attr-defined]
        assert s.list_subjects("old") == [("s0", 2), ("s1", 2)]
        assert s.r.hexists(s._tenant("old"), "subjects_indexed")  # type: ignore[attr-defined]
    finally:
        s.close()
