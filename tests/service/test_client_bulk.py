"""``tcm_client``'s issue 30 additions against a real ``tcm-serve`` (uvicorn process), on SQLite
and on Redis: the bulk upload (batches, parallel, progress, resume by id: a rerun and an
interrupted upload store nothing twice; batches over the service's limit are split; a bad row
stops it naming the row), base64 float32 on the wire by default, images as bytes, paths, PIL
images and base64, ``match_batch``, the monitor reference call, and transport errors through the
fault proxy (cut at a byte, never at a time): a read is retried, a write without an
Idempotency-Key is not (and the server did act), an upload batch is, and stores once."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from tcm_client import (
    ApiError,
    AsyncClient,
    Client,
    TransportFailure,
    UploadError,
    item_id_for,
)
from tests.faultproxy import Cut, FaultProxy
from tests.service.conftest import (
    ADMIN_TOKEN,
    DIM,
    STORES,
    Digits,
    png_bytes,
    serve_process,
)

MAX_ENROL = 40  # the service's max_enrol_items here: an upload batch of more is split


@pytest.fixture(scope="module", params=STORES)
def server(
    request: pytest.FixtureRequest, artefact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = {
        "TCM_MONITOR_INTERVAL_S": "3600",
        "TCM_MAX_BATCH_ITEMS": "16",
        "TCM_MAX_ENROL_ITEMS": str(MAX_ENROL),
    }
    yield from serve_process(request.param, artefact, tmp_path_factory.mktemp("client-bulk"), env)


def new_key(server: str) -> str:
    with Client(server, ADMIN_TOKEN) as admin:
        return admin.create_tenant(f"bulk-{uuid.uuid4().hex[:6]}").api_key


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def stored_items(tcm: Client) -> int:
    return sum(s.items for s in tcm.list_subjects(limit=1000).subjects)


def test_upload_and_rerun_store_each_item_once(server: str) -> None:
    vectors = rows(150, 1)
    subjects = [f"s{i % 7}" for i in range(150)]
    with Client(server, new_key(server)) as tcm:
        seen: list[int] = []
        first = tcm.upload(vectors, subjects, batch_size=MAX_ENROL, progress=seen.append)
        assert (first.items, first.stored, first.already) == (150, 150, 0)
        assert first.requests == 4 and seen == [40, 80, 120, 150]
        assert stored_items(tcm) == 150
        # the ids are the items' content ids: findable, and the vectors are what was sent
        item = tcm.get_item(item_id_for(subjects[3], vectors[3]), include_embedding=True)
        assert item.subject == "s3" and item.embedding is not None
        np.testing.assert_allclose(item.embedding, vectors[3] / np.linalg.norm(vectors[3]), 1e-6)
        # the same upload again: every batch is a replay of its first answer (same body, key)
        again = tcm.upload(vectors, subjects, batch_size=MAX_ENROL)
        assert (again.stored, again.already) == (0, 150)
        # cut differently (other bodies, other keys): the service names the stored ids, skipped
        recut = tcm.upload(vectors, subjects, batch_size=30, parallel=3)
        assert (recut.stored, recut.already) == (0, 150)
        assert stored_items(tcm) == 150
        # without resume, the stored ids are an error naming the rows
        with pytest.raises(UploadError) as err:
            tcm.upload(vectors[:30], subjects[:30], batch_size=30, resume=False)
        assert isinstance(err.value.__cause__, ApiError) and err.value.__cause__.status == 409
        assert err.value.rows == range(0, 30)


def test_an_interrupted_upload_resumes_where_it_stopped(server: str) -> None:
    vectors, subjects = rows(120, 2), [f"p{i % 5}" for i in range(120)]
    with Client(server, new_key(server)) as tcm:
        # "interrupted": the first 70 rows went in, in batches other than the rerun's
        assert tcm.upload(vectors[:70], subjects[:70], batch_size=25).stored == 70
        resumed = tcm.upload(vectors, subjects, batch_size=MAX_ENROL, parallel=2)
        assert (resumed.stored, resumed.already, resumed.items) == (50, 70, 120)
        assert stored_items(tcm) == 120


def test_items_with_ids_and_metadata_and_repeats(server: str) -> None:
    vectors = rows(30, 3)
    items = [(f"m{i % 3}", vectors[i], {"cam": i % 2}, f"given-{i}") for i in range(30)]
    items += [{"subject": "m0", "embedding": vectors[0], "metadata": {"cam": 0}}]  # content id
    items += [("m0", vectors[0], {"cam": 0})]  # the same content again: stored once
    with Client(server, new_key(server)) as tcm:
        result = tcm.upload(iter(items), batch_size=MAX_ENROL)
        assert (result.items, result.stored, result.already) == (32, 31, 1)
        got = tcm.get_item("given-7")
        assert got.subject == "m1" and got.metadata == {"cam": 1}
        assert tcm.get_item(item_id_for("m0", vectors[0], {"cam": 0})).metadata == {"cam": 0}
        hits = tcm.match(embedding=vectors[5], k=3, filter={"cam": 1})
        assert hits.candidates[0].item_id == "given-5"


def test_batches_over_the_service_limit_are_split(server: str) -> None:
    vectors, subjects = rows(100, 4), ["x"] * 100
    with Client(server, new_key(server)) as tcm:
        result = tcm.upload(vectors, subjects, batch_size=100)  # the service takes 40
        # 100 -> 422 too_many_items -> 50 + 50 -> each 422 -> 25 x 4: 7 requests
        assert (result.stored, result.requests) == (100, 7)
        assert stored_items(tcm) == 100


def test_a_bad_row_stops_the_upload_naming_it(server: str) -> None:
    vectors = rows(90, 5)
    vectors[57, 3] = np.nan
    with Client(server, new_key(server)) as tcm:
        with pytest.raises(UploadError) as err:
            tcm.upload(vectors, ["n"] * 90, batch_size=MAX_ENROL)
        cause = err.value.__cause__
        assert isinstance(cause, ApiError) and cause.code == "invalid_embedding"
        assert "embeddings_b64[17]" in cause.message  # row 17 of the batch of rows 40..79
        assert err.value.rows == range(40, 80) and "rows 40..79" in str(err.value)
        assert err.value.done.stored == 40 and stored_items(tcm) == 40


def test_async_upload(server: str) -> None:
    vectors = rows(60, 6)
    key = new_key(server)

    async def run() -> tuple[int, int, int]:
        async with AsyncClient(server, key) as tcm:
            items = ((f"a{i % 4}", vectors[i]) for i in range(60))
            first = await tcm.upload(items, batch_size=15, parallel=3)
            again = await tcm.bulk_enrol(vectors, [f"a{i % 4}" for i in range(60)])
            return first.stored, again.already, again.stored

    assert asyncio.run(run()) == (60, 60, 0)


class Recording(httpx.HTTPTransport):
    """The real transport, keeping each request's body (what went on the wire)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        return super().handle_request(request)


