"""The metadata value domain, and exact-match metadata filters.

**Domain.** Metadata is a JSON object whose numbers are finite float64 values (an integer too
large for a double, e.g. one of 400 digits, is refused: no store, index or client can hold it
as a number) with at most :data:`MAX_METADATA_KEYS` top-level keys (each top-level key costs
index memory: it becomes a filter posting). :func:`domain_problem` names the first value outside
the domain, with its path; the request schemas refuse such metadata with a 422 before anything
is stored.

**Filters.** A filter is ``{key: value}`` over an item's top-level metadata keys, values being
JSON scalars (string, number, boolean, null); an item matches when every key is present with an
equal value. Equality is JSON's, not Python's: numbers compare as numbers (``1`` equals
``1.0``), but ``true`` is not ``1`` and ``"1"`` is not ``1``. Values are compared through one
canonical text (:func:`canonical`), which is also the key of the index's postings
(``service.engine.index``), so the filtered search and the brute-force :func:`matches` agree by
construction. :func:`canonical` is total: a stored value outside the domain (written before the
domain was enforced) is simply not filterable, never an exception that could stop an index
rebuild or the change feed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

MAX_METADATA_KEYS = 64
# what a filter can ask for (service.api.schemas.MetadataFilter): longer keys or string values are
# never indexed, since no filter could name them
MAX_FILTER_KEY_CHARS = 256
MAX_FILTER_STRING_CHARS = 1024


def _float64(value: int) -> float | None:
    """The integer as a double, or None when it is outside float64's range."""
    try:
        return float(value)
    except OverflowError:
        return None


def canonical(value: Any) -> str | None:
    """The canonical text of a scalar JSON value; None for objects, arrays, non-finite numbers
    and integers beyond float64's range (not filterable). Never raises."""
    if value is None or isinstance(value, bool | str):
        return json.dumps(value)
    if isinstance(value, int):
        if abs(value) <= 2**53:
            return str(value)
        as_float = _float64(value)
        return None if as_float is None else canonical(as_float)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() and abs(value) <= 2**53 else repr(value)
    return None


def terms(metadata: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, canonical value) of every top-level entry a filter could name."""
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > MAX_FILTER_KEY_CHARS:
            continue
        if isinstance(value, str) and len(value) > MAX_FILTER_STRING_CHARS:
            continue
        c = canonical(value)
        if c is not None:
            yield key, c


def filter_terms(where: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, value in where.items():
        c = canonical(value)
        if c is None:
            raise ValueError(f"filter value of {key!r} is not a JSON scalar within float64's range")
        out.append((key, c))
    return out


def matches(metadata: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    """Whether an item with this metadata passes the filter (the brute-force rule)."""
    return all(key in metadata and canonical(metadata[key]) == c for key, c in filter_terms(where))


def _path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if key.isidentifier() else f"{parent}[{json.dumps(key)}]"


def number_problem(value: Any) -> str | None:
    """Why a JSON number is outside the domain (None when it is inside, or not a number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and _float64(value) is None:
        digits = len(str(abs(value)))
        return (
            f"the integer of {digits} digits is beyond float64's range (about ±1.8e308); "
            "metadata numbers must be finite doubles (send it as a string)"
        )
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN and infinite numbers are not JSON; metadata numbers must be finite"
    return None


def domain_problem(metadata: Mapping[str, Any], *, where: str = "metadata") -> str | None:
    """The first value of ``metadata`` outside the domain, as ``"<path>: <why>"``; None when
    all of it is inside. Iterative (the depth limit is checked elsewhere, after this)."""
    if len(metadata) > MAX_METADATA_KEYS:
        return (
            f"{where}: {len(metadata)} top-level keys, the limit is {MAX_METADATA_KEYS} "
            "(nest related fields in an object: each top-level key is indexed for filters)"
        )
    stack: list[tuple[str, Any]] = [(where, metadata)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend((_path(path, str(k)), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list | tuple):
            stack.extend((_path(path, i), v) for i, v in reversed(list(enumerate(value))))
        else:
            problem = number_problem(value)
            if problem is not None:
                return f"{path}: {problem}"
    return None
