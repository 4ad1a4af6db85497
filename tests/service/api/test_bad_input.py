"""Every kind of bad input gets a clear 4xx in the one error shape, never a 500."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from httpx import Response
from PIL import Image

from service.api.body_limit import BodySizeLimitMiddleware
from tests.service.conftest import DIM, Api, Digits, Tenant, b64, b64_png, png_bytes, unit


def assert_error(r: Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "detail"}, body
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["code"] == code, body
    return body


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    data = bytearray(png_bytes(np.zeros((4, 4), np.uint8)))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture
def enrolled(api: Api, tenant: Tenant) -> Tenant:
    api.enrol(tenant, [{"subject": "s", "embedding": unit(1), "item_id": "i1"}])
    return tenant


def test_bad_embeddings(api: Api, enrolled: Tenant) -> None:
    c, h = api.client, enrolled.auth
    for bad in ([0.1] * (DIM - 1), [0.1] * (DIM + 1), [0.0] * DIM):
        for path, body in (
            ("/v1/match", {"embedding": bad}),
            ("/v1/gallery", {"items": [{"subject": "s", "embedding": bad}]}),
            ("/v1/verify", {"a": {"embedding": bad}, "b": {"item_id": "i1"}}),
        ):
            err = assert_error(c.post(path, json=body, headers=h), 422, "invalid_embedding")
            assert "dimension" in err["message"] or "zero" in err["message"]
    assert_error(c.post("/v1/match", json={"embedding": []}, headers=h), 422, "invalid_input")
    # NaN and Infinity are not JSON, but Python's parser accepts them: they must not get through
    for token in ("NaN", "Infinity", "-Infinity"):
        raw = '{"embedding": [' + ", ".join([token] + ["0.1"] * (DIM - 1)) + "]}"
        r = c.post("/v1/match", content=raw, headers=h | {"content-type": "application/json"})
        assert_error(r, 422, "invalid_input")
    for bad_value in ('"abc"', "null", "[1]", "{}"):
        raw = '{"embedding": [' + ", ".join([bad_value] + ["0.1"] * (DIM - 1)) + "]}"
        r = c.post("/v1/match", content=raw, headers=h | {"content-type": "application/json"})
        assert_error(r, 422, "invalid_input")
    # huge but finite values are fine: only the direction matters
    r = c.post("/v1/match", json={"embedding": [1e308] + [0.0] * (DIM - 1)}, headers=h)
    assert r.status_code == 200


def test_bad_images(api: Api, tenant: Tenant, digits: Digits) -> None:
    c, h = api.client, tenant.auth
    good = png_bytes(digits.images[0])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((600, 600), np.uint8)).save(buf, format="PNG")
    cases = {
        # refused by the schema's base64 pattern (the published contract says so)
        "not base64": ("!!!not base64!!!", "invalid_input"),
        "not an image": (b64(b"hello world, not an image"), "invalid_image"),
        "truncated png": (b64(good[: len(good) // 2]), "invalid_image"),
        "bomb": (b64(png_claiming_size(100_000, 100_000)), "image_too_large"),
        "too many pixels": (b64(buf.getvalue()), "image_too_large"),
        "empty after decoding": ("data:image/png;base64,", "invalid_input"),
    }
    for name, (data, code) in cases.items():
        for path, body in (
            ("/v1/match", {"image": data}),
            ("/v1/embed", {"images": [b64_png(digits.images[1]), data]}),
            ("/v1/gallery", {"items": [{"subject": "s", "image": data}]}),
            ("/v1/verify", {"a": {"image": data}, "b": {"embedding": unit(0)}}),
        ):
            err = assert_error(c.post(path, json=body, headers=h), 422)
            assert err["code"] == code, (name, path, err)
    # the offending image is named
    err = c.post("/v1/embed", json={"images": [b64_png(digits.images[1]), "!!"]}, headers=h).json()
    assert err["detail"][0]["loc"] == ["body", "images", 1]  # the schema's pattern refuses it
    err = c.post(
        "/v1/embed", json={"images": [b64_png(digits.images[1]), b64(b"hello")]}, headers=h
    ).json()
    assert err["detail"]["where"] == "images[1]"
    assert_error(c.post("/v1/match", json={"image": ""}, headers=h), 422, "invalid_input")
    # a data: URL prefix is accepted
    r = c.post("/v1/match", json={"image": "data:image/png;base64," + b64(good)}, headers=h)
    assert r.status_code == 200
    # uploads: empty, not an image, missing
    for files in (
        {"file": ("e.png", b"", "image/png")},
        {"file": ("t.txt", b"plain text", "text/plain")},
        {"file": ("b.png", png_claiming_size(50_000, 50_000), "image/png")},
    ):
        for path in ("/v1/match/upload", "/v1/embed/upload"):
            assert_error(c.post(path, files=files, headers=h), 422)
    assert_error(c.post("/v1/match/upload", data={"k": "1"}, headers=h), 422)
    assert_error(
        c.post(
            "/v1/gallery/upload",
            files={"file": ("a.png", good, "image/png")},
            data={"subject": "s", "metadata": "[1, 2]"},
            headers=h,
        ),
        422,
    )
    assert_error(
        c.post(
            "/v1/gallery/upload",
            files={"file": ("a.png", good, "image/png")},
            data={"subject": "a/b"},
            headers=h,
        ),
        422,
    )
    assert_error(
        c.post("/v1/verify/upload", files={"a": ("a.png", good, "image/png")}, headers=h), 422
    )


def test_k_out_of_range(api: Api, enrolled: Tenant, digits: Digits) -> None:
    c, h = api.client, enrolled.auth
    for k in (0, -1, api.settings.max_k + 1, 10**9):
        assert_error(c.post("/v1/match", json={"embedding": unit(0), "k": k}, headers=h), 422)
        up = c.post(
            "/v1/match/upload",
            data={"k": str(k)},
            headers=h,
            files={"file": ("a.png", png_bytes(digits.images[0]), "image/png")},
        )
        assert_error(up, 422)
    for k in ("abc", 1.5, None, True):
        r = c.post("/v1/match", json={"embedding": unit(0), "k": k}, headers=h)
        if k is True:  # pydantic's lax mode reads true as 1; still a valid k
            assert r.status_code in (200, 422)
            continue
        assert_error(r, 422, "invalid_input")
    r = c.post("/v1/match", json={"embedding": unit(0), "k": api.settings.max_k}, headers=h)
    assert r.status_code == 200 and len(r.json()["candidates"]) == 1


def test_malformed_and_mis_shaped_json(api: Api, enrolled: Tenant) -> None:
    c, h = api.client, enrolled.auth | {"content-type": "application/json"}
    for raw in ('{"embedding": [0.1, ', "not json", '{"a": 1,}', "\x00\x01"):
        assert_error(c.post("/v1/match", content=raw, headers=h), 400, "malformed_json")
    for body in ([1, 2, 3], "a string", 42, None, {}):
        r = c.post("/v1/match", content=json.dumps(body), headers=h)
        assert_error(r, 422, "invalid_input")
    assert_error(c.post("/v1/match", content=b"", headers=h), 422, "invalid_input")
    # unknown fields, both or neither of the alternatives
    for body in ({"embeding": unit(0)}, {"embedding": unit(0), "image": "aGVsbG8="}, {"k": 3}):
        assert_error(c.post("/v1/match", json=body, headers=enrolled.auth), 422, "invalid_input")
    for body in (
        {"a": {"embedding": unit(0)}},
        {"a": {"embedding": unit(0), "item_id": "i1"}, "b": {"item_id": "i1"}},
        {"a": {}, "b": {"item_id": "i1"}},
    ):
        assert_error(c.post("/v1/verify", json=body, headers=enrolled.auth), 422)
    for body in (
        {"match_id": "m"},
        {"match_id": "m", "true_subject": "s", "correct": True},
        {"match_id": "m", "correct": None},
        {"true_subject": "s"},
    ):
        assert_error(c.post("/v1/feedback", json=body, headers=enrolled.auth), 422)


def test_gallery_limits(api: Api, tenant: Tenant) -> None:
    c, h = api.client, tenant.auth
    n = api.settings.max_batch_items + 1
    r = c.post(
        "/v1/gallery",
        json={
            "items": [
                {"subject": "s", "embedding": unit(i)}
                for i in range(api.settings.max_enrol_items + 1)
            ]
        },
        headers=h,
    )
    assert_error(r, 422, "too_many_items")
    r = c.post(
        "/v1/gallery", json={"items": [{"subject": "s", "image": "aGVsbG8="}] * n}, headers=h
    )  # images count against the smaller limit
    assert_error(r, 422, "too_many_items")
    r = c.post("/v1/embed", json={"images": ["aGVsbG8="] * n}, headers=h)
    assert_error(r, 422, "too_many_items")
    assert_error(c.post("/v1/gallery", json={"items": []}, headers=h), 422)
    assert_error(c.post("/v1/embed", json={"images": []}, headers=h), 422)
    r = c.post(
        "/v1/gallery",
        headers=h,
        json={
            "items": [
                {"subject": "s", "embedding": unit(1), "item_id": "dup"},
                {"subject": "s", "embedding": unit(2), "item_id": "dup"},
            ]
        },
    )
    assert assert_error(r, 409, "duplicate_item_id")["detail"] == {"item_ids": ["dup"]}
    for item in (
        {"subject": "", "embedding": unit(1)},
        {"subject": "a/b", "embedding": unit(1)},
        {"subject": "s", "embedding": unit(1), "item_id": "x/y"},
        {"subject": "s", "embedding": unit(1), "item_id": "tab\there"},
        {"subject": "s" * 257, "embedding": unit(1)},
        {"subject": "s", "embedding": unit(1), "metadata": {"x": "y" * 20_000}},
        {"subject": "s", "embedding": unit(1), "metadata": [1, 2]},
        {"subject": "s", "embedding": unit(1), "extra": 1},
    ):
        assert_error(c.post("/v1/gallery", json={"items": [item]}, headers=h), 422)
    for params in (
        {"limit": 0},
        {"limit": 100_000},
        {"limit": "x"},
        {"cursor": "abc"},
        {"cursor": "-5"},
        {"cursor": "9" * 40},
    ):
        assert_error(c.get("/v1/gallery", params=params, headers=h), 422)
    assert_error(c.get("/v1/gallery/nope", headers=h), 404, "not_found")
    assert_error(c.delete("/v1/subjects/nobody", headers=h), 404, "not_found")
    # unknown routes and methods use the same shape
    assert_error(c.get("/v1/nothing-here", headers=h), 404)
    assert_error(c.put("/v1/match", json={}, headers=h), 405)


def test_oversize_bodies_are_413(api: Api, tenant: Tenant) -> None:
    c, h = api.client, tenant.auth
    limit = api.settings.max_body_bytes
    big = {"items": [{"subject": "s", "image": "A" * (limit + 10)}]}
    assert_error(c.post("/v1/gallery", json=big, headers=h), 413, "payload_too_large")

    def chunks():  # no Content-Length: streamed with chunked transfer encoding
        yield b'{"images": ["'
        for _ in range(limit // 65536 + 2):
            yield b"A" * 65536
        yield b'"]}'

    r = c.post("/v1/embed", content=chunks(), headers=h | {"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    r = c.post(
        "/v1/match/upload",
        headers=h,
        files={"file": ("big.png", b"\x89PNG" + b"\x00" * (limit + 1), "image/png")},
    )
    assert_error(r, 413, "payload_too_large")
    # the limit applies before authentication: nobody gets to make the server buffer it
    assert_error(c.post("/v1/gallery", json=big), 413)
    text = c.get("/metrics").text
    assert 'route="unmatched",status="413"' in text or 'status="413"' in text


def test_body_limit_counts_bytes_when_content_length_lies() -> None:
    """A client declaring a small Content-Length but streaming more is cut off at the limit."""
    seen: list[bytes] = []

    async def app(scope, receive, send):  # reads the whole body, like FastAPI does
        while True:
            msg = await receive()
            seen.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = BodySizeLimitMiddleware(app, max_body_bytes=1000)
    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True}] * 5 + [
        {"type": "http.request", "body": b"", "more_body": False}
    ]
    sent: list[dict] = []

    async def receive():
        return chunks.pop(0)

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"10")]}
    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["code"] == "payload_too_large"
    assert sum(len(b) for b in seen) <= 1000
    # a declared length over the limit is refused before reading anything
    sent.clear()
    scope["headers"] = [(b"content-length", b"5000")]
    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 413
    scope["headers"] = [(b"content-length", b"abc")]
    sent.clear()
    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 400


def test_base64_of_rgba_and_palette_images(api: Api, tenant: Tenant) -> None:
    """Unusual but valid modes are converted, not rejected."""
    for mode in ("RGBA", "P", "1", "LA", "I;16"):
        img = Image.new(mode, (9, 7))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        r = api.client.post(
            "/v1/embed",
            json={"images": [base64.b64encode(buf.getvalue()).decode()]},
            headers=tenant.auth,
        )
        assert r.status_code == 200, (mode, r.text)


def _encoded(img: Image.Image, fmt: str, **save: object) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return b64(buf.getvalue())


def test_unusual_modes_and_formats_decode(api: Api, tenant: Tenant) -> None:
    """CMYK JPEG, 32-bit integer and float TIFF, 16-bit PNG, 1-bit, palette with transparency,
    RGBA WebP, multi-frame GIF: converted like the training loader does, never a 500."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (12, 10), np.uint8))
    cases = {
        "cmyk jpeg": _encoded(grey.convert("CMYK"), "JPEG"),
        "int32 tiff": _encoded(grey.convert("I"), "TIFF"),
        "float tiff": _encoded(grey.convert("F"), "TIFF"),
        "16-bit png": _encoded(
            Image.fromarray(rng.integers(0, 65535, (12, 10)).astype(np.uint16)), "PNG"
        ),
        "1-bit bmp": _encoded(grey.convert("1"), "BMP"),
        "palette+transparency png": _encoded(grey.convert("P"), "PNG", transparency=0),
        "rgba webp": _encoded(grey.convert("RGBA"), "WEBP"),
        "2-frame gif": _encoded(
            grey.convert("P"), "GIF", save_all=True, append_images=[grey.convert("P").rotate(90)]
        ),
    }
    for name, data in cases.items():
        r = api.client.post("/v1/embed", json={"images": [data]}, headers=tenant.auth)
        assert r.status_code == 200, (name, r.text)
        vec = np.asarray(r.json()["embeddings"][0])
        assert vec.shape == (DIM,) and abs(np.linalg.norm(vec) - 1) < 1e-5, name
    # the same pixels give the same vector whatever the container: CMYK is converted, not
    # misread as four grey channels
    r = api.client.post(
        "/v1/embed",
        headers=tenant.auth,
        json={"images": [_encoded(grey, "PNG"), _encoded(grey, "TIFF"), _encoded(grey, "BMP")]},
    )
    a, b, c = (np.asarray(v) for v in r.json()["embeddings"])
    assert np.allclose(a, b, atol=1e-6) and np.allclose(a, c, atol=1e-6)


