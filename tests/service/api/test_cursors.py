"""Listing cursors are parsed strictly, on both stores.

Regression (issue 15): ``cursor=9999999999999999999`` overflowed SQLite's 64-bit integers and
``cursor=²`` passed ``str.isdigit`` and then failed ``int``: both were 500s.
"""

from __future__ import annotations

import pytest

from service.domain.gallery import MAX_CURSOR, parse_cursor
from tests.service.conftest import Api, unit

BAD = [
    "9999999999999999999",
    "²",
    "١٢",
    "-1",
    "+1",
    "1e3",
    " 1",
    "1 ",
    "1\n",
    "0x10",
    "",
    "1.0",
    "99999999999999999999",
    str(MAX_CURSOR + 1),
    "𝟏",
]


@pytest.mark.parametrize("cursor", BAD)
def test_bad_cursors_are_422(api: Api, cursor: str) -> None:
    t = api.new_tenant()
    for params in ({"cursor": cursor}, {"cursor": cursor, "subject": "s"}):
        r = api.client.get("/v1/gallery", params=params, headers=t.auth)
        assert r.status_code == 422, (cursor, r.status_code, r.text)
        assert r.json()["code"] == "invalid_cursor"


def test_cursors_in_range_page_through(api: Api) -> None:
    t = api.new_tenant()
    ids = api.enrol(t, [{"subject": "s", "embedding": unit(i)} for i in range(5)])
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api.client.get("/v1/gallery", params=params, headers=t.auth).json()
        seen += [i["item_id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    for edge in ("0", "00", str(MAX_CURSOR)):
        r = api.client.get("/v1/gallery", params={"cursor": edge}, headers=t.auth)
        assert r.status_code == 200, (edge, r.text)
    assert (
        api.client.get("/v1/gallery", params={"cursor": str(MAX_CURSOR)}, headers=t.auth).json()[
            "items"
        ]
        == []
    )


def test_parse_cursor() -> None:
    assert parse_cursor("0") == 0
    assert parse_cursor(str(MAX_CURSOR)) == 2**63 - 1
    for bad in BAD:
        with pytest.raises(Exception, match="cursor"):
            parse_cursor(bad)