def test_enrol_sends_base64_float32_by_default(server: str) -> None:
    v = np.random.default_rng(7).standard_normal(DIM)  # float64: sent as float32
    wire = Recording()
    with Client(server, new_key(server), transport=wire) as tcm:
        tcm.enrol([{"subject": "b", "embedding": v, "item_id": "b64"}])
        sent = json.loads(wire.bodies[-1])["items"][0]
        assert set(sent) == {"subject", "embedding_b64", "item_id"}
        assert np.array_equal(
            np.frombuffer(base64.b64decode(sent["embedding_b64"]), "<f4"), v.astype(np.float32)
        )
        tcm.enrol([{"subject": "b", "embedding": v, "item_id": "num"}], encoding="json")
        assert json.loads(wire.bodies[-1])["items"][0]["embedding"] == v.tolist()
        a = tcm.get_item("b64", include_embedding=True).embedding
        b = tcm.get_item("num", include_embedding=True).embedding
        np.testing.assert_allclose(a, b, atol=1e-6)
        # a value float32 cannot hold goes as JSON (the service normalises huge finite values)
        huge = np.full(DIM, 1e300)
        tcm.enrol([{"subject": "b", "embedding": huge, "item_id": "huge"}])
        assert "embedding" in json.loads(wire.bodies[-1])["items"][0]
        got = tcm.get_item("huge", include_embedding=True).embedding
        np.testing.assert_allclose(got, np.full(DIM, DIM**-0.5), rtol=1e-5)


