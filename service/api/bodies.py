"""Request bodies as the routes need them: images from multipart or a raw body, V2 tensors.

Content-Type decides how a body is read; anything else is refused with 415 and a hint of what
to send. The images come out of the body here, at the protocol's edge, as `Upload`s; decoding
them is the data plane's job (service/images.py), not this module's.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from bnfold.errors import BadInput, BnfoldError, UnsupportedMediaType
from service import v2codec
from service.errors import shown
from service.images import Upload, check_image_count, too_many_images
from service.threads import INLINE_BYTES, CpuThreads

IMAGE_FIELDS = ("files", "file")
JSON_TYPE = "application/json"
HOW_TO_SEND = (
    "send images as multipart/form-data (curl -F files=@digit.png) or one image as the raw "
    "body with an image Content-Type (curl -H 'Content-Type: image/png' --data-binary @digit.png)"
)


def media_type(request: Request) -> str:
    """The Content-Type without parameters, lower-cased ('' when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def refuse_content_encoding(request: Request) -> None:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {shown(encoding)} is not supported: send the body uncompressed"
        )


async def read_uploads(
    request: Request, max_images: int, threads: CpuThreads, also: str = ""
) -> list[Upload]:
    """The request's images, in order: the parts of a multipart form, or the raw body.

    A small body in the plain form every client sends is split here on the event loop (a few
    `bytes` searches); any other is parsed by python-multipart, in a CPU thread unless it is
    small or the request is alone in the worker (CpuThreads.offload, by the body's size).
    """
    body = await read_images(request, max_images, also)
    plain = body.plain_uploads() if body.nbytes <= INLINE_BYTES else None
    if plain is not None:
        return plain
    return await threads.offload(body.uploads, nbytes=body.nbytes)


async def read_images(request: Request, max_images: int, also: str = "") -> ImageBody:
    """The request's image body, read once, unparsed: multipart or one raw image."""
    refuse_content_encoding(request)
    ctype = media_type(request)
    if ctype == "multipart/form-data":
        header = request.headers.get("content-type", "")
        return ImageBody(await request.body(), multipart=header, max_images=max_images)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return ImageBody(await request.body())
    given = shown_type(ctype) if ctype else "no Content-Type"
    raise UnsupportedMediaType(f"unsupported Content-Type {given}: {HOW_TO_SEND}{also}")


def shown_type(ctype: str) -> str:
    """A client's media type for an error message: as sent when short, else cut."""
    return ctype if len(ctype) <= 80 and ctype.isprintable() else shown(ctype)


@dataclass
class ImageBody:
    """A request body that holds images: raw bytes, and the multipart Content-Type if any."""

    data: bytes
    multipart: str | None = None  # the full Content-Type header (with its boundary)
    max_images: int = 1

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def uploads(self) -> list[Upload]:
        """Blocking: every image, in order (the raw body is one image)."""
        plain = self.plain_uploads()
        if plain is not None:
            return plain
        assert self.multipart is not None
        boundary, charset = _boundary_and_charset(self.multipart)
        return self._images(_full_parse(self, boundary, charset))

    def plain_uploads(self) -> list[Upload] | None:
        """`uploads()` when that takes a few `bytes` searches (a raw body, or a multipart form
        in the plain form `_simple_files_form` takes); None when it needs python-multipart's
        parser, whose byte-by-byte walk is a thread's work."""
        if self.multipart is None:
            return [Upload(self.data)]
        boundary, charset = _boundary_and_charset(self.multipart)
        simple = _simple_files_form(self.data, boundary, charset, self.max_images)
        return None if simple is None else self._images(simple)

    def _images(self, items: list[tuple[str, Upload | str]]) -> list[Upload]:
        uploads = [_upload(key, value) for key, value in items]
        if not uploads:
            raise BadInput(f"the multipart body holds no files: {HOW_TO_SEND}")
        check_image_count(len(uploads), self.max_images)
        return uploads


MAX_TEXT_PART = 1024 * 1024  # text fields are refused anyway; never hold more of one than this
MAX_TEXT_FIELDS = 8


def _boundary_and_charset(content_type: str) -> tuple[bytes, str]:
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadInput("malformed multipart body: Missing boundary in multipart.")
    return boundary, charset


# RFC 9110 token: the only header names the simple form below accepts.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Well inside python-multipart's own limits (8 headers a part, 4 KiB a header line), so that
# a part the simple form takes is never one that parser would refuse.
SIMPLE_MAX_HEADERS = 4
SIMPLE_MAX_HEADER_BYTES = 1024


