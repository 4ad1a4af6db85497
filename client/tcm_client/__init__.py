"""A typed Python client of the tcm-serve v1 API (sync and async, on httpx).

    from tcm_client import Client
    with Client("http://127.0.0.1:8000", api_key) as tcm:
        tcm.enrol([{"subject": "alice", "embedding": vector}])
        result = tcm.match(embedding=vector, k=5, filter={"site": "paris"})

What is retried, when and how long it waits is one :class:`RetryPolicy` (``client.policy``):
only what is safe to repeat is sent again after the server may have acted on it.

Separate from ``service`` (it imports httpx, pydantic and numpy only): install it alone with
the ``client`` extra.
"""

from tcm_client.client import ApiError, AsyncClient, Client, RetryPolicy, retry_after
from tcm_client.models import *  # noqa: F403

__all__ = ["ApiError", "AsyncClient", "Client", "RetryPolicy", "retry_after"]