def test_images_as_bytes_paths_pil_and_base64(server: str, digits: Digits, tmp_path: Path) -> None:
    raw = png_bytes(digits.images[0])
    path = tmp_path / "digit.png"
    path.write_bytes(raw)
    pil = Image.open(path)
    forms = [raw, path, str(path), pil, base64.b64encode(raw).decode()]
    with Client(server, new_key(server)) as tcm:
        embedded = tcm.embed(forms).embeddings
        assert embedded.shape == (5, DIM)
        for row in embedded[1:]:
            np.testing.assert_allclose(row, embedded[0], atol=1e-5)  # one image, five forms
        ids = tcm.enrol([{"subject": f"img{i}", "image": f} for i, f in enumerate(forms)])
        assert len(ids) == 5
        assert tcm.enrol_upload(path, subject="up", metadata={"k": 1}) != []
        assert tcm.enrol_upload(pil, subject="up") != []
        assert tcm.put_item("put", subject="p", image=str(path)).created
        assert tcm.match(image=path, k=1).decision.accepted
        assert tcm.match_upload(str(path), k=1).candidates[0].score == pytest.approx(1, abs=1e-4)
        assert tcm.verify({"image": pil}, {"image": raw}).accepted
        assert tcm.verify_upload(path, pil).accepted
        np.testing.assert_allclose(tcm.embed_upload(pil).embeddings[0], embedded[0], atol=1e-5)
        np.testing.assert_allclose(
            tcm.match_batch(images=[path, raw])[1].candidates[0].score, 1, atol=1e-4
        )
        with pytest.raises(FileNotFoundError, match="neither an existing file nor base64"):
            tcm.match(image=str(tmp_path / "missing.png"))
        with pytest.raises(TypeError, match="an image is bytes, a path"):
            tcm.embed([12])


def test_match_batch_and_the_monitor_reference(server: str) -> None:
    vectors = rows(6, 8)
    with Client(server, new_key(server)) as tcm:
        tcm.upload(vectors, [f"q{i}" for i in range(6)], ids=[f"q{i}" for i in range(6)])
        results = tcm.match_batch(vectors[[4, 1, 2]], k=2)
        assert [r.candidates[0].item_id for r in results] == ["q4", "q1", "q2"]
        assert len({r.match_id for r in results}) == 3 and all(
            len(r.candidates) == 2 for r in results
        )
        assert tcm.match_batch([vectors[0].tolist()], k=1)[0].decision.subject == "q0"
        with pytest.raises(ValueError, match="exactly one"):
            tcm.match_batch()
    with Client(server, ADMIN_TOKEN) as admin:
        ref = admin.remeasure_reference()
        assert ref.model_version == admin.model().model_version
        assert ref.status in ("measured", "undefined")
        assert (ref.reference is not None) == (ref.status == "measured")


# --- transport errors through the fault proxy --------------------------------------------------
def target(server: str) -> tuple[str, int]:
    parts = urlsplit(server)
    return parts.hostname or "127.0.0.1", parts.port or 80


