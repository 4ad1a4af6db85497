"""The one shape of every id the API takes, and how ids are made safe where they meet a store.

Tenant ids, key ids, item ids, subjects, match ids and model versions all match ``ID_PATTERN``:
1-128 characters, ASCII letters, digits, ``. _ @ -`` and the space, starting with a letter or
digit and not ending with a space. The service's own ids (uuid4 hex, 16-hex key ids,
``<dataset>-<arch>-...`` model versions) fit it; so do e-mail-like subjects and names such as
``Cactus Wren``. It has no ``/`` (ids are URL path segments), no ``:`` (the Redis key
separator), no glob characters, no whitespace but the space (no tab, newline or other control
character), no leading or trailing space (``"Wren"`` and ``"Wren "`` would look alike), and
cannot be ``.`` or ``..``.

The space is safe where ids go: it is a plain byte in a Redis key and in a ``SCAN MATCH``
pattern (not a glob character), a bound parameter in SQLite, a string in FAISS's metadata, and
``%20`` in a URL path (``tcm_client`` quotes every path segment).

The API refuses anything else with a 422 at its boundary (path, query and body). The stores do
not rely on that: :func:`key_part` encodes what would make a Redis key ambiguous, and
:func:`glob_escape` escapes every character that is special in a ``SCAN MATCH`` pattern, so a
bug upstream cannot turn an id into a pattern that matches another tenant's keys.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Path, Query
from pydantic import StringConstraints

ID_MAX_LENGTH = 128
ID_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._@ -]{0,126}[A-Za-z0-9._@-])?$"
ID_RULE = (
    "1-128 characters: ASCII letters, digits, '.', '_', '@', '-' and spaces, starting with a "
    "letter or digit, not ending with a space"
)

# a request or response body field; FastAPI path and query parameters
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
IdPath = Annotated[
    str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN, description=ID_RULE)
]
IdQuery = Annotated[
    str | None,
    Query(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN, description=ID_RULE),
]

_GLOB_SPECIAL = frozenset("*?[]\\")


def glob_escape(text: str) -> str:
    """``text`` as a Redis glob (``SCAN MATCH``, ``KEYS``) that matches exactly ``text``: each
    of ``* ? [ ] \\`` gets a backslash (Redis' ``stringmatchlen`` treats ``\\x`` as a literal
    ``x`` everywhere, inside brackets too)."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def key_part(text: str) -> str:
    """``text`` as one ``:``-separated segment of a Redis key: ``%`` and ``:`` are
    percent-encoded, so no id can reach into another key's segments (``T:items`` as a tenant id
    would otherwise name tenant ``T``'s item set). Injective, and the identity for every id
    matching ``ID_PATTERN`` (so keys written before this encoding existed are unchanged)."""
    if "%" not in text and ":" not in text:
        return text
    return text.replace("%", "%25").replace(":", "%3A")


def key_part_decode(part: str) -> str:
    """The inverse of :func:`key_part`."""
    if "%" not in part:
        return part
    return re.sub(r"%(25|3A)", lambda m: "%" if m.group(1) == "25" else ":", part)
