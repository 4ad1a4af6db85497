"""``tcm_client``'s one retry policy, against a scripted HTTP server on a real socket (a thread in
this process answering from a list: status, headers, body, or a dropped connection), and what is
built on it: the importer's batches and the CLI's admin calls. Waits go through an injected
``sleep`` that records them: nothing here waits on time passing.

Rules checked: 429 and connect errors are retried for every request; 502/503/504 and answers lost
after sending only for requests safe to repeat (GET, PUT, DELETE, the query POSTs, the POSTs the
server deduplicates, and a POST the caller declares safe); a POST that creates things is sent
once; the wait is the longer of ``Retry-After`` and the exponential backoff, capped."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.ops.importer import Batch, ImportError_, send_batch
from tcm_client import ApiError, AsyncClient, Client, ClientError, RetryPolicy, TransportFailure
from tcm_client import models as m


@dataclass
class Answer:
    status: int = 200
    body: Any = None  # JSON
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering: the answer is lost


@dataclass
class Seen:
    method: str
    path: str
    body: bytes
    authorization: str | None


class Scripted:
    """An HTTP server answering each request with the next :class:`Answer` (500 once the
    script is spent), recording what it was sent."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.seen: list[Seen] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                script.seen.append(
                    Seen(
                        self.command,
                        self.path,
                        self.rfile.read(length),
                        self.headers.get("Authorization"),
                    )
                )
                answer = script.answers.pop(0) if script.answers else Answer(500, {})
                if answer.drop:
                    self.close_connection = True
                    return
                payload = b"" if answer.body is None else json.dumps(answer.body).encode()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def script(self, *answers: Answer) -> None:
        self.answers, self.seen = list(answers), []

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def srv() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.close()


def unavailable(retry_after: str | None = "0", status: int = 503) -> Answer:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return Answer(status, {"code": "store_unavailable", "message": "down"}, headers)


TENANT = {"tenant_id": "t1", "name": "n", "key_id": "k1", "api_key": "tcm_k1_x"}
REGISTRY = {  # keys in an order the client's model does not declare them in
    "versions": [],
    "history": [],
    "served": "v1",
    "active": "v1",
    "activation": None,
    "rollback_to": None,
    "progress": None,
    "extra": {"b": 1, "a": 2},
}


