"""Schemathesis hooks for ``test_openapi_contract.py`` (loaded through SCHEMATHESIS_HOOKS).

The schema can say "base64" and "an image file", not "a decodable image": the formats it uses
for images (``byte`` for base64 in JSON, ``binary`` for multipart files) get strategies that
draw real small images (any mode the service converts, PNG/JPEG/BMP/GIF), so generated
requests that the schema calls valid carry images the service can decode.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.specs.openapi.checks import is_unexpected_http_status_case

FORMATS = ["PNG", "JPEG", "BMP", "GIF"]


@st.composite
def image_files(draw: st.DrawFn) -> bytes:
    h, w, seed = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(0, 999))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w), np.uint8)
    img = Image.fromarray(pixels).convert(draw(st.sampled_from(["L", "RGB"])))
    buf = io.BytesIO()
    img.save(buf, format=draw(st.sampled_from(FORMATS)))
    return buf.getvalue()


schemathesis.openapi.format("byte", image_files().map(lambda b: base64.b64encode(b).decode()))
schemathesis.openapi.format("binary", image_files())


@st.composite
def float32_base64(draw: st.DrawFn) -> str:
    """A usable base64 embedding of the test model's dimension (finite, not all zero)."""
    from tests.service.conftest import DIM

    seed = draw(st.integers(0, 2**32 - 1))
    v = np.random.default_rng(seed).standard_normal(DIM).astype("<f4")
    return base64.b64encode(v.tobytes()).decode()


schemathesis.openapi.format("float32-base64", float32_base64())


@st.composite
def float32_base64_matrix(draw: st.DrawFn) -> str:
    """A usable base64 matrix of 1-4 rows of the test model's dimension (its row count must
    equal the subjects' count, which no schema can tie to it: 422 column_lengths otherwise)."""
    from tests.service.conftest import DIM

    rows, seed = draw(st.integers(1, 4)), draw(st.integers(0, 2**32 - 1))
    m = np.random.default_rng(seed).standard_normal((rows, DIM)).astype("<f4")
    return base64.b64encode(m.tobytes()).decode()


schemathesis.openapi.format("float32-base64-matrix", float32_base64_matrix())


# What the schema cannot state: whether bytes are a decodable image (and within the pixel
# cap), whether a folder holds a usable artefact, whether a multipart text field holds a JSON
# object, whether an Idempotency-Key was sent before with another request. A schema-valid
# request refused for one of these, and only these, error codes is not a contract failure;
# ``positive_data_acceptance_but_content`` is schemathesis' ``positive_data_acceptance`` (which
# the test excludes) with exactly that exception.
CONTENT_CODES = {
    "invalid_image",
    "image_too_large",
    "invalid_artefact",
    "invalid_json_field",
    "idempotency_key_reused",
    # the columnar enrolment's columns of unequal lengths (rows of the matrix, subjects,
    # item_ids, metadata): a relation between fields' lengths no JSON Schema states
    "column_lengths",
}
ACCEPTED = {401, 403, 404, 409, 429}


@schemathesis.check
def positive_data_acceptance_but_content(ctx: object, response: object, case: object) -> None:
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive:
        return
    if is_unexpected_http_status_case(case):  # probes of methods the path does not have
        return
    status = response.status_code  # type: ignore[attr-defined]
    if status < 400 or status >= 500 or status in ACCEPTED:
        return
    try:
        code = response.json().get("code")  # type: ignore[attr-defined]
    except ValueError:
        code = None
    if status == 422 and code in CONTENT_CODES:
        return
    # an enrolment mixing images and embeddings may list up to max_enrol_items items, of which
    # at most max_batch_items images (each a forward pass): a count over one kind of the
    # array's items, which no JSON Schema states (seen in the stateful phase: 9 images of 8)
    if status == 422 and code == "too_many_items" and "images in one request" in response.text:  # type: ignore[attr-defined]
        return
    # base64 of the right length whose float32 bit patterns are NaN/inf or all zero (an
    # embedding_b64, or a row of the columnar matrix): no JSON Schema can state that (JSON-list
    # embeddings are fully described: they never get here)
    where = str((response.json().get("detail") or {}).get("where", "")) if code else ""  # type: ignore[attr-defined]
    b64_row = where.endswith("embedding_b64") or where.startswith("embeddings_b64[")
    if status == 422 and code == "invalid_embedding" and b64_row:
        return
    raise AssertionError(f"schema-valid request refused: {status} {code} {response.text[:300]}")  # type: ignore[attr-defined]
