"""A typed Python client of the tcm-serve v1 API (sync and async, on httpx).

    from tcm_client import Client
    with Client("http://127.0.0.1:8000", api_key) as tcm:
        tcm.enrol([{"subject": "alice", "embedding": vector}])   # base64 float32 on the wire
        tcm.upload(matrix, subjects, parallel=2, progress=True)  # many items, resumable
        result = tcm.match(embedding=vector, k=5, filter={"site": "paris"})
        results = tcm.match_batch(queries)                      # one request, many queries
        tcm.match(image="photo.jpg")                             # bytes, a path, PIL, base64

What is retried, when and how long it waits is one :class:`RetryPolicy` (``client.policy``):
only what is safe to repeat is sent again after the server may have acted on it. Every error
about a request is a :class:`ClientError`: :class:`ApiError` (an error answer) or
:class:`TransportFailure` (no answer; httpx's exception is its ``__cause__``).

Its own distribution (``client/``: httpx, pydantic and numpy; no torch): ``pip install
./client`` from a checkout.
"""

from tcm_client.client import (
    ApiError,
    AsyncClient,
    Client,
    ClientError,
    RetryPolicy,
    TransportFailure,
    retry_after,
)
from tcm_client.models import *  # noqa: F403
from tcm_client.upload import UploadError, UploadResult, item_id_for

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "ClientError",
    "RetryPolicy",
    "TransportFailure",
    "UploadError",
    "UploadResult",
    "item_id_for",
    "retry_after",
]
