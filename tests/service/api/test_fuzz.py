"""Schemathesis against the live OpenAPI of a running app (ASGI, real SQLite store, real model).

Every operation the app publishes gets a bounded, derandomized run (``EXAMPLES`` per operation
and mode) of schema-valid (positive) and schema-violating (negative) requests, authenticated as
a tenant (as the admin for the admin and monitor routes). Purely schema-driven data rarely gets
past the service's semantic checks (a 64-d vector, a decodable image), so three positive cases in
four of the deep routes are "repaired" (``repair``): real vectors, including extreme ones, real
images in every mode and format, sometimes truncated, existing ids; each deep route must reach
a 2xx at least once. Each response must not be a 5xx and must pass schemathesis' checks:
documented status code, content type and headers, a body matching the response model, and
negative data rejected with a 4xx.

What it found (fixed, with regression tests): ``/metrics`` was documented as JSON, the model's
``calibration_range`` / ``far_range`` were tuples (OpenAPI 3.1 ``prefixItems``, unreadable to
schemathesis and many generators), and, found while writing the hand-written cases in
``test_bad_input.py``, metadata nested beyond ~255 levels was stored and then made every read of
the item and its tenant's gallery list a 500.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ADMIN_TOKEN, DIM, Digits, b64, b64_png, make_settings, unit

EXAMPLES = 25  # per operation and generation mode
# "schema-valid requests must be accepted": the service also enforces what no static schema
# states (the model's embedding dimension, non-zero vectors, decodable images, exactly one of
# embedding/image, existing ids), each answered with a documented 4xx and the error body
NOT_CHECKED = [positive_data_acceptance]


def _operations() -> list[tuple[str, str, bool]]:
    """(method, path, negatable) for every published operation; the schema does not depend on
    the settings, so a never-started app describes the live one. Negative data needs a body or
    a query parameter: a free-form string path parameter has no invalid value."""
    spec = create_app(
        Settings(artefact_path=Path("unused"), store_url="sqlite:///unused.db")
    ).openapi()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            query = [p for p in op.get("parameters", []) if p["in"] != "path"]
            out.append((method.upper(), path, bool(query or op.get("requestBody"))))
    return out


OPERATIONS = _operations()
CASES = [
    pytest.param(m, p, mode, id=f"{m} {p} {mode}")
    for m, p, negatable in OPERATIONS
    for mode in ("positive", "negative")
    if mode == "positive" or negatable
]


SUBJECTS = ["s0", "s1", "s2", "img"]
ITEMS = [f"item{i}" for i in range(6)] + ["img0"]
DEEP = {
    ("POST", p)
    for p in (
        "/v1/gallery",
        "/v1/gallery/columns",
        "/v1/gallery/upload",
        "/v1/match",
        "/v1/match/upload",
        "/v1/verify",
        "/v1/verify/upload",
        "/v1/embed",
        "/v1/embed/upload",
        "/v1/feedback",
    )
}
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"]


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """A small image in any mode and format, sometimes truncated."""
    h, w, seed = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(0, 999))
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), np.uint8))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    with contextlib.suppress(ValueError):
        img = img.convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(1, len(data)))]
    return data


def vectors() -> st.SearchStrategy[list[float]]:
    return st.one_of(
        st.integers(0, 10**6).map(unit),
        st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=DIM, max_size=DIM),
        st.lists(st.sampled_from([0.0, -0.0, 5e-324, -1e308, 1e308]), min_size=DIM, max_size=DIM),
    )


def _source(draw: st.DrawFn, value: Any, choices: tuple[str, ...]) -> dict[str, Any]:
    """Keeps the generated fields, with exactly one of ``choices`` and a plausible value."""
    out = {k: v for k, v in (value if isinstance(value, dict) else {}).items() if k not in choices}
    which = draw(st.sampled_from(choices))
    out[which] = {
        "embedding": lambda: draw(vectors()),
        "image": lambda: b64(draw(image_bytes())),
        "item_id": lambda: draw(st.sampled_from(ITEMS)),
        "subject": lambda: draw(st.sampled_from(SUBJECTS)),
    }[which]()
    return out


def repair(draw: st.DrawFn, path: str, body: Any, match_id: str) -> Any:
    """Makes a schema-valid body semantically plausible, so that requests get past validation
    to the model, the index and the store: vectors of the model's dimension (unit, arbitrary
    finite, or extreme), real images (any mode and format, sometimes truncated), existing ids
    and subjects, a k in range. The rest of the generated body is kept."""
    body = dict(body) if isinstance(body, dict) else {}
    if path == "/v1/match":
        body = _source(draw, body, ("embedding", "image"))
    elif path == "/v1/gallery":
        items = [i for i in body.get("items", []) if isinstance(i, dict)][:4] or [{}]
        body["items"] = [
            _source(draw, i, ("embedding", "image")) | {"subject": draw(st.sampled_from(SUBJECTS))}
            for i in items
        ]
    elif path == "/v1/gallery/columns":
        # 1-4 rows of the model's dimension, one subject each: unit vectors, one row sometimes
        # any the other routes get (arbitrary finite or extreme); generated ids left out (they
        # repeat the ids other operations stored: 409), generated metadata kept when it has one
        # entry per row
        n = draw(st.integers(1, 4))
        rows = [unit(draw(st.integers(0, 10**6))) for _ in range(n)]
        if draw(st.integers(0, 3)) == 0:
            rows[draw(st.integers(0, n - 1))] = draw(vectors())
        with np.errstate(over="ignore"):  # 1e308 becomes inf: a row the service refuses
            matrix = np.asarray(rows, dtype=np.float64).astype("<f4")
        body["embeddings_b64"] = b64(matrix.tobytes())
        body["subjects"] = [draw(st.sampled_from(SUBJECTS)) for _ in rows]
        body.pop("item_ids", None)
        if not isinstance(body.get("metadata"), list) or len(body["metadata"]) != n:
            body.pop("metadata", None)
    elif path == "/v1/verify":
        for side in ("a", "b"):
            body[side] = _source(draw, body.get(side), ("embedding", "image", "item_id", "subject"))
    elif path == "/v1/embed":
        body["images"] = [b64(draw(image_bytes())) for _ in range(draw(st.integers(1, 4)))]
    elif path == "/v1/feedback":
        body = {"match_id": match_id} | draw(
            st.sampled_from(
                [
                    {"correct": True},
                    {"correct": False},
                    {"true_subject": None},
                    {"true_subject": "s0"},
                    {"true_subject": "nobody"},
                ]
            )
        )
    else:  # the multipart uploads: every file part a real (or truncated) image
        for part in ("file", "a", "b"):
            if part in body:
                body[part] = draw(image_bytes())
        if "subject" in body:
            body["subject"] = draw(st.sampled_from(SUBJECTS))
        body.pop("item_id", None)
    if "k" in body:
        body["k"] = draw(st.integers(1, 10))
    return body


@dataclass
class Seeded:
    settings: Settings
    tenant_auth: dict[str, str]
    tenant_id: str
    match_id: str


@dataclass
class Live:
    schema: schemathesis.schemas.BaseSchema
    seeded: Seeded


@pytest.fixture(scope="module")
def seeded(artefact: Path, digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """A store with a tenant and some data for the fuzzer's requests to find."""
    store = {"store_url": f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'tcm.db'}"}
    settings = make_settings(artefact, store, monitor_interval_s=3600.0, monitor_min_pairs=2)
    with TestClient(create_app(settings)) as client:
        r = client.post(
            "/v1/tenants", json={"name": "fuzz"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert r.status_code == 201, r.text
        created = r.json()
        auth = {"Authorization": f"Bearer {created['api_key']}"}
        items = [
            {"subject": f"s{i % 3}", "embedding": unit(i), "item_id": f"item{i}"} for i in range(6)
        ]
        items.append({"subject": "img", "image": b64_png(digits.images[0]), "item_id": "img0"})
        assert client.post("/v1/gallery", json={"items": items}, headers=auth).status_code == 201
        r = client.post("/v1/match", json={"embedding": unit(1)}, headers=auth)
        assert r.status_code == 200
    return Seeded(settings, auth, created["tenant_id"], r.json()["match_id"])


@pytest.fixture
def live(seeded: Seeded) -> Iterator[Live]:
    """A fresh app on the seeded store; loading its schema starts its lifespan (schemathesis'
    pytest plugin ends every ASGI lifespan after each test, and an app's lifespan runs once)."""
    app = create_app(seeded.settings)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        # the test sends the credentials itself (the schema's bearer schemes would otherwise
        # make a missing Authorization header "negative data" this test then overrides)
        schema.config.generation.update(with_security_parameters=False)
        yield Live(schema, seeded)
    finally:
        asgi.shutdown_lifespans()


def _auth(live: Live, path: str) -> dict[str, str]:
    if path.startswith(("/v1/tenants", "/v1/monitor")):
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return live.seeded.tenant_auth


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_fuzz_operation(live: Live, method: str, path: str, mode: str) -> None:
    operation = live.schema[path][method]
    headers = _auth(live, path)
    seen: list[int] = []

    strategy = operation.as_strategy(GenerationMode(mode))
    if method == "GET" and "{" in path:  # half the time, name something that exists
        known = {"item_id": "item1", "tenant_id": live.seeded.tenant_id}
        strategy = st.one_of(
            strategy,
            operation.as_strategy(
                GenerationMode(mode),
                path_parameters={k: v for k, v in known.items() if "{" + k + "}" in path},
            ),
        )

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, data=st.data())
    def run(case: schemathesis.Case, data: st.DataObject) -> None:
        repaired = (
            mode == "positive" and (method, path) in DEEP and data.draw(st.integers(0, 3)) > 0
        )
        if repaired:
            case.body = repair(data.draw, path, case.body, live.seeded.match_id)
            if case.headers and "Idempotency-Key" in case.headers:
                # the generated keys repeat across operations ("0", "A", ...): a key an earlier
                # enrolment recorded would make this repaired body a 422 idempotency_key_reused
                case.headers["Idempotency-Key"] = uuid.uuid4().hex
        if method == "DELETE" and path == "/v1/tenants/{tenant_id}":
            # never let the fuzzer delete the tenant every other operation runs as
            assert case.path_parameters is not None
            if case.path_parameters.get("tenant_id") == live.seeded.tenant_id:
                case.path_parameters["tenant_id"] = uuid.uuid4().hex
        response = case.call(headers=headers)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
        # a repaired body is valid by construction, though file parts are now bytes where the
        # schema says string, which schemathesis would take for negative data
        case.validate_response(
            response,
            headers=headers,
            excluded_checks=NOT_CHECKED + ([negative_data_rejection] if repaired else []),
        )

    run()
    assert seen, "no request was made"
    print(f"{method} {path} {mode}: {sorted(Counter(seen).items())}")
    if mode == "positive" and (method, path) in DEEP:  # the deep paths were reached
        assert any(200 <= s < 300 for s in seen), sorted(Counter(seen).items())