NON_IMAGES = {
    "plain text": (b"hello world, not an image", "plain text"),
    "a PDF": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< >>\nendobj\n", "a PDF document"),
    "a HEIC photo": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
    "JSON": (b'{"image": "not here"}', "JSON text"),
    "an SVG": (b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>', "an SVG"),
    "a ZIP": (b"PK\x03\x04" + bytes(40), "a ZIP archive"),
    "base64 twice": (None, "base64-encoded twice"),
    "random bytes": (bytes(range(7, 71)), "bytes starting 07 08 09 0a"),
}


@pytest.mark.parametrize("name", list(NON_IMAGES))
def test_non_image_bytes_get_a_message_a_user_can_act_on(
    api: Api, tenant: Tenant, digits: Digits, name: str
) -> None:
    """Issue 30: non-image bytes answered "cannot identify image file <_io.BytesIO object at
    0x7f...>" (PIL's message, naming a memory address). Now the message names the image, the
    formats the service reads and what the bytes look like; on every route that takes images,
    base64 and multipart alike."""
    data, looks_like = NON_IMAGES[name]
    if data is None:  # the commonest slip: the image's base64 encoded again
        data = b64(png_bytes(digits.images[0])).encode()
    c, h = api.client, tenant.auth
    answers = {
        "image": c.post("/v1/match", json={"image": b64(data)}, headers=h),
        "images[0]": c.post("/v1/embed", json={"images": [b64(data)]}, headers=h),
        "items[0].image": c.post(
            "/v1/gallery", json={"items": [{"subject": "s", "image": b64(data)}]}, headers=h
        ),
        "file": c.post("/v1/match/upload", files={"file": ("x.png", data)}, headers=h),
    }
    for where, r in answers.items():
        err = assert_error(r, 422, "invalid_image")
        message = err["message"]
        assert "object at 0x" not in r.text and "BytesIO" not in r.text, r.text
        assert message.startswith(f"{where} is not an image the service reads"), message
        assert "PNG, JPEG, BMP, GIF, WEBP, TIFF or PPM" in message, message
        assert looks_like in message, message
        assert err["detail"]["where"] == where


def test_corrupt_image_messages_name_no_python_object(api: Api, tenant: Tenant) -> None:
    """A PNG whose data are damaged after a valid header fails inside PIL's decoder: the
    message says so without PIL's object reprs."""
    grey = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40), np.uint8))
    for fmt in ("PNG", "JPEG", "GIF", "TIFF", "WEBP"):
        buf = io.BytesIO()
        grey.save(buf, format=fmt)
        data = bytearray(buf.getvalue())
        for cut in (8, 40, len(data) // 2):
            r = api.client.post(
                "/v1/match", json={"image": b64(bytes(data[:cut]))}, headers=tenant.auth
            )
            assert r.status_code in (200, 422), (fmt, cut, r.text)
            assert "object at 0x" not in r.text, (fmt, cut, r.text)


def test_truncated_images_in_every_format(api: Api, tenant: Tenant) -> None:
    grey = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40), np.uint8))
    for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"):
        buf = io.BytesIO()
        grey.save(buf, format=fmt)
        data = buf.getvalue()
        for cut in (8, len(data) // 3, len(data) - 5):
            r = api.client.post("/v1/match", json={"image": b64(data[:cut])}, headers=tenant.auth)
            # some decoders pad a truncated tail; what must never happen is a 5xx
            assert r.status_code in (200, 422), (fmt, cut, r.text)
            if r.status_code == 422:
                assert r.json()["code"] in ("invalid_image", "image_too_large"), r.text


def _png_of_zeros(side: int) -> bytes:
    """A genuinely compressed grey PNG of side x side zeros (a real zlib bomb)."""
    row = b"\x00" * (side + 1)  # filter byte + a grey row
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_real_decompression_bomb(api: Api, tenant: Tenant) -> None:
    """Small PNGs that really inflate to 25 and 100 megapixels: refused from the header before
    anything is decompressed (our cap, then Pillow's own guard beyond it)."""
    for side in (5_000, 10_000):
        png = _png_of_zeros(side)
        assert len(png) < 200_000
        err = assert_error(
            api.client.post("/v1/match", json={"image": b64(png)}, headers=tenant.auth),
            422,
            "image_too_large",
        )
        assert err["detail"]["max_pixels"] == api.settings.max_image_pixels
        if side == 5_000:
            assert err["detail"]["width"] == err["detail"]["height"] == side


def test_hostile_embeddings(api: Api, enrolled: Tenant) -> None:
    c, h = api.client, enrolled.auth
    ok = [
        [1e308] * DIM,  # the naive norm overflows to inf
        [5e-324] + [0.0] * (DIM - 1),  # one denormal: still a direction
        [-1e-300] * DIM,
    ]
    for v in ok:
        r = c.post("/v1/match", json={"embedding": v}, headers=h)
        assert r.status_code == 200, r.text
        assert all(np.isfinite(x["score"]) for x in r.json()["candidates"])
    for v in ([-0.0] * DIM, [0] * DIM):
        assert_error(
            c.post("/v1/match", json={"embedding": v}, headers=h), 422, "invalid_embedding"
        )
    # 1e400 parses to inf; a 5000-digit integer is beyond Python's int-from-text limit
    for token in ("1e400", "-1e400", "9" * 5000):
        raw = '{"embedding": [' + ", ".join([token] + ["0.1"] * (DIM - 1)) + "]}"
        r = c.post("/v1/match", content=raw, headers=h | {"content-type": "application/json"})
        assert r.status_code in (400, 422), (token[:10], r.text)
        assert set(r.json()) == {"code", "message", "detail"}


def test_deep_nesting_and_huge_arrays(api: Api, tenant: Tenant) -> None:
    c, h = api.client, tenant.auth | {"content-type": "application/json"}
    for depth in (1_000, 100_000):  # beyond the JSON parser's recursion limit
        for raw in (
            '{"embedding": ' + "[" * depth + "]" * depth + "}",
            '{"items": [{"subject": "s", "embedding": [1], "metadata": '
            + '{"a":' * depth
            + "1"
            + "}" * depth
            + "}]}",
        ):
            path = "/v1/match" if raw.startswith('{"embedding"') else "/v1/gallery"
            assert_error(c.post(path, content=raw, headers=h), 400)
    # metadata that parses but nests deeper than responses can serialise is refused at
    # enrolment (it used to be stored, then every read of it and its tenant's list was a 500)
    for depth in (33, 300):
        meta = json.loads('{"a":' * depth + "1" + "}" * depth)
        r = c.post(
            "/v1/gallery",
            headers=tenant.auth,
            json={"items": [{"subject": "deep", "embedding": unit(depth), "metadata": meta}]},
        )
        err = assert_error(r, 422, "invalid_input")
        assert "nests" in json.dumps(err["detail"])
    meta = json.loads('{"a":' * 32 + "1" + "}" * 32)
    r = c.post(
        "/v1/gallery",
        headers=tenant.auth,
        json={
            "items": [
                {"subject": "deep", "embedding": unit(1), "metadata": meta, "item_id": "deep32"}
            ]
        },
    )
    assert r.status_code == 201, r.text
    assert c.get("/v1/gallery/deep32", headers=tenant.auth).json()["metadata"] == meta
    assert c.get("/v1/gallery", headers=tenant.auth).status_code == 200
    r = c.post(
        "/v1/gallery/upload",
        headers=tenant.auth,
        data={"subject": "deep", "metadata": '{"a":' * 40 + "1" + "}" * 40},
        files={"file": ("a.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")},
    )
    assert_error(r, 422, "invalid_input")
    # huge arrays: a 400k-element embedding, ten thousand tiny images, wide metadata
    big = '{"embedding": [' + ",".join(["0.1"] * 400_000) + "]}"
    assert len(big) < api.settings.max_body_bytes
    assert_error(c.post("/v1/match", content=big, headers=h), 422)
    assert_error(
        c.post("/v1/embed", json={"images": ["QQ=="] * 10_000}, headers=tenant.auth),
        422,
        "too_many_items",
    )
    wide = {str(i): i for i in range(5_000)}
    assert_error(
        c.post(
            "/v1/gallery",
            headers=tenant.auth,
            json={"items": [{"subject": "s", "embedding": unit(1), "metadata": wide}]},
        ),
        422,
        "invalid_input",
    )