def test_a_lost_answer_is_retried_only_where_safe(server: str) -> None:
    key = new_key(server)
    with FaultProxy(target(server), record=True) as proxy:
        via = f"http://{proxy.host}:{proxy.port}"
        # a read whose answer is cut after 10 bytes: retried on a new connection
        proxy.arm(Cut(downstream=10), connections=1)
        with Client(via, key, backoff_s=0) as tcm:
            assert tcm.list_subjects().subjects == []
            assert tcm.retried == 1
        # a tenant created, its answer lost after the server had the whole request: not sent
        # again (no Idempotency-Key), a TransportFailure saying so; the tenant does exist
        with Client(via, ADMIN_TOKEN) as admin:
            admin.create_tenant("x" * 12)  # a clean run: how many bytes such a request is
        proxy.wait_closed()
        request_bytes = proxy.connections[-1].upstream
        proxy.arm(Cut(lose_reply_after=request_bytes), connections=1)
        with Client(via, ADMIN_TOKEN, backoff_s=0) as admin:
            with pytest.raises(TransportFailure) as lost:
                admin.create_tenant("y" * 12)
            assert lost.value.sent and lost.value.attempts == 1 and admin.retried == 0
            assert isinstance(lost.value.__cause__, httpx.TransportError)
        with Client(server, ADMIN_TOKEN) as admin:
            assert "y" * 12 in [t.name for t in admin.list_tenants()]


def test_an_upload_batch_whose_answer_is_lost_is_stored_once(server: str) -> None:
    key = new_key(server)
    with FaultProxy(target(server), record=True) as proxy:
        via = f"http://{proxy.host}:{proxy.port}"
        with Client(via, key) as tcm:  # a clean run: the bytes of one batch of 30 rows
            assert tcm.upload(rows(30, 9), ["c"] * 30, batch_size=30).stored == 30
        proxy.wait_closed()
        request_bytes = proxy.connections[-1].upstream
        proxy.arm(Cut(lose_reply_after=request_bytes), connections=1)
        with Client(via, key, backoff_s=0) as tcm:
            result = tcm.upload(rows(30, 10), ["c"] * 30, batch_size=30)
            assert tcm.retried == 1  # resent with its Idempotency-Key: the first answer again
            assert result.stored + result.already == 30 and result.requests == 1
            assert stored_items(tcm) == 60  # stored once, not twice
        assert proxy.connections[-2].was_cut


def test_upload_inputs_are_checked_before_anything_is_sent() -> None:
    """Shapes that cannot be an upload are refused in the client, naming what is wrong; the
    content id depends on subject, float32 vector and metadata, and on nothing else."""
    with Client("http://127.0.0.1:9", "k", retries=0) as tcm:  # nothing listens: never sent
        with pytest.raises(ValueError, match="one subject per row: 3 rows, subjects 2"):
            tcm.upload(rows(3, 0), ["a", "b"])
        with pytest.raises(ValueError, match="ids has 1 entries for 3 rows"):
            tcm.upload(rows(3, 0), ["a"] * 3, ids=["x"])
        with pytest.raises(ValueError, match="an item is"):
            tcm.upload([("a",)])
        with pytest.raises(ValueError, match="dimensions"):
            tcm.upload([("a", [1.0, 2.0]), ("b", [1.0])])
        with pytest.raises(ValueError, match="go with a matrix"):
            tcm.upload([("a", [1.0])], ["a"])
    v = rows(1, 0)[0]
    same = item_id_for("a", v.astype(np.float64), {"k": 1, "j": 2})
    assert same == item_id_for("a", v, {"j": 2, "k": 1})  # float32 bytes, sorted metadata
    assert len({same, item_id_for("b", v), item_id_for("a", v), item_id_for("a", v * 2)}) == 4


def test_upload_progress_bar(
    server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``progress=True``: tqdm's bar when tqdm is installed, a line on stderr when not."""
    with Client(server, new_key(server)) as tcm:
        tcm.upload(rows(5, 11), ["z"] * 5, progress=True)
        assert "upload" in capsys.readouterr().err
        monkeypatch.setitem(sys.modules, "tqdm", None)  # as if the extra were not installed
        tcm.upload(rows(4, 12), ["z"] * 4, progress=True)
        assert "upload: 4/4 items" in capsys.readouterr().err
