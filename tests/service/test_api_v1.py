"""service/api/v1.py over HTTP: models, predict, equivalence, compare, and every refusal.

References are independent of the service: hashlib for checksums, bundle.json read as plain
JSON, onnxruntime sessions of our own for logits and per-layer tensors, numpy for softmax.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import sys
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from tests.conftest import SERVED_VARIANTS

PREDICT = "/v1/models/digits/predict"
COMPARE = "/v1/models/digits/compare"
MULTIPART_XYZ = "multipart/form-data; boundary=xyz"


def softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def multipart(images: list[bytes], field: str = "files") -> list:
    return [(field, (f"d{i}.png", data, "image/png")) for i, data in enumerate(images)]


def test_models_list_and_detail(client, bundle_src):
    variants = list(json.loads((bundle_src / "bundle.json").read_text())["files"])  # all served
    assert client.get("/v1/models").json() == {
        "models": [{"name": "digits", "version": "1", "status": "ready", "error": None,
                    "classes": [str(i) for i in range(10)], "variants": variants,
                    "variant_errors": {}}]
    }  # fmt: skip
    detail = client.get("/v1/models/digits").json()
    manifest = json.loads((bundle_src / "bundle.json").read_text())
    assert detail["providers"] == ["CPUExecutionProvider"]
    assert detail["input"] == manifest["input"] and detail["classes"] == manifest["classes"]
    for variant, level in (("folded", "ORT_ENABLE_ALL"), ("unfolded", "ORT_DISABLE_ALL")):
        f = detail["files"][variant]
        assert f["sha256"] == hashlib.sha256((bundle_src / f["path"]).read_bytes()).hexdigest()
        assert f["graph_optimization"] == level
    rows = manifest["fold_report"]
    assert detail["fold_summary"]["folded"] == sum(r["folded"] for r in rows)
    assert detail["fold_summary"]["layers"] == rows
    assert detail["per_layer_available"] is True


def test_equivalence_is_the_report_from_the_bundle(client, bundle_src):
    manifest = json.loads((bundle_src / "bundle.json").read_text())
    assert client.get("/v1/models/digits/equivalence").json() == manifest["equivalence"]


def test_predict_many_files_in_request_order(client, direct, digits, digit_batch):
    n = 12
    r = client.post(PREDICT, files=multipart([d.png for d in digits[:n]]), params={"top_k": 4})
    assert r.status_code == 200
    body = r.json()
    assert (body["model_name"], body["model_version"], body["variant"]) == ("digits", "1", "folded")
    probs = softmax64(direct.logits(digit_batch[:n]))
    for i, pred in enumerate(body["predictions"]):
        order = np.argsort(-probs[i], kind="stable")[:4]
        assert pred["filename"] == f"d{i}.png"
        assert pred["index"] == order[0] and pred["label"] == str(order[0])
        assert [c["index"] for c in pred["top_k"]] == order.tolist()
        # float64 softmax of identical logits: equal up to the last bits of two implementations
        np.testing.assert_allclose([c["probability"] for c in pred["top_k"]], probs[i, order],
                                   rtol=1e-12)  # fmt: skip


def test_the_default_model_reads_most_digits(client, digits):
    r = client.post(PREDICT, files=multipart([d.png for d in digits]))
    labels = [int(p["label"]) for p in r.json()["predictions"]]
    assert np.mean(np.array(labels) == [d.label for d in digits]) >= 0.9


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream"])
def test_predict_raw_body(client, direct, digits, digit_batch, content_type):
    r = client.post(PREDICT + "?variant=unfolded&top_k=1", content=digits[3].png,
                    headers={"content-type": content_type})  # fmt: skip
    pred = r.json()["predictions"]
    assert r.json()["variant"] == "unfolded" and len(pred) == 1 and len(pred[0]["top_k"]) == 1
    assert pred[0]["index"] == int(direct.logits(digit_batch[3:4], "unfolded").argmax())
    assert pred[0]["filename"] is None


def test_single_file_field_and_top_k_clamped_to_the_classes(client, digits):
    r = client.post(PREDICT, files=multipart([digits[0].png], field="file"), params={"top_k": 50})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 10


def probe_tensors(path, names, x) -> list[np.ndarray]:
    """Our own probe: the graph with extra outputs, run unoptimized so the tensors exist."""
    proto = onnx.load(str(path))
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return session.run(names, {"input": x})


def check_compare(body: dict, direct, bundle_src, x: np.ndarray) -> None:
    folded, unfolded = direct.logits(x, "folded"), direct.logits(x, "unfolded")
    diff = np.abs(folded.astype(np.float64) - unfolded)
    assert body["n_images"] == len(x)
    assert body["max_abs_diff"] == diff.max() and body["mean_abs_diff"] == pytest.approx(
        diff.mean()
    )
    assert body["max_rel_diff"] == pytest.approx(diff.max() / np.abs(unfolded).max())
    assert body["top1_agreement"] == np.mean(folded.argmax(1) == unfolded.argmax(1))
    assert [p["index"] for p in body["folded"]] == folded.argmax(1).tolist()
    manifest = json.loads((bundle_src / "bundle.json").read_text())
    assert body["within_tolerance"] == (diff.max() <= manifest["equivalence"]["tolerance_abs"])
    probes = manifest["layer_probes"]
    f = probe_tensors(bundle_src / "folded.onnx", [p["folded_tensor"] for p in probes], x)
    u = probe_tensors(bundle_src / "unfolded.onnx", [p["unfolded_tensor"] for p in probes], x)
    assert [row["bn"] for row in body["per_layer"]] == [p["bn"] for p in probes]
    for row, a, b in zip(body["per_layer"], f, u, strict=True):
        assert row["max_abs_diff"] == np.abs(a.astype(np.float64) - b).max()


def test_compare_images(client, direct, bundle_src, digits, digit_batch):
    r = client.post(COMPARE, files=multipart([d.png for d in digits[:6]]))
    assert r.status_code == 200 and r.json()["per_layer_note"] is None
    check_compare(r.json(), direct, bundle_src, digit_batch[:6])


def test_compare_v2_json_tensor(client, direct, bundle_src, digit_batch):
    x = digit_batch[10:14]
    payload = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                           "data": x.tolist()}]}  # fmt: skip
    r = client.post(COMPARE, json=payload)
    assert r.status_code == 200
    check_compare(r.json(), direct, bundle_src, x)


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb's opening."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def other_format(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format=fmt)
    return buf.getvalue()


def corrupt(png: bytes) -> bytes:
    data = bytearray(png)
    start = png.index(b"IDAT") + 4
    data[start : start + 8] = b"\xff" * 8  # zlib stream ruined, chunk CRC now wrong
    return bytes(data)


BAD_IMAGES = {
    "non-image bytes": (lambda d: b"hello, not an image", 400,
                        "image: not a decodable image"),
    "truncated": (lambda d: d[: len(d) // 2], 400, "image: corrupt or truncated image"),
    "corrupt": (corrupt, 400, "image: corrupt or truncated image"),
    "unsupported format": (lambda d: other_format("PCX"), 415,
                           "image: unsupported image format PCX; send one of PNG, JPEG"),
    "empty body": (lambda d: b"", 400, "image: empty image: the file or body has no bytes"),
    "over the pixel limit": (lambda d: png_with_size(5000, 5000), 413,
                             "image: image is 5000x5000 = 25000000 pixels, over the limit of "
                             "16777216 pixels"),
    "decompression bomb": (lambda d: png_with_size(100_000, 100_000), 413,
                           "image: image rejected as a decompression bomb"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_IMAGES)
@pytest.mark.parametrize("path", [PREDICT, COMPARE])
def test_bad_raw_images_are_4xx_with_the_reason(client, digits, case, path):
    make, status, message = BAD_IMAGES[case]
    r = client.post(path, content=make(digits[0].png), headers={"content-type": "image/png"})
    assert r.status_code == status
    assert r.json()["error"].startswith(message)


def test_a_bad_file_among_many_is_named(client, digits):
    files = multipart([digits[0].png, digits[1].png, b"", digits[2].png])
    r = client.post(PREDICT, files=files)
    assert r.status_code == 400
    assert r.json() == {"error": "image 3 ('d2.png'): empty image: the file or body has no bytes"}


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415,
         "unsupported Content-Type text/plain: send images as multipart/form-data"),
        ({"content": b"x"}, 415, "unsupported Content-Type no Content-Type: send images"),
        ({"content": b"x", "headers": {"content-type": "application/octet-streamxyz"}}, 415,
         "unsupported Content-Type application/octet-streamxyz"),
        ({"data": {"files": "digit.png"}}, 415, "unsupported Content-Type application/x-www-form"),
        ({"files": [("image", ("a.png", b"x", "image/png"))]}, 400,
         "unexpected form field 'image': send images under the field 'files'"),
        ({"files": [("files", ("a.png", b"x", "image/png"))], "data": {"files": "text"}}, 400,
         "form field 'files' holds text, not a file: use curl -F files=@digit.png"),
        ({"content": b"--xyz--\r\n", "headers": {"content-type": MULTIPART_XYZ}}, 400,
         "the multipart body holds no files"),
        ({"content": b"junk", "headers": {"content-type": "multipart/form-data"}}, 400,
         "malformed multipart body: Missing boundary in multipart."),
        ({"content": b"junk", "headers": {"content-type": MULTIPART_XYZ}}, 400,
         "malformed multipart body: Invalid multipart data."),
        ({"content": b'--xyz\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\nx\r\n'
                     b"--xyz--\r\n", "headers": {"content-type": MULTIPART_XYZ}}, 400,
         'malformed multipart body: The Content-Disposition header field "name" must be'),
        ({"params": {"variant": "half"}, "content": b"x", "headers": {"content-type": "image/png"}},
         400, f"unknown variant 'half'; use {SERVED_VARIANTS}"),
        ({"params": {"top_k": 0}, "content": b"x", "headers": {"content-type": "image/png"}},
         400, "invalid request: query.top_k: Input should be greater than or equal to 1"),
    ],
)  # fmt: skip
def test_bad_requests_are_4xx_with_the_reason(client, request_kwargs, status, message):
    r = client.post(PREDICT, **request_kwargs)
    assert r.status_code == status
    assert r.json()["error"].startswith(message)


def test_too_many_images_is_413(client, digits):
    r = client.post(PREDICT, files=multipart([digits[0].png] * 33))
    assert r.status_code == 413
    assert r.json() == {"error": "more than 32 images in one request: split the batch"}


def test_compare_refuses_bad_tensors_like_v2(client):
    payload = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                           "data": [0.0] * 64}], "parameters": {}}  # fmt: skip
    payload["inputs"][0]["data"][5] = 1e39  # beyond FP32: becomes Inf
    r = client.post(COMPARE, json=payload)
    assert r.status_code == 400 and "NaN or Inf value(s), the first at index [0, 0, 0, 5]" in r.text
    r = client.post(COMPARE, content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON")


@pytest.mark.parametrize(
    "path", ["/v1/models/cats", "/v1/models/cats/equivalence", "/v1/models/cats/predict",
             "/v1/models/cats/compare"],
)  # fmt: skip
def test_unknown_model_is_404(client, digits, path):
    method = client.get if path.endswith(("cats", "equivalence")) else client.post
    kwargs = {} if method == client.get else {"content": digits[0].png,
                                              "headers": {"content-type": "image/png"}}  # fmt: skip
    r = method(path, **kwargs)
    assert r.status_code == 404
    assert r.json() == {"error": "unknown model 'cats'; models served here: digits"}


def test_compare_without_onnx_installed_says_why_per_layer_is_empty(
    serve, models_dir, digits, monkeypatch
):
    """The `.[serve]` install may lack onnx, which probe graphs need: compare still answers."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    client = serve(models_dir)
    r = client.post(COMPARE, content=digits[0].png, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["per_layer"] == []
    note = "per-layer differences need the onnx package, not installed here"
    assert r.json()["per_layer_note"] == note
    detail = client.get("/v1/models/digits").json()
    assert detail["per_layer_available"] is False and detail["per_layer_note"] == note
