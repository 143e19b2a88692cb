"""/docs works offline: every asset it references is served by bnfold itself."""

from __future__ import annotations

import re

import pytest

ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""")


def test_no_redoc_page_since_redoc_always_fetches_from_its_cdn(client):
    assert client.get("/redoc").status_code == 404


@pytest.mark.parametrize("page", ["/docs"])
def test_doc_pages_reference_only_this_server(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = [a or b for a, b in ASSET.findall(r.text)]
    assert refs, r.text
    outside = [u for u in refs if re.match(r"^(https?:)?//", u)]
    assert outside == [], f"{page} loads from outside the server: {outside}"
    assert "cdn" not in r.text.lower()
    for ref in refs:
        asset = client.get(ref)
        assert asset.status_code == 200, ref
        if ref.endswith(".js"):  # the real library, not an empty placeholder
            assert len(asset.content) > 500_000, ref
            assert "javascript" in asset.headers["content-type"], asset.headers


def test_openapi_document_is_3_1_and_swagger_ui_is_5(client):
    # Swagger UI 4 cannot render OpenAPI 3.1 (what FastAPI writes): the bundled one must be 5.x.
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    js = client.get("/docs-assets/swagger-ui-bundle.js").text
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.\d+\.\d+"', js)
    assert version and int(version.group(1)) >= 5 and "isOAS31" in js
