"""Uploads: multipart bodies cut short (400 saying so, not 'the multipart body holds no
files'), and the decoding of a request that timed out (stopped, not carried on).

A client (or a proxy) that drops the connection's tail sends a body whose last part never
reaches its closing boundary; python-multipart parses it without complaint and never ends the
part, so the server used to answer that no file had been sent at all.
"""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from bnfold.preprocess import PreprocessSpec
from service import images
from service.threads import CpuThreads

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


def large_png() -> bytes:
    """A 256x256 grayscale PNG of a few hundred bytes (a gradient compresses well): small
    enough to be parsed on the event loop, over the pixel budget decoded there, so its request
    is decoded in a CPU thread, as any large image is."""
    pixels = np.add.outer(np.arange(256), np.arange(256)).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return out.getvalue()


def test_decoding_stops_at_the_next_image_once_the_request_timed_out(
    serve, models_dir, monkeypatch
):
    """64 large images take seconds each batch; the decoding thread went on after its request's
    504, so a few such requests held up every predict behind them for as long again."""
    client = serve(models_dir, request_timeout_s=0.2)
    decoded, finished, timed_out = [], threading.Event(), threading.Event()
    real_decode, real_batch = images.decode_image, images.images_to_batch

    def decode(data, max_pixels, budget=None):
        if budget is not None:  # the try on the event loop: stops at the first header
            return real_decode(data, max_pixels, budget)
        decoded.append(threading.current_thread())
        if len(decoded) == 2:  # the second image "takes" until the request has timed out
            assert timed_out.wait(30)
        return real_decode(data, max_pixels, budget)

    def batch(*args, **kwargs):
        try:
            return real_batch(*args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(images, "decode_image", decode)
    monkeypatch.setattr(images, "images_to_batch", batch)
    r = client.post(PREDICT, files=[("files", ("d.png", large_png()))] * 10)
    assert r.status_code == 504
    timed_out.set()
    assert finished.wait(30)
    assert len(decoded) == 2  # the image in progress finished; the other 8 were never decoded
    assert all(in_cpu_thread(t) for t in decoded)


def test_small_images_are_decoded_on_the_event_loop_and_large_ones_in_a_thread(
    serve, models_dir, digits, monkeypatch
):
    """What INLINE_PIXELS promises: a request of small images costs no trip to a thread; one
    image over the budget sends the whole request to a CPU thread, with the same answer."""
    client = serve(models_dir)
    threads = batch_threads(monkeypatch)
    small = [("files", (f"{i}.png", digits[i].png)) for i in range(4)]
    r = client.post(PREDICT, files=small)
    assert r.status_code == 200
    assert len(threads) == 1 and not in_cpu_thread(threads[0])
    loop_thread = threads.pop()
    r2 = client.post(PREDICT, files=[*small, ("files", ("big.png", large_png()))])
    assert r2.status_code == 200
    assert r2.json()["predictions"][:4] == r.json()["predictions"]
    # the attempt on the loop stopped at the large image's header; a CPU thread did it all
    assert threads[0] is loop_thread and in_cpu_thread(threads[1]) and len(threads) == 2


def batch_threads(monkeypatch) -> list[threading.Thread]:
    """The thread of each images_to_batch call from now on, in order."""
    threads: list[threading.Thread] = []
    real_batch = images.images_to_batch

    def batch(*args, **kwargs):
        threads.append(threading.current_thread())
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(images, "images_to_batch", batch)
    return threads


def in_cpu_thread(thread: threading.Thread) -> bool:
    return thread.name.startswith("bnfold-cpu")  # service.threads.CpuThreads


def test_a_small_png_with_compressed_text_is_decoded_in_a_thread(serve, models_dir, monkeypatch):
    """Pillow inflates zTXt chunks while it opens a file, before any size is known: a 16 KiB
    PNG can hide megabytes of them. Only PNGs made of plain-image chunks are decoded on the
    event loop; this one, with the same pixels as a plain one, goes to a CPU thread."""
    from PIL.PngImagePlugin import PngInfo

    client = serve(models_dir)
    threads = batch_threads(monkeypatch)
    pixels = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
    info = PngInfo()
    info.add_text("comment", "x" * 10_000, zip=True)
    texts, plain = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels, "L").save(texts, format="PNG", pnginfo=info)
    Image.fromarray(pixels, "L").save(plain, format="PNG")
    assert images.plain_png(plain.getvalue()) and not images.plain_png(texts.getvalue())
    answers = []
    for data in (plain.getvalue(), texts.getvalue()):
        r = client.post(PREDICT, content=data, headers={"content-type": "image/png"})
        assert r.status_code == 200
        answers.append(r.json()["predictions"])
    assert answers[0] == answers[1]
    assert [in_cpu_thread(t) for t in threads] == [False, True]


@pytest.mark.parametrize(
    ("side", "inside", "tries"),
    [
        (128, 1, ["loop"]),  # alone: a plain PNG over INLINE_BYTES is decoded on the loop
        (128, 2, ["cpu"]),  # another request inside: it needs the loop, the PNG goes to a thread
        (512, 1, ["loop"]),  # LONE_PIXELS, exactly
        (513, 1, ["loop", "cpu"]),  # past it, even alone: stopped at its header, then a thread
    ],
)
def test_a_lone_requests_larger_plain_png_is_decoded_on_the_event_loop(side, inside, tries):
    """What LONE_PIXELS promises: a request alone in its worker has plain PNGs up to that many
    pixels decoded on the loop (the trip to a thread would be pure delay); the same array."""
    rng = np.random.default_rng(side)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(png, "PNG")
    data = png.getvalue()
    assert len(data) > images.INLINE_BYTES and images.plain_png(data)
    spec = PreprocessSpec(color_mode="RGB", height=128, width=128, mean=[0.5] * 3, std=[0.25] * 3)
    ran_on: list[threading.Thread] = []
    real_batch = images.images_to_batch

    def batch(*args, **kwargs):
        ran_on.append(threading.current_thread())
        return real_batch(*args, **kwargs)

    async def main():
        threads = CpuThreads(1)
        threads.requests_inside = lambda: inside
        try:
            return await images.preprocess_uploads([images.Upload(data)], spec, 10**8, threads)
        finally:
            threads.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "images_to_batch", batch)
        got = asyncio.run(main())
    assert ["cpu" if in_cpu_thread(t) else "loop" for t in ran_on] == tries
    assert np.array_equal(got, real_batch([images.Upload(data)], spec, 10**8))