def _simple_files_form(
    data: bytes, boundary: bytes, charset: str, max_images: int
) -> list[tuple[str, Upload | str]] | None:
    """The fields of a body in the plain form every client sends for file uploads, or None.

    Plain: the first delimiter at the very start, parts separated by CRLF-delimiter-CRLF, one
    closing delimiter at the end, no CRLF-delimiter anywhere else (python-multipart also takes
    one followed by spaces as a boundary), each part's headers a few short CRLF-terminated
    `token: value` lines, and every part a file (a name and a filename) within `max_images`.
    Such a body splits with a few `bytes` searches into exactly the parts python-multipart
    finds (a property test checks it against that parser), in a twentieth of its time: it
    walks the headers byte by byte in Python. Anything else, errors included, is left to
    python-multipart (None).
    """
    delimiter = b"--" + boundary
    closing = b"\r\n" + delimiter + b"--"
    if not data.startswith(delimiter + b"\r\n"):
        return None
    tail = data[len(delimiter) + 2 :]
    end = tail.rfind(closing)
    if end < 0 or tail[end + len(closing) :] not in (b"", b"\r\n"):
        return None
    parts = tail[:end].split(b"\r\n" + delimiter + b"\r\n")
    if len(parts) > max_images:
        return None
    items: list[tuple[str, Upload | str]] = []
    for part in parts:
        if b"\r\n" + delimiter in part or part.startswith(delimiter):
            return None  # a delimiter the split did not take: python-multipart decides
        head, blank, content = part.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not blank or len(lines) > SIMPLE_MAX_HEADERS:
            return None
        disposition = None
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or b"\r" in value or not _TOKEN.fullmatch(name):
                return None
            if len(line) > SIMPLE_MAX_HEADER_BYTES:
                return None
            if name.lower() == b"content-disposition":
                disposition = value.lstrip(b" ")
        if disposition is None:
            return None
        _, options = parse_options_header(disposition)
        if b"name" not in options or b"filename" not in options:
            return None
        filename = _decode(options[b"filename"], charset)
        items.append((_decode(options[b"name"], charset), Upload(content, filename or None)))
    return items


def _full_parse(body: ImageBody, boundary: bytes, charset: str) -> list[tuple[str, Upload | str]]:
    """python-multipart's parser driven directly over the body in hand: no spooled temporary
    files, no second copy of the body. Limits and messages follow Starlette's `request.form`.
    """
    items: list[tuple[str, Upload | str]] = []
    files = fields = 0
    part: dict = {}
    header_name = header_value = b""

    def on_part_begin() -> None:
        nonlocal part
        part = {"disposition": b"", "data": []}

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"].append(data[start:end])
        if part["filename"] is None and sum(map(len, part["data"])) > MAX_TEXT_PART:
            raise _Malformed(f"Part exceeded maximum size of {MAX_TEXT_PART // 1024}KB.")

    def on_part_end() -> None:
        data = b"".join(part["data"])
        if part["filename"] is None:
            items.append((part["name"], _decode(data, charset)))
        else:
            items.append((part["name"], Upload(data, part["filename"] or None)))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        nonlocal header_name
        header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        nonlocal header_value
        header_value += data[start:end]

    def on_header_end() -> None:
        nonlocal header_name, header_value
        if header_name.lower() == b"content-disposition":
            part["disposition"] = header_value
        header_name = header_value = b""

    def on_headers_finished() -> None:
        nonlocal files, fields
        _, options = parse_options_header(part["disposition"])
        if b"name" not in options:
            raise _Malformed('The Content-Disposition header field "name" must be provided.')
        part["name"] = _decode(options[b"name"], charset)
        if b"filename" in options:
            files += 1
            if files > body.max_images:
                raise too_many_images(body.max_images)
            part["filename"] = _decode(options[b"filename"], charset)
        else:
            fields += 1
            if fields > MAX_TEXT_FIELDS:
                raise _Malformed(f"Too many fields. Maximum number of fields is {MAX_TEXT_FIELDS}.")
            part["filename"] = None

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body.data)
        parser.finalize()
        if parser.state not in (MultipartState.START, MultipartState.END):  # cut short
            raise _Malformed(
                f"it ends before its closing boundary --{boundary.decode('latin-1')[:70]}--: the "
                "upload was cut short; send the whole body"
            )
    except _Malformed as exc:
        raise BadInput(f"malformed multipart body: {exc}") from None
    except FormParserError:
        raise BadInput("malformed multipart body: Invalid multipart data.") from None
    return items


class _Malformed(Exception):
    pass


def _decode(value: bytes, charset: str) -> str:
    try:
        return value.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return value.decode("latin-1")


def _upload(key: str, value: Upload | str) -> Upload:
    if key not in IMAGE_FIELDS:
        raise BadInput(f"unexpected form field {shown(key)}: send images under the field 'files'")
    if not isinstance(value, Upload):
        raise BadInput(
            f"form field {shown(key)} holds text, not a file: use curl -F files=@digit.png"
        )
    return value


async def read_json_or_binary(request: Request) -> bytes:
    """A V2 inference body: JSON, or the binary extension (JSON header + raw tensors)."""
    refuse_content_encoding(request)
    ctype = media_type(request)
    if ctype not in ("", JSON_TYPE, "application/octet-stream") and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"unsupported Content-Type {shown_type(ctype)}: send application/json, or "
            "application/octet-stream with Inference-Header-Content-Length for binary tensors"
        )
    body = await request.body()
    _check_declared_shapes(request, body)
    return body


def _check_declared_shapes(request: Request, body: bytes) -> None:
    """A large JSON body's declared shapes against the model and the row limit before it is
    parsed (v2codec.check_declared_shapes): its parse's memory stays bounded."""
    if len(body) < v2codec.CHECK_FROM:
        return
    core = getattr(request.app.state, "core", None)
    if core is None:
        return
    header = request.headers.get(v2codec.HEADER_LENGTH)
    header_length = v2codec.plain_length(header) if header else None
    if header_length is not None and not 0 < header_length <= len(body):
        return  # the decoder says what is wrong with it
    spec = None
    try:
        model = core.registry.get(request.path_params.get("model", ""),
                                  request.path_params.get("version"))  # fmt: skip
        spec = model.manifest.input if model.manifest is not None else None
    except BnfoldError:
        pass  # unknown: the route says so
    v2codec.check_declared_shapes(body, header_length, spec, core.settings.max_images_per_request)
