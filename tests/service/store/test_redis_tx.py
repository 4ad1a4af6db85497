"""A transaction whose connection dies is a 503 (store unavailable), not a 409 conflict.

redis-py turns a connection lost while keys are WATCHed into a WatchError; the store must not
report that as a concurrent update (found by tests/service/test_faults.py killing Redis).
"""

from __future__ import annotations

import uuid

import pytest
import redis

from service.errors import ConflictError, StoreUnavailableError
from service.store.redis_store import RedisStore
from tests.service.conftest import REDIS_URL, redis_cleanup

pytestmark = pytest.mark.redis


@pytest.fixture
def store():
    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    s = RedisStore(REDIS_URL, prefix=prefix, timeout_s=1.0)
    other = redis.Redis.from_url(REDIS_URL)
    try:
        yield s, other, prefix
    finally:
        s.close()
        other.close()
        redis_cleanup(REDIS_URL, prefix)


def test_lost_connection_during_a_watched_write_is_unavailable(store) -> None:
    s, other, prefix = store
    key = prefix + "k"

    def body(pipe):
        pipe.get(key)  # immediate mode under WATCH
        my_id = pipe.client_id()
        other.client_kill_filter(_id=my_id)  # the server drops this connection
        pipe.multi()
        pipe.set(key, "v")

    with pytest.raises(StoreUnavailableError, match="connection was lost"):
        s._tx("test write", [key], body)


def test_a_real_concurrent_change_is_still_a_conflict(store) -> None:
    s, other, prefix = store
    key = prefix + "k"

    def body(pipe):
        pipe.get(key)
        other.set(key, "changed by someone else")
        pipe.multi()
        pipe.set(key, "v")

    with pytest.raises(ConflictError):
        s._tx("test write", [key], body)
    assert other.get(key) == b"changed by someone else"
