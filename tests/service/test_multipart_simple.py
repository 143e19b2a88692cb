"""service/api/bodies.py: the plain file-upload form split by `bytes` searches gives exactly
the fields python-multipart's parser finds, and anything else is left to that parser.

The reference is python-multipart itself (`_full_parse`, the path every body took before): for
any body, either the simple split declines (None) or both agree field for field, bytes for
bytes. Bodies are generated around the edges that matter: delimiters inside the data, bare CR
and LF, odd header names and spacing, preambles, epilogues, missing closings.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.bodies import ImageBody, _full_parse, _simple_files_form
from service.images import Upload

BOUNDARY = b"b0undary"


def fields(items) -> list[tuple[str, object]]:
    return [(k, (v.data, v.filename) if isinstance(v, Upload) else v) for k, v in items]


def reference(data: bytes, max_images: int):
    body = ImageBody(data, multipart="multipart/form-data; boundary=b0undary", max_images=64)
    return fields(_full_parse(body, BOUNDARY, "utf-8"))


def agrees(data: bytes, max_images: int = 64) -> bool:
    """False when the simple split declined; raises when it disagrees with the reference."""
    simple = _simple_files_form(data, BOUNDARY, "utf-8", max_images)
    if simple is None:
        return False
    assert fields(simple) == reference(data, max_images), data
    return True


NASTY = [b"\r", b"\n", b"\r\n", b"-", b"--", b"\r\n--", b"b0undary", b"\r\n--b0undary", b"x",
         b" ", b"\r\n--b0undary ", b"\r\n--b0undary\t", b"\r\n--b0undary--",
         b"--b0undary\r\n"]  # fmt: skip
content = st.lists(st.sampled_from(NASTY) | st.binary(max_size=6), max_size=8).map(b"".join)
disposition = st.sampled_from([
    b'form-data; name="files"; filename="a.png"',
    b'form-data; name="file"; filename="b c.png"',
    b'form-data; name="files"; filename=""',
    b'form-data; name="files"',  # a text field
    b'form-data; filename="x.png"',  # no name
    b"form-data; name=files; filename=d.png",
])  # fmt: skip
header_name = st.sampled_from([b"Content-Disposition", b"content-disposition", b"Content-Type",
                               b"X-Odd", b"Bad Name", b"", b"Content-Disposition "])  # fmt: skip
spacing = st.sampled_from([b" ", b"", b"  ", b"\t"])
CLOSINGS = [b"\r\n--b0undary--", b"\r\n--b0undary--\r\n", b"\r\n--b0undary--\r\nepilogue",
            b"\r\n--b0undary", b""]  # fmt: skip


@st.composite
def part(draw) -> bytes:
    headers = [(b"Content-Disposition", draw(disposition))]
    value = disposition | st.just(b"image/png") | st.just(b"x" * 1500)
    headers += draw(st.lists(st.tuples(header_name, value), max_size=9))
    if draw(st.booleans()):
        headers.reverse()
    lines = b"".join(name + b":" + draw(spacing) + value + b"\r\n" for name, value in headers)
    return lines + b"\r\n" + draw(content)


@st.composite
def body(draw) -> bytes:
    parts = draw(st.lists(part(), min_size=1, max_size=4))
    preamble = draw(st.sampled_from([b"", b"", b"preamble\r\n", b"\r\n"]))
    joined = b"\r\n--b0undary\r\n".join(parts)
    closing = draw(st.sampled_from(CLOSINGS))
    return preamble + b"--b0undary\r\n" + joined + closing


@settings(max_examples=800, deadline=None)
@given(body(), st.integers(1, 5))
def test_the_simple_split_agrees_with_python_multipart_or_declines(data, max_images):
    agrees(data, max_images)  # a body it accepts that python-multipart refuses raises there


def test_what_clients_send_takes_the_simple_split():
    """httpx's encoder (requests and TestClient write the same form) and a curl-style body."""
    files = [("files", (f"{i}.png", bytes(range(i, 256)) + b"\r\n--b0undar")) for i in range(3)]
    request = httpx.Request("POST", "http://x/", files=files)
    request.read()
    ctype = request.headers["content-type"]
    boundary = ctype.split("boundary=")[1].encode()
    simple = _simple_files_form(request.content, boundary, "utf-8", 64)
    assert simple is not None
    body = ImageBody(request.content, multipart=ctype, max_images=64)
    assert fields(simple) == fields(_full_parse(body, boundary, "utf-8"))
    assert [v.filename for _, v in simple] == ["0.png", "1.png", "2.png"]
    curl = (b"--b0undary\r\nContent-Disposition: form-data; name=\"files\"; filename=\"d.png\""
            b"\r\nContent-Type: image/png\r\n\r\nPNGDATA\r\n--b0undary--\r\n")  # fmt: skip
    assert agrees(curl)


PART = b'Content-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
EDGES = [
    # a delimiter padded with whitespace: python-multipart takes it as a boundary (two files)
    b"--b0undary\r\n" + PART + b"ONE\r\n--b0undary \r\n" + PART + b"TWO\r\n--b0undary--",
    b"--b0undary\r\n" + PART + b"ONE\r\n--b0undary xyz\r\n--b0undary--",  # refused there
    # the closing delimiter overlapping the one before it: python-multipart says cut short
    b"--b0undary\r\n" + PART + b"IMG\r\n--b0undary\r\n--b0undary--",
    # more headers, or longer ones, than python-multipart takes
    b"--b0undary\r\n" + b"X-A: 1\r\n" * 9 + PART + b"IMG\r\n--b0undary--",
    b"--b0undary\r\nX-A: " + b"x" * 5000 + b"\r\n" + PART + b"IMG\r\n--b0undary--",
]


@pytest.mark.parametrize("data", EDGES)
def test_edges_python_multipart_treats_its_own_way_are_left_to_it(data):
    assert _simple_files_form(data, BOUNDARY, "utf-8", 64) is None


def test_text_fields_extra_images_and_junk_are_left_to_python_multipart():
    text = b'--b0undary\r\nContent-Disposition: form-data; name="files"\r\n\r\nhi\r\n--b0undary--'
    assert _simple_files_form(text, BOUNDARY, "utf-8", 64) is None
    two = (b'--b0undary\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\n1'
           b'\r\n--b0undary\r\nContent-Disposition: form-data; name="files"; filename="b"\r\n\r\n2'
           b"\r\n--b0undary--")  # fmt: skip
    assert agrees(two, max_images=2)
    assert _simple_files_form(two, BOUNDARY, "utf-8", 1) is None  # the 413 comes from the parser
    assert _simple_files_form(b"junk", BOUNDARY, "utf-8", 64) is None
