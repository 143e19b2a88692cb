"""Request bodies as the routes need them: images from multipart or a raw body, V2 tensors.

Content-Type decides how a body is read; anything else is refused with 415 and a hint of what
to send. Decoding the images themselves is `service.preprocess`'s job, not this module's.
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.errors import BadInput, PayloadTooLarge, UnsupportedMediaType
from service.inference import Upload, check_image_count

IMAGE_FIELDS = ("files", "file")
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
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
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed"
        )


async def read_images(request: Request, max_images: int, also: str = "") -> list[Upload]:
    """Every image in the request, in order: multipart files or the raw body."""
    refuse_content_encoding(request)
    ctype = media_type(request)
    if ctype == "multipart/form-data":
        return await _multipart_images(request, max_images)
    if ctype.startswith(RAW_IMAGE_TYPES):
        return [Upload(await request.body())]
    shown = ctype or "no Content-Type"
    raise UnsupportedMediaType(f"unsupported Content-Type {shown}: {HOW_TO_SEND}{also}")


async def _multipart_images(request: Request, max_images: int) -> list[Upload]:
    try:
        form = await request.form(max_files=max_images, max_fields=8)
    except HTTPException as exc:  # Starlette reports multipart trouble as a 400
        if str(exc.detail).startswith("Too many files"):
            raise PayloadTooLarge(
                f"more than {max_images} images in one request: split the batch"
            ) from None
        raise BadInput(f"malformed multipart body: {exc.detail}") from None
    try:
        uploads = [await _upload(key, value) for key, value in form.multi_items()]
    finally:
        await form.close()
    if not uploads:
        raise BadInput(f"the multipart body holds no files: {HOW_TO_SEND}")
    check_image_count(len(uploads), max_images)
    return uploads


async def _upload(key: str, value: UploadFile | str) -> Upload:
    if key not in IMAGE_FIELDS:
        raise BadInput(f"unexpected form field {key!r}: send images under the field 'files'")
    if not isinstance(value, UploadFile):
        raise BadInput(f"form field {key!r} holds text, not a file: use curl -F {key}=@digit.png")
    return Upload(await value.read(), value.filename or None)


async def read_json_or_binary(request: Request) -> bytes:
    """A V2 inference body: JSON, or the binary extension (JSON header + raw tensors)."""
    refuse_content_encoding(request)
    ctype = media_type(request)
    if ctype not in ("", JSON_TYPE, "application/octet-stream") and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"unsupported Content-Type {ctype}: send application/json, or "
            "application/octet-stream with Inference-Header-Content-Length for binary tensors"
        )
    return await request.body()
