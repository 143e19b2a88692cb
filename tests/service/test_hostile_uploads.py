"""Multipart uploads cut short: 400 saying so, not 'the multipart body holds no files'.

A client (or a proxy) that drops the connection's tail sends a body whose last part never
reaches its closing boundary; python-multipart parses it without complaint and never ends the
part, so the server used to answer that no file had been sent at all.
"""

from __future__ import annotations

import pytest

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
