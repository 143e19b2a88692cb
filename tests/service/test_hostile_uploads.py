"""Uploads: multipart bodies cut short (400 saying so, not 'the multipart body holds no
files'), and the decoding of a request that timed out (stopped, not carried on).

A client (or a proxy) that drops the connection's tail sends a body whose last part never
reaches its closing boundary; python-multipart parses it without complaint and never ends the
part, so the server used to answer that no file had been sent at all.
"""

from __future__ import annotations

import threading

import pytest

from service import inference

PREDICT = "/v1/models/digits/predict"
MULTIPART = {"content-type": "multipart/form-data; boundary=xyz"}
HEAD = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="d.png"\r\n'
CUT = "malformed multipart body: it ends before its closing boundary --xyz--: the upload was "


@pytest.mark.parametrize(
    "tail",
    [
        b"",  # inside the part's headers
        b"\r\n",  # headers done, no data yet
        b"\r\nPNG-bytes...",  # inside the data
        b"\r\nPNG-bytes\r\n--xyz",  # at the boundary, before its '--'
    ],
)
@pytest.mark.parametrize("path", [PREDICT, "/v1/models/digits/compare"])
def test_a_multipart_body_cut_short_is_400_saying_so(client, digits, path, tail):
    r = client.post(path, content=HEAD + tail, headers=MULTIPART)
    assert r.status_code == 400
    assert r.json() == {"error": CUT + "cut short; send the whole body"}
    r = client.post(PREDICT, content=HEAD + b"\r\n" + digits[4].png + b"\r\n--xyz--\r\n",
                    headers=MULTIPART)  # fmt: skip
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "4"


def test_an_empty_multipart_body_still_holds_no_files(client):
    for body in (b"", b"--xyz--\r\n"):
        r = client.post(PREDICT, content=body, headers=MULTIPART)
        assert r.status_code == 400
        assert r.json()["error"].startswith("the multipart body holds no files")


def test_decoding_stops_at_the_next_image_once_the_request_timed_out(
    serve, models_dir, digits, monkeypatch
):
    """64 large images take seconds each batch; the decoding thread went on after its request's
    504, so a few such requests held up every predict behind them for as long again."""
    client = serve(models_dir, request_timeout_s=0.2)
    decoded, finished, timed_out = [], threading.Event(), threading.Event()
    real_decode, real_batch = inference.preprocess_bytes, inference.images_to_batch

    def decode(data, spec, max_pixels):
        decoded.append(len(decoded))
        if len(decoded) == 2:  # the second image "takes" until the request has timed out
            assert timed_out.wait(30)
        return real_decode(data, spec, max_pixels)

    def batch(*args):
        try:
            return real_batch(*args)
        finally:
            finished.set()

    monkeypatch.setattr(inference, "preprocess_bytes", decode)
    monkeypatch.setattr(inference, "images_to_batch", batch)
    r = client.post(PREDICT, files=[("files", ("d.png", digits[0].png))] * 10)
    assert r.status_code == 504
    timed_out.set()
    assert finished.wait(30)
    assert decoded == [0, 1]  # the image in progress finished; the other 8 were never decoded
