"""``/docs`` (Swagger UI) and ``/redoc`` work with no internet access (issue 30: Swagger UI came
from a CDN and the page was blank offline): each page refers only to this server, and every
script, style sheet, icon and the OpenAPI document it refers to is answered here, 200, with the
content type a browser needs, also under a proxy's root path."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import make_settings

CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
    ".json": ("application/json",),
}


@pytest.fixture(scope="module")
def client(artefact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    store = {"store_url": f"sqlite:///{tmp_path_factory.mktemp('docs') / 'tcm.db'}"}
    with TestClient(create_app(make_settings(artefact, store))) as c:
        yield c


def references(html: str) -> list[str]:
    """Every URL a page loads: src/href attributes, Swagger UI's ``url`` and ReDoc's
    ``spec-url``."""
    refs = re.findall(r'(?:src|href|spec-url)\s*=\s*"([^"]+)"', html)
    refs += re.findall(r"\burl:\s*'([^']+)'", html)
    return refs


@pytest.mark.parametrize(
    "page,needed",
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png", "openapi.json"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png", "openapi.json"}),
    ],
)
@pytest.mark.parametrize("root_path", ["", "/tcm"])
def test_docs_pages_load_only_local_assets(
    client: TestClient, page: str, needed: set[str], root_path: str
) -> None:
    # behind a proxy that strips root_path (no `with`: the app's lifespan already runs)
    r = TestClient(client.app, root_path=root_path).get(page) if root_path else client.get(page)
    assert r.status_code == 200, r
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    # nothing from another host: no absolute URL at all, no protocol-relative one
    assert not re.search(r"https?://|(?<![:\w])//[a-z]", html), re.findall(r"\S*//\S+", html)
    refs = references(html)
    assert {ref.rsplit("/", 1)[-1] for ref in refs} >= needed, refs
    for ref in refs:
        assert ref.startswith(root_path + "/"), ref
        got = client.get(ref.removeprefix(root_path))  # the proxy strips the prefix
        assert got.status_code == 200, (ref, got.status_code)
        kind = CONTENT_TYPES[Path(ref).suffix]
        assert got.headers["content-type"].split(";")[0] in kind, (ref, got.headers)
        assert len(got.content) > 1000, ref  # the real bundle, not an empty stub
    if page == "/docs":
        assert "validatorUrl" in html  # no online validator badge either


def test_the_assets_are_the_real_swagger_ui_and_redoc(client: TestClient) -> None:
    js = client.get("/docs-assets/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in js
    assert "Redoc" in client.get("/docs-assets/redoc.standalone.js").text
    assert client.get("/docs-assets/../app.py").status_code == 404
    # the pages are not part of the API's own description
    paths = client.get("/openapi.json").json()["paths"]
    assert not {p for p in paths if p.startswith(("/docs", "/redoc"))}