class Waits(list[float]):
    """An injected ``sleep``: records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(srv: Scripted, waits: Waits, **kw: Any) -> Client:
    return Client(srv.base, "tok", sleep=waits, **kw)


# --- the policy as a table -----------------------------------------------------------------
def test_policy_decisions() -> None:
    p = RetryPolicy(retries=3, backoff_s=0.5, max_wait_s=10)
    for safe in (True, False):
        assert p.retries_status(429, safe=safe)
        assert p.retries_error(httpx.ConnectError("refused"), safe=safe)
        assert p.retries_error(httpx.ConnectTimeout("slow"), safe=safe)
        assert not p.retries_status(500, safe=safe) and not p.retries_status(409, safe=safe)
        assert not p.retries_error(httpx.UnsupportedProtocol("ftp"), safe=safe)
    for status in (502, 503, 504):
        assert p.retries_status(status, safe=True) and not p.retries_status(status, safe=False)
    for error in (httpx.ReadTimeout("t"), httpx.ReadError("r"), httpx.RemoteProtocolError("x")):
        assert p.retries_error(error, safe=True) and not p.retries_error(error, safe=False)
    # the longer of Retry-After and the backoff (0.5 * 2**attempt), at most max_wait_s
    assert p.delay(0) == 0.5 and p.delay(2) == 2.0 and p.delay(6) == 10
    asked = httpx.Response(503, headers={"Retry-After": "3"})
    assert p.delay(0, asked) == 3 and p.delay(3, asked) == 4.0
    assert p.delay(0, httpx.Response(429, headers={"Retry-After": "99"})) == 10
    assert p.delay(1, httpx.Response(503, headers={"Retry-After": "soon"})) == 1.0
    assert p.next_wait(3, safe=True, response=asked) is None  # retries spent
    assert p.next_wait(2, safe=False, response=asked) is None  # not safe to repeat
    assert p.next_wait(2, safe=True, response=asked) == 3


def test_which_routes_are_safe_to_repeat() -> None:
    c = Client("http://tcm", "k", transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    safe = {
        "list_models": (),
        "get_item": ("i",),
        "delete_item": ("i",),
        "delete_tenant": ("t",),
        "match": (),
        "verify": ({"item_id": "a"}, {"item_id": "b"}),
        "embed": (["AAAA"],),
        "stage_model": ("/a",),
        "feedback": ("m",),
        "revoke_key": ("t", "k"),
        # every enrolment carries an Idempotency-Key: a resend gets the first answer
        "enrol": ([{"subject": "s"}],),
        "enrol_raw": ([{"subject": "s"}],),
        "enrol_columns": (np.ones((1, 2)), ["s"]),
        "match_batch": (np.ones((2, 2)),),
        "remeasure_reference": (),
    }
    kwargs: dict[str, dict[str, Any]] = {"match": {"embedding": [1.0]}}
    for name, args in safe.items():
        assert getattr(Client, name).build(c, *args, **kwargs.get(name, {})).safe, name
    creates = {
        "create_tenant": ("n",),
        "issue_key": ("t",),
        "activate_model": ("v",),
        "rollback_model": (),
    }
    for name, args in creates.items():
        assert not getattr(Client, name).build(c, *args).safe, name
    assert Client.enrol_upload.build(c, b"x", subject="s").safe
    one = Client.enrol.build(c, [{"subject": "s"}])
    assert (
        one.headers["Idempotency-Key"]
        != Client.enrol.build(c, [{"subject": "s"}]).headers["Idempotency-Key"]
    )  # a fresh key per call
    assert Client.put_item.build(c, "i", subject="s", embedding=[1.0]).safe
    c.close()


def test_a_write_is_safe_to_repeat_when_it_carries_an_idempotency_key() -> None:
    """The policy's rule for writes: a POST is repeated only with an ``Idempotency-Key`` (or
    when its route declares it safe); reads, PUT and DELETE by method."""
    safe = RetryPolicy.safe_to_repeat
    assert not safe("POST") and not safe("POST", {"X-Other": "1"})
    assert safe("POST", {"Idempotency-Key": "k"}) and safe("POST", {"idempotency-key": "k"})
    assert safe("POST", declared=True) and not safe("GET", declared=False)
    assert safe("GET") and safe("PUT") and safe("DELETE") and not safe("PATCH")


# --- sync client on a real socket ----------------------------------------------------------
def test_503_with_retry_after_is_retried_then_answered(srv: Scripted) -> None:
    srv.script(unavailable("0"), unavailable("3"), Answer(200, REGISTRY))
    waits = Waits()
    with client(srv, waits, backoff_s=0.25) as tcm:
        assert tcm.list_models().served == "v1"
        assert tcm.retried == 2
    assert [s.method for s in srv.seen] == ["GET"] * 3
    assert {s.authorization for s in srv.seen} == {"Bearer tok"}
    assert waits == [0.25, 3.0]  # backoff (longer than Retry-After: 0), then Retry-After: 3


def test_retries_end_in_the_last_answer(srv: Scripted) -> None:
    srv.script(*[unavailable(None)] * 3)
    waits = Waits()
    with client(srv, waits, retries=2, backoff_s=0.1) as tcm, pytest.raises(ApiError) as err:
        tcm.get_item("i1")
    assert err.value.status == 503 and err.value.code == "store_unavailable"
    assert len(srv.seen) == 3 and waits == [0.1, 0.2]


def test_a_post_that_creates_is_not_retried_after_503(srv: Scripted) -> None:
    waits = Waits()
    with client(srv, waits) as tcm:
        for send in (
            lambda: tcm.create_tenant("n"),
            lambda: tcm.rollback_model(),
            lambda: tcm.activate_model("v2"),
        ):
            srv.script(unavailable("0"), Answer(201, TENANT))
            with pytest.raises(ApiError) as err:
                send()
            assert err.value.status == 503
            assert len(srv.seen) == 1  # sent once: the server may have acted on it
    assert waits == [] and tcm.retried == 0


def test_an_enrolment_is_retried_with_its_idempotency_key(srv: Scripted) -> None:
    items = [{"subject": "s", "embedding_b64": "AACAPw==", "item_id": "i0"}]
    srv.script(unavailable("0"), Answer(drop=True), Answer(201, {"item_ids": ["i0"]}))
    waits = Waits()
    with client(srv, waits, backoff_s=0) as tcm:
        assert tcm.enrol_raw(items) == ["i0"]
    assert len(srv.seen) == 3 and len({s.body for s in srv.seen}) == 1  # the same request
    assert json.loads(srv.seen[0].body) == {"items": items}  # sent untouched


def test_429_is_retried_for_every_request(srv: Scripted) -> None:
    srv.script(unavailable("0", status=429), Answer(201, TENANT))
    waits = Waits()
    with client(srv, waits, backoff_s=0) as tcm:
        assert tcm.create_tenant("n").tenant_id == "t1"  # refused, so nothing was created
    assert [s.method for s in srv.seen] == ["POST", "POST"] and waits == [0]


def test_a_lost_answer_is_retried_only_when_safe(srv: Scripted) -> None:
    waits = Waits()
    with client(srv, waits, backoff_s=0) as tcm:
        srv.script(Answer(drop=True), Answer(201, TENANT))
        with pytest.raises(TransportFailure) as lost:
            tcm.create_tenant("n")
        assert len(srv.seen) == 1
        # wrapped, the original kept: sent (the server may have acted), one attempt
        assert isinstance(lost.value.__cause__, httpx.RemoteProtocolError)
        assert isinstance(lost.value, ClientError) and not isinstance(lost.value, ApiError)
        assert lost.value.sent and lost.value.attempts == 1
        assert lost.value.method == "POST" and lost.value.url == f"{srv.base}/v1/tenants"
        srv.script(Answer(drop=True), Answer(200, {"tenants": []}))
        assert tcm.list_tenants() == []
        assert len(srv.seen) == 2


def nothing_listening() -> str:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_connect_error_is_retried_for_every_request() -> None:
    waits = Waits()
    with (
        Client(nothing_listening(), "k", retries=3, backoff_s=0.1, sleep=waits) as tcm,
        pytest.raises(TransportFailure) as failed,
    ):
        tcm.create_tenant("n")  # never sent: safe to send again even though it creates
    assert waits == [0.1, 0.2, 0.4] and tcm.retried == 3
    assert isinstance(failed.value.__cause__, httpx.ConnectError)
    assert not failed.value.sent and failed.value.attempts == 4
    assert not failed.value.earlier_attempt_may_have_acted
    assert "it was not sent" in str(failed.value) and "4 attempts" in str(failed.value)


def test_raw_is_the_answer_as_sent(srv: Scripted) -> None:
    srv.script(Answer(200, REGISTRY), Answer(200, REGISTRY), Answer(204))
    with client(srv, Waits()) as tcm:
        raw = tcm.list_models.raw()
        assert list(raw) == list(REGISTRY) and raw == REGISTRY
        assert isinstance(tcm.list_models(), m.ModelRegistry)
        assert tcm.delete_item.raw("i") is None


def test_a_redirect_is_an_error_not_an_answer(srv: Scripted) -> None:
    srv.script(Answer(301, None, {"Location": "https://elsewhere/"}))
    with client(srv, Waits()) as tcm, pytest.raises(ApiError) as err:
        tcm.delete_item("i")
    assert err.value.status == 301 and len(srv.seen) == 1


# --- async client: the same policy -------------------------------------------------------------
def test_async_client_follows_the_same_policy(srv: Scripted) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def run() -> None:
        async with AsyncClient(srv.base, "tok", backoff_s=0.5, sleep=sleep) as tcm:
            srv.script(unavailable("0"), Answer(200, {"tenants": []}))
            assert await tcm.list_tenants() == []
            assert len(srv.seen) == 2
            srv.script(unavailable("0"), Answer(201, TENANT))
            with pytest.raises(ApiError):
                await tcm.create_tenant("n")
            assert len(srv.seen) == 1
            srv.script(Answer(200, REGISTRY))
            assert list(await tcm.list_models.raw()) == list(REGISTRY)

    asyncio.run(run())
    assert waits == [0.5]


# --- built on it: the importer and the CLI -----------------------------------------------------
def batch(n: int = 3) -> Batch:
    return Batch(
        10, [{"subject": "s", "item_id": f"x-{i}", "embedding_b64": "AACAPw=="} for i in range(n)]
    )


def duplicate(ids: list[str]) -> Answer:
    return Answer(
        409, {"code": "duplicate_item_id", "message": "exists", "detail": {"item_ids": ids}}
    )


def test_importer_batches_are_retried_and_a_resent_one_counts_as_already(srv: Scripted) -> None:
    b = batch()
    waits = Waits()
    with client(srv, waits, backoff_s=0) as tcm:
        srv.script(unavailable("0"), Answer(201, {"item_ids": b.item_ids}))
        assert send_batch(tcm, b) == "stored"
        assert len(srv.seen) == 2 and srv.seen[0].body == srv.seen[1].body
        # the answer of a stored batch is lost: the resent batch is refused for its own ids
        srv.script(Answer(drop=True), duplicate(b.item_ids))
        assert send_batch(tcm, b) == "already"
        srv.script(duplicate(["x-0", "other"]))
        with pytest.raises(ImportError_, match="2 item ids exist already"):
            send_batch(tcm, b)
        srv.script(
            Answer(
                422,
                {"code": "invalid_input", "message": "items[1].embedding_b64: bad", "detail": None},
            )
        )
        with pytest.raises(ImportError_, match=r"row 11 \(item id 'x-1'\)"):
            send_batch(tcm, b)
        srv.script(*[unavailable("0")] * 5)
        with pytest.raises(ImportError_, match="503 store_unavailable: down"):
            send_batch(tcm, b)
    assert len(srv.seen) == 5  # retries=4: five attempts


def test_importer_cannot_reach_the_service() -> None:
    with (
        Client(nothing_listening(), "k", retries=1, backoff_s=0, sleep=Waits()) as tcm,
        pytest.raises(ImportError_, match="cannot reach the service"),
    ):
        send_batch(tcm, batch())


def test_importer_a_409_on_a_batch_never_sent_before_is_refused(srv: Scripted) -> None:
    """Issue 25 item 9: a 409 naming exactly a batch's ids at its first attempt, in a run that
    never sent that batch, is about someone else's items: an error naming them (before: counted
    "already stored", exit 0, nothing written). After a 429 (nothing done) the same; after a 503
    or a lost answer it may be the batch's own first attempt: "already"; so is a batch that an
    interrupted run sent (``resent``), unless the 409 names other ids."""
    b = batch()
    rate_limited = Answer(429, {"code": "rate_limited", "message": "slow"}, {"Retry-After": "0"})
    with client(srv, Waits(), backoff_s=0) as tcm:
        srv.script(duplicate(b.item_ids))
        with pytest.raises(ImportError_, match="never sent before") as info:
            send_batch(tcm, b)
        assert "3 item ids exist already" in str(info.value) and "x-0" in str(info.value)
        assert not info.value.resumable  # running it again would fail the same way
        srv.script(rate_limited, duplicate(b.item_ids))
        with pytest.raises(ImportError_, match="never sent before"):
            send_batch(tcm, b)
        srv.script(unavailable("0"), duplicate(b.item_ids))
        assert send_batch(tcm, b) == "already"
        srv.script(duplicate(b.item_ids))
        assert send_batch(tcm, b, resent=True) == "already"
        srv.script(duplicate(["x-0"]))
        with pytest.raises(ImportError_, match="1 item ids exist already"):
            send_batch(tcm, b, resent=True)
        # a batch repeating an id is refused before sending
        srv.script()
        twice = Batch(5, [*b.items, b.items[0]])
        with pytest.raises(ImportError_, match=r"rows 5\.\.8 repeat item ids \(\['x-0'\]\)"):
            send_batch(tcm, twice)
        assert srv.seen == []


def test_api_error_says_whether_an_earlier_attempt_may_have_acted(srv: Scripted) -> None:
    """``ApiError.attempts`` and ``.earlier_attempt_may_have_acted`` (sync and async): a 429 or
    a connect error did nothing; a 503 or a lost answer may have."""
    conflict = Answer(409, {"code": "duplicate_item_id", "message": "exists", "detail": None})
    rate_limited = Answer(429, {"code": "rate_limited", "message": "slow"}, {"Retry-After": "0"})
    item = [{"subject": "s", "item_id": "a", "embedding_b64": "AACAPw=="}]
    cases = [
        ((), 1, False),
        ((rate_limited,), 2, False),
        ((rate_limited, unavailable("0")), 3, True),
        ((Answer(drop=True), rate_limited), 3, True),
    ]
    for before, attempts, acted in cases:
        srv.script(*before, conflict)
        with client(srv, Waits(), backoff_s=0) as tcm, pytest.raises(ApiError) as info:
            tcm.enrol_raw(item)
        assert (info.value.attempts, info.value.earlier_attempt_may_have_acted) == (
            attempts,
            acted,
        ), before

        async def enrol() -> ApiError:
            async def no_wait(_: float) -> None:
                pass

            async with AsyncClient(srv.base, "tok", backoff_s=0, sleep=no_wait) as tcm:
                with pytest.raises(ApiError) as info:
                    await tcm.enrol_raw(item)
            return info.value

        srv.script(*before, conflict)
        error = asyncio.run(enrol())
        assert (error.attempts, error.earlier_attempt_may_have_acted) == (attempts, acted)


def test_cli_admin_calls_print_the_answer_as_sent(srv: Scripted) -> None:
    env = {"TCM_ADMIN_TOKEN": "adm", "COLUMNS": "200"}
    srv.script(Answer(200, REGISTRY))
    result = CliRunner().invoke(app, ["models", "list", "--url", srv.base], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout == json.dumps(REGISTRY, indent=2) + "\n"
    assert srv.seen[0].authorization == "Bearer adm" and srv.seen[0].path == "/v1/models"

    # rollback creates an activation: a 503 is not retried (exactly one request), exit code 1
    srv.script(unavailable("0"), Answer(202, {"version": "v0", "state": "x", "kind": "y"}))
    result = CliRunner().invoke(
        app, ["models", "rollback", "--no-wait", "--url", srv.base], env=env
    )
    assert result.exit_code == 1 and len(srv.seen) == 1
    assert "503 store_unavailable: down" in result.output

    # staging the same path twice is the same version: retried
    version = {
        "model_version": "v2",
        "path": "/a",
        "active": False,
        "embedding_dim": 4,
        "threshold": 0.5,
    }
    srv.script(unavailable("0"), Answer(201, version))
    result = CliRunner().invoke(app, ["models", "stage", "/a", "--url", srv.base], env=env)
    assert result.exit_code == 0, result.output
    assert [json.loads(s.body) for s in srv.seen] == [{"path": "/a"}] * 2
    assert json.loads(result.stdout) == version

    result = CliRunner().invoke(
        app, ["models", "list", "--url", srv.base], env={"TCM_ADMIN_TOKEN": ""}
    )
    assert result.exit_code == 2 and "set TCM_ADMIN_TOKEN" in result.output
