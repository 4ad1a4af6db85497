"""A write whose reply is lost on the way back (tests/faultproxy.py, ``Cut(lose_reply_after=n)``
with ``n`` the bytes of the whole exchange) was applied once; the store must then report it as
done or as unknown (StoreUnavailableError), never as not done, and never apply it again.
add_items gets this right (tests/service/store/test_bulk_enrol.py); the model registry's
compare-and-set did not (redis-py resent it after the lost reply, the resend saw its own write
as a lost race, and the change was applied twice): it now recognises its own write."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from service.domain import model_registry as reg
from service.domain.model_registry import ModelRegistry
from service.errors import StoreUnavailableError
from service.store.redis_store import RedisStore
from tests.faultproxy import Cut, FaultProxy
from tests.service.conftest import REDIS_URL, redis_cleanup

pytestmark = pytest.mark.redis


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    url = urlsplit(REDIS_URL)
    with FaultProxy((url.hostname or "127.0.0.1", url.port or 6379), record=True) as p:
        yield p


def through(proxy: FaultProxy) -> str:
    """REDIS_URL (credentials, database) with the proxy's address."""
    url = urlsplit(REDIS_URL)
    userinfo = url.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@" if userinfo else ""
    return url._replace(netloc=f"{netloc}{proxy.host}:{proxy.port}").geturl()


@pytest.fixture
def prefixes() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for p in made:
        redis_cleanup(REDIS_URL, p)


def new_prefix(prefixes: list[str]) -> str:
    prefixes.append(f"tcmtest:{uuid.uuid4().hex}:")  # the same length: the same bytes sent
    return prefixes[-1]


def start_activation(doc: reg.Doc) -> reg.Doc:
    return reg.begin(doc, "v2", kind="activate", owner="replica-a", now=2.0)


def test_a_lost_registry_reply_is_not_a_conflict_with_itself(
    proxy: FaultProxy, prefixes: list[str]
) -> None:
    start = {**reg.empty(), "versions": {"v1": {}, "v2": {}}, "active": "v1"}

    def setup() -> tuple[RedisStore, RedisStore]:
        prefix = new_prefix(prefixes)
        direct = RedisStore(REDIS_URL, prefix=prefix)
        assert direct.put_model_registry(start, expected_rev=0)
        return direct, RedisStore(through(proxy), prefix=prefix, timeout_s=2.0)

    # a clean run: its one connection's bytes are the handshake, HMGET, the EVAL
    direct, store = setup()
    ModelRegistry(store).update(start_activation)
    store.close()
    direct.close()
    proxy.wait_closed()
    (clean,) = proxy.connections

    direct, store = setup()
    proxy.arm(Cut(lose_reply_after=clean.upstream), connections=1)
    try:
        try:
            doc = ModelRegistry(store).update(start_activation)
        except StoreUnavailableError:
            doc = None  # unknown to the caller: acceptable
        assert proxy.connections[1].was_cut  # the EVAL's reply was lost
        stored, rev = direct.get_model_registry()
        assert rev == 2 and stored is not None  # the compare-and-set was applied once
        assert stored["activation"]["owner"] == "replica-a"
        assert doc is None or doc == stored
    finally:
        store.close()
        direct.close()
