"""The web page in a real browser: Debian's Chromium, driven by Playwright, against the real
server (`python -m service`) on a free loopback port.

What the page shows is checked against the API itself (httpx on the same bytes): the labels,
probabilities, difference numbers and per-layer rows; what it says the model sees is checked
against the service's own preprocessing. Screenshots go to a temporary folder
($BNFOLD_TEST_ARTIFACTS or the system's); `BNFOLD_UPDATE_DOCS_SCREENSHOT=1` also writes
docs/page.png for the README, so an ordinary test run leaves the tree as it was.

Needs /usr/bin/chromium: `scripts/install_browser.sh` installs it (`make test` runs it first).
Playwright never downloads a browser here; it is pointed at the system one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import PIL
import pytest
from PIL import Image

from tests.conftest import Digit, png_bytes
from tests.e2e.conftest import serving

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("BNFOLD_TEST_ARTIFACTS", tempfile.gettempdir())) / "bnfold-e2e"
DOCS_SCREENSHOT = REPO / "docs" / "page.png"
UPDATE_DOCS = os.environ.get("BNFOLD_UPDATE_DOCS_SCREENSHOT") == "1"
CHROMIUM = Path("/usr/bin/chromium")
# Root on CI machines: no sandbox; no GPU; nothing that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 20_000
TOP_K = 3


# ---------------------------------------------------------------- the server


REFUSAL = "followed by a non-affine layer: nothing to fold it into"
IMPORTED = {
    "source": "colleague.onnx",
    "sha256": "0" * 64,
    "external_data": ["colleague.onnx.data"],
    "producer": "pytorch 2.13.0",
    "ir_version": 8,
    "changes": ["weights inlined from colleague.onnx.data", "batch axis made variable"],
}


@pytest.fixture(scope="module")
def page_models(bundle_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped bundle, and a copy whose fold report lists a refused BatchNorm (the report is
    metadata: the ONNX files and their checksums are untouched), so the card's refusals show."""
    root = tmp_path_factory.mktemp("page-models")
    shutil.copytree(bundle_src, root / "digits")
    shutil.copytree(bundle_src, root / "digits-refusal")
    manifest_path = root / "digits-refusal" / "bundle.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"] = "digits-refusal"
    refused = manifest["fold_report"][-1]
    refused.update(folded=False, into=None, direction=None, reason=REFUSAL)
    manifest["imported"] = IMPORTED  # shown as a model `bnfold import` brought in
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture(scope="module")
def server(page_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`bnfold-serve` on free loopback ports; yields its base URL."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(page_models, log) as served:
        yield served.url


@pytest.fixture(scope="module")
def api(server: str) -> Iterator[httpx.Client]:
    """The reference: the API answering the same bytes the page sent."""
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


def api_compare(api: httpx.Client, data: bytes, filename: str, mime: str) -> httpx.Response:
    files = {"files": (filename, data, mime)}
    return api.post("/v1/models/digits/compare", params={"top_k": TOP_K}, files=files)


# ---------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: the browser tests need Debian's chromium. "
            "Run `sudo scripts/install_browser.sh` (apt-get installs it), then pytest again."
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -e '.[dev]'`")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Tab:
    """A page plus what it did: requests made and script errors raised."""

    def __init__(self, page, base: str) -> None:
        self.page = page
        self.base = base
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("console", self._console)
        page.set_default_timeout(TIMEOUT_MS)

    def _console(self, message) -> None:
        # Chromium logs every 4xx fetch; the tests that expect one check the page instead.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def open(self) -> None:
        response = self.page.goto(self.base + "/")
        assert response is not None
        if response.status == 404:
            pytest.fail(
                "GET / answered 404: include the page router in service/app.py "
                "(`app.include_router(page.router)`, from service.api import page)"
            )
        assert response.status == 200
        self.page.wait_for_selector("#card-body .card-name")

    def upload(self, name: str, data: bytes, mime: str) -> None:
        self.page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])

    def wait_for_result(self) -> None:
        self.page.wait_for_selector("#results:not([hidden])")
        self.page.wait_for_selector("#layer-chart svg .row")
        self.page.wait_for_function("!document.querySelector('#status').classList.contains('busy')")

    def preview_pixels(self) -> np.ndarray:
        """The 'as the model sees it' canvas, read back: (H, W) of its red channel."""
        w, h, data = self.page.evaluate(
            """() => { const c = document.getElementById('preview');
                       const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                       return [c.width, c.height, Array.from(d)]; }"""
        )
        return np.asarray(data, dtype=np.uint8).reshape(h, w, 4)[:, :, 0]

    def screenshot(self, *paths: Path) -> None:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(path), full_page=True)


@pytest.fixture
def tab(browser, server: str) -> Iterator[Tab]:
    context = browser.new_context(viewport=DESKTOP)
    tab = Tab(context.new_page(), server)
    yield tab
    context.close()
    assert tab.errors == [], f"the page raised errors: {tab.errors}"
    outside = [u for u in tab.requests if u.startswith("http") and not u.startswith(server)]
    assert outside == [], f"the page fetched from outside the server: {outside}"


def js_exponential(v: float) -> str:
    """Python's spelling of JavaScript's v.toExponential(2), as the page prints numbers."""
    if v == 0:
        return "0"
    mantissa, exponent = f"{v:.2e}".split("e")
    return f"{mantissa}e{int(exponent):+d}"


def text(tab: Tab, selector: str) -> str:
    return tab.page.locator(selector).inner_text().strip()


def numbers(tab: Tab, selector: str, attribute: str) -> list[float]:
    values = tab.page.locator(selector).evaluate_all(
        f"(els) => els.map((e) => e.getAttribute('{attribute}'))"
    )
    return [float(v) for v in values]


# ---------------------------------------------------------------- the page itself


def test_page_and_assets_are_served_by_the_service(api: httpx.Client) -> None:
    page = api.get("/")
    if page.status_code == 404:
        pytest.fail("GET / answered 404: include the page router in service/app.py")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/static/app.js">' in page.text
    for name, media in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        asset = api.get(f"/static/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(media)
    missing = api.get("/static/missing.js")
    assert missing.status_code == 404
    assert missing.json()["error"].startswith("no static file 'missing.js'; the page's files are")
    assert api.get("/static/..%2Fapi%2Fpage.py").status_code == 404
    assert "/" not in api.get("/openapi.json").json()["paths"]


def test_api_docs_render_from_the_server_alone(tab: Tab) -> None:
    """Swagger UI loads every asset from the server (no CDN) and renders the API."""
    response = tab.page.goto(tab.base + "/docs")
    assert response is not None and response.status == 200
    tab.page.wait_for_selector(".opblock-summary-path")  # Swagger UI drew the operations
    paths = tab.page.locator(".opblock-summary-path").all_text_contents()
    assert "/v2/models/{model}/infer" in [p.replace("\u200b", "") for p in paths]
    assert len(tab.requests) >= 4  # html, js, css, openapi.json: all local (checked on teardown)


def test_model_card_shows_the_manifest(tab: Tab, api: httpx.Client) -> None:
    detail = api.get("/v1/models/digits").json()
    report = api.get("/v1/models/digits/equivalence").json()
    tab.open()
    page = tab.page

    assert page.locator("#model").input_value() == "digits"
    assert page.locator("#model option").all_inner_texts() == ["digits", "digits-refusal"]
    card = page.locator("#card-body").inner_text()
    assert "[object Object]" not in card and "undefined" not in card  # every value rendered
    assert "Imported model" not in card and "NCHW" in card  # trained here; its layout
    assert "lr=0.01" in card  # the training configuration, as key=value pairs
    assert page.locator(".chips li").all_inner_texts() == detail["classes"]
    assert text(tab, "[data-role=providers]") == ", ".join(detail["providers"])
    for variant, f in detail["files"].items():
        assert text(tab, f"[data-role=sha256][data-variant={variant}]") == f"sha256 {f['sha256']}"
    layers = detail["fold_summary"]["layers"]
    rows = page.locator("table.fold tbody tr")
    assert rows.evaluate_all("(rs) => rs.map((r) => r.dataset.bn)") == [row["bn"] for row in layers]
    for i, row in enumerate(layers):
        cells = rows.nth(i).locator("td").all_inner_texts()
        assert cells[0].lower() == ("folded" if row["folded"] else "refused")
        assert cells[1] == (row["into"] or "—")
    exported = page.locator("#export-chart svg .row")
    assert exported.evaluate_all("(rs) => rs.map((r) => r.dataset.key)") == [
        *[layer["bn"] for layer in report["per_layer"]],
        "logits",
    ]
    assert numbers(tab, "#export-chart svg .row", "data-max-abs-diff") == [
        *[layer["max_abs_diff"] for layer in report["per_layer"]],
        report["folded_vs_unfolded"]["max_abs_diff"],
    ]

    # Another model: its card replaces the first, refusals and their reason included.
    page.select_option("#model", "digits-refusal")
    page.wait_for_selector("#card-body .card-name:text-is('digits-refusal')")
    refused = page.locator("table.fold tbody tr.refused")
    assert refused.count() == 1
    assert refused.get_attribute("data-bn") == layers[-1]["bn"]
    assert refused.locator("td").all_inner_texts()[0].lower() == "refused"
    assert REFUSAL in refused.inner_text()
    folded = sum(row["folded"] for row in layers[:-1])
    assert f"{folded} folded, 1 refused" in text(tab, "#card-body")
    # Where an imported model came from, and what serving changed in it.
    card = text(tab, "#card-body")
    assert "Imported model" in card and "colleague.onnx" in card and "pytorch 2.13.0" in card
    changes = page.locator("[data-role=import-changes] li").all_inner_texts()
    assert changes == IMPORTED["changes"]

    # Every form control has a label; results are announced.
    unlabeled = page.evaluate(
        "() => [...document.querySelectorAll('input, select')]"
        ".filter((e) => e.labels.length === 0).map((e) => e.id)"
    )
    assert unlabeled == []
    assert page.locator("#results").get_attribute("aria-live") == "polite"
    assert page.locator("#status").get_attribute("aria-live") == "polite"
    assert page.locator("#error").get_attribute("role") == "alert"


def test_uploaded_digit_matches_the_api(tab: Tab, api: httpx.Client, digits: list[Digit]) -> None:
    digit = digits[3]
    tab.open()
    tab.upload("digit.png", digit.png, "image/png")
    tab.wait_for_result()

    reference = api_compare(api, digit.png, "digit.png", "image/png")
    assert reference.status_code == 200
    ref = reference.json()
    predicted = api.post(
        "/v1/models/digits/predict",
        params={"variant": "folded"},
        content=digit.png,
        headers={"content-type": "image/png"},
    ).json()["predictions"][0]["label"]

    page = tab.page
    assert text(tab, "#folded [data-role=label]") == ref["folded"][0]["label"] == predicted
    assert text(tab, "#unfolded [data-role=label]") == ref["unfolded"][0]["label"]
    # The int8 column: its prediction and its agreement with folded, or why it is absent.
    agreement = text(tab, "#int8 [data-role=agreement]")
    if ref["int8"] is None:
        assert agreement == f"Not served: {ref['int8_note']}."
    else:
        assert text(tab, "#int8 [data-role=label]") == ref["int8"]["predictions"][0]["label"]
        same = ref["int8"]["top1_agreement"] == 1
        assert agreement.startswith("Agrees with folded" if same else "Differs from folded")
        export = api.get("/v1/models/digits/equivalence").json()["int8"]["int8_vs_folded"]
        card = text(tab, "#int8-card")
        assert f"{100 * export['top1_agreement']:.2f}% with folded" in card
    for variant in ("folded", "unfolded"):
        items = page.locator(f"#{variant} .topk li")
        expected = ref[variant][0]["top_k"]
        assert items.evaluate_all("(li) => li.map((e) => e.dataset.label)") == [
            c["label"] for c in expected
        ]
        assert numbers(tab, f"#{variant} .topk li", "data-probability") == [
            c["probability"] for c in expected
        ]

    # The difference numbers: the values behind the text are the API's, bit for bit.
    for metric, field in [
        ("m-agreement", "top1_agreement"),
        ("m-max-abs", "max_abs_diff"),
        ("m-mean-abs", "mean_abs_diff"),
        ("m-max-rel", "max_rel_diff"),
    ]:
        value = page.locator(f"#{metric} [data-role=value]")
        assert float(value.get_attribute("data-value")) == ref[field], metric
        assert value.inner_text().strip() != ""
    assert text(tab, "#m-max-abs [data-role=value]") == js_exponential(ref["max_abs_diff"])

    # The per-layer chart: one row per folded layer, then the logits, with the API's numbers.
    rows = page.locator("#layer-chart svg .row")
    keys = [layer["bn"] for layer in ref["per_layer"]]
    assert len(keys) > 0
    assert rows.evaluate_all("(rs) => rs.map((r) => r.dataset.key)") == [*keys, "logits"]
    assert numbers(tab, "#layer-chart svg .row", "data-max-abs-diff") == [
        *[layer["max_abs_diff"] for layer in ref["per_layer"]],
        ref["max_abs_diff"],
    ]
    bar_widths = numbers(tab, "#layer-chart svg .row rect.bar", "width")
    assert len(bar_widths) == len(keys) + 1 and min(bar_widths) > 0
    axis = page.locator("#layer-chart svg .grid text").all_text_contents()
    assert all(label.startswith("1e") for label in axis) and len(axis) >= 5  # decades: log scale
    assert page.locator("#layer-chart svg .tolerance line").count() == 1

    # What the model sees: an 8x8 PNG goes through unresized, so the preview is its pixels.
    np.testing.assert_array_equal(tab.preview_pixels(), digit.pixels)

    tab.screenshot(ARTIFACTS / "page.png", *([DOCS_SCREENSHOT] if UPDATE_DOCS else []))


# Pillow >= 13 resizes a much taller than wide reduction vertically first, which the page
# follows; older Pillow always went horizontally first, one level apart on some pixels.
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


@pytest.mark.parametrize(
    ("width", "height"), [(61, 45), (29, 97)], ids=["wide-horizontal-first", "tall-vertical-first"]
)
def test_preview_matches_the_service_preprocessing(
    tab: Tab, api: httpx.Client, bundle_src: Path, width: int, height: int
) -> None:
    """An RGB image to shrink: the browser's preview must be the server's pixels."""
    from bnfold.bundle import read_manifest
    from bnfold.preprocess import preprocess_bytes

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 4, yy * 2, (xx + yy) * 2], axis=-1) + rng.integers(
        0, 40, (height, width, 3)
    )
    data = png_bytes(np.clip(rgb, 0, 255).astype(np.uint8))
    spec = read_manifest(bundle_src).input.preprocess

    tab.open()
    tab.upload("photo.png", data, "image/png")
    tab.wait_for_result()

    x = preprocess_bytes(data, spec)[0]  # (8, 8), normalized as the model receives it
    served = np.rint((x * spec.std[0] + spec.mean[0]) / spec.scale)
    shown = tab.preview_pixels().astype(np.float64)
    allowed = 0 if PILLOW_MAJOR >= 13 or width >= height else 1
    assert np.abs(shown - served).max() <= allowed
    ref = api_compare(api, data, "photo.png", "image/png").json()
    assert text(tab, "#folded [data-role=label]") == ref["folded"][0]["label"]


# Chromium does not hand Playwright the bytes of a multipart body built from blobs, so the test
# spies on fetch instead: every file the page puts in a FormData is copied to window.sentFiles.
SPY_ON_UPLOADS = """
window.sentFiles = [];
const realFetch = window.fetch;
window.fetch = async (input, init) => {
  if (init && init.body instanceof FormData) {
    for (const [field, value] of init.body.entries()) {
      if (value instanceof Blob) {
        const bytes = Array.from(new Uint8Array(await value.arrayBuffer()));
        window.sentFiles.push({ url: String(input), field, name: value.name, bytes });
      }
    }
  }
  return realFetch(input, init);
};
"""


def test_drawing_sends_what_the_preview_shows(tab: Tab, api: httpx.Client) -> None:
    tab.page.add_init_script(SPY_ON_UPLOADS)
    tab.open()
    box = tab.page.locator("#draw-canvas").bounding_box()
    assert box is not None
    mouse = tab.page.mouse
    # A "7": across the top, then down to the bottom left; lifting the pen sends it.
    mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.2)
    mouse.down()
    for fx, fy in [(0.5, 0.2), (0.75, 0.2), (0.6, 0.5), (0.45, 0.85)]:
        mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy, steps=8)
    mouse.up()
    tab.wait_for_result()

    uploads = tab.page.evaluate("() => window.sentFiles")
    assert [(u["field"], u["name"]) for u in uploads] == [("files", "drawing.png")]
    assert "/v1/models/digits/compare" in uploads[0]["url"]
    sent = bytes(uploads[0]["bytes"])
    img = Image.open(io.BytesIO(sent))
    assert img.format == "PNG" and img.size == (8, 8)  # the model's resolution, not the canvas's
    gray = np.asarray(img.convert("L"))
    assert gray.max() > 128, "the stroke left no ink"
    np.testing.assert_array_equal(tab.preview_pixels(), gray)

    ref = api_compare(api, sent, "drawing.png", "image/png").json()
    assert text(tab, "#folded [data-role=label]") == ref["folded"][0]["label"]
    assert text(tab, "#unfolded [data-role=label]") == ref["unfolded"][0]["label"]


def test_non_image_shows_the_api_error(tab: Tab, api: httpx.Client, digits: list[Digit]) -> None:
    junk = b"these are notes, not an image\n"
    reference = api_compare(api, junk, "notes.txt", "text/plain")
    assert 400 <= reference.status_code < 500
    message = reference.json()["error"]

    tab.open()
    tab.upload("digit.png", digits[0].png, "image/png")
    tab.wait_for_result()
    tab.upload("notes.txt", junk, "text/plain")
    tab.page.wait_for_selector("#error:not([hidden])")

    assert text(tab, "#error [data-role=message]") == message
    assert tab.page.locator("#results").is_hidden()  # no stale answer next to the error
    assert "notes.txt" in text(tab, "#preview-caption")


def test_phone_viewport(browser, server: str, digits: list[Digit]) -> None:
    context = browser.new_context(
        viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    tab = Tab(context.new_page(), server)
    try:
        tab.open()
        tab.upload("digit.png", digits[5].png, "image/png")
        tab.wait_for_result()
        overflow = tab.page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page scrolls sideways by {overflow} px on a phone"
        chart_width = tab.page.locator("#layer-chart svg").bounding_box()["width"]
        assert chart_width <= PHONE["width"]
        assert text(tab, "#folded [data-role=label]") != ""
        tab.screenshot(ARTIFACTS / "page-phone.png")
        assert tab.errors == []
    finally:
        context.close()
