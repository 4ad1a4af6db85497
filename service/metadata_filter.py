"""Exact-match metadata filters: which gallery items a filtered match or verify may return.

A filter is ``{key: value}`` over an item's top-level metadata keys, values being JSON scalars
(string, number, boolean, null); an item matches when every key is present with an equal value.
Equality is JSON's, not Python's: numbers compare as numbers (``1`` equals ``1.0``), but
``true`` is not ``1`` and ``"1"`` is not ``1``. Values are compared through one canonical text
(:func:`canonical`), which is also the key of the index's postings (``service.index``), so the
filtered search and the brute-force :func:`matches` agree by construction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any


def canonical(value: Any) -> str | None:
    """The canonical text of a scalar JSON value; None for objects, arrays and non-finite
    numbers (not filterable)."""
    if value is None or isinstance(value, bool | str):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if abs(value) <= 2**53 else canonical(float(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() and abs(value) <= 2**53 else repr(value)
    return None


def terms(metadata: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, canonical value) of every filterable top-level entry."""
    for key, value in metadata.items():
        c = canonical(value)
        if c is not None:
            yield key, c


def filter_terms(where: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, value in where.items():
        c = canonical(value)
        if c is None:
            raise ValueError(f"filter value of {key!r} is not a JSON scalar")
        out.append((key, c))
    return out


def matches(metadata: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    """Whether an item with this metadata passes the filter (the brute-force rule)."""
    return all(key in metadata and canonical(metadata[key]) == c for key, c in filter_terms(where))
