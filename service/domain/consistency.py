"""Read-your-writes across replicas: a gallery write's **consistency token**.

Each replica's indexes follow the store's change feed, so an item enrolled through one replica
reaches another's index a few milliseconds later (``docs/reliability.md``). A client that must
find its own write on whichever replica answers next sends the token of that write back:

- every successful gallery write answers ``X-Consistency-Token: <feed position>``, the feed's
  position right after the write (so at or past the write's own entry);
- a match or verify carrying ``X-Consistency-Token`` waits until the answering replica's indexes
  reflect the feed up to that position (``IndexSync.caught_up``), at most
  ``TCM_CONSISTENCY_WAIT_MS``, else 503 ``not_caught_up`` with ``Retry-After``.

With the embedded SQLite store one process holds every write: no token is issued and every
well-formed token is already met. The token is only compared (``Store.feed_covers``), never put
into a key or a query.

The write's token travels from the domain code that wrote to the HTTP response through a
per-request box (:func:`token_box`, opened by ``service.api.consistency``'s middleware), so
that every write path (enrol, columns, upload, put, delete) sets it in one place,
``IndexSync.written``.
"""

from __future__ import annotations

from contextvars import ContextVar

HEADER = "X-Consistency-Token"
# a feed position of the Redis store: "<ms>-<seq>" (as Redis writes stream ids, "<ms>" alone
# meaning "<ms>-0"), optionally "#<entries added>"
TOKEN_PATTERN = r"^[0-9]{1,20}(-[0-9]{1,20})?(#[0-9]{1,20})?$"

_box: ContextVar[dict[str, str] | None] = ContextVar("consistency_token_box", default=None)


def open_box() -> dict[str, str]:
    """A fresh box for this request's write token (the middleware opens one per request)."""
    box: dict[str, str] = {}
    _box.set(box)
    return box


def record(token: str | None) -> None:
    """Puts a write's token in the current request's box (if any; a write outside a request,
    e.g. an import, has none)."""
    box = _box.get()
    if box is not None and token is not None:
        box["token"] = token
