"""The CPU work of requests (multipart parsing, image decoding, JSON tensors) off the event loop.

`CpuThreads` is a few threads of their own, apart from anyio's pool and from the batching
lanes' inference threads, so decoding goes on in parallel with inference. Handing work to an
idle thread costs the event loop a lock release and a GIL hand-off, more than decoding a small
image takes; so a thread that finishes a job takes the next queued one itself, and under load
the event loop only appends to a queue. A lone request still starts at once on an idle thread.

For the same reason small jobs are not handed over at all: `offload(..., nbytes=n)` runs fn on
the event loop itself when the input it works through is at most INLINE_BYTES, or at most
LONE_BYTES while the worker holds no other request (`requests_inside`, the server's count):
nothing else then waits for the loop, and the two hand-offs are pure delay for the one
request. Parsing JSON holds the GIL either way.

One pool per process, built with the process's other parts (service/process.py) and sized from
the cores the process may use (service/cpus.py), never from the host's core count.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

MAX_THREADS = 4  # decoding threads beyond this gained nothing next to the inference threads
# Parsing this many bytes (a multipart form, a V2 JSON body) takes the loop about as long as the
# hand-off to a thread and back (about 50 µs of CPU), well under a millisecond.
INLINE_BYTES = 16 * 1024
# A lone request's input up to this size is worked through on the loop: a V2 JSON body of 4 MiB
# parses in about 12 ms, the longest a health probe arriving meanwhile then waits. The heavy
# benchmark model's 1 MB JSON request at one connection, 6 paired rounds: 1.11x calls/s.
LONE_BYTES = 4 * 2**20


def thread_count(cores: int) -> int:
    """Decoding threads for a process that may use `cores` cores: at most MAX_THREADS."""
    return max(1, min(MAX_THREADS, cores))


class CpuThreads:
    """`await threads.offload(fn, *args)`: fn(*args) in one of `count` threads."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._executor: ThreadPoolExecutor | None = None  # started with the first job
        self._jobs: deque[tuple] = deque()
        self._lock = threading.Lock()
        self._active = 0  # threads draining the queue now
        # The requests this worker holds now, set by the server (service/server.py); None (an
        # app without the server, in tests): not known, only INLINE_BYTES counts.
        self.requests_inside: Callable[[], int] | None = None

    async def offload(self, fn: Callable[..., T], *args: Any, nbytes: int | None = None) -> T:
        """fn(*args) in a thread; its exceptions propagate. With `nbytes`, the size of the
        input fn works through, at most INLINE_BYTES (or LONE_BYTES while the worker holds no
        other request): fn runs here, on the event loop."""
        if nbytes is not None and (
            nbytes <= INLINE_BYTES or (nbytes <= LONE_BYTES and self.alone())
        ):
            return fn(*args)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # The caller's context (the request id for log lines) goes with the job.
        job = (contextvars.copy_context(), fn, args, loop, future)
        with self._lock:
            self._jobs.append(job)
            start = self._active < self.count
            if start:
                self._active += 1
        if start:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.count, thread_name_prefix="bnfold-cpu")
            self._executor.submit(self._drain)
        return await future

    def alone(self) -> bool:
        """The server counts no request in this worker but the caller's own (False when the
        count is not known: an app without the server)."""
        count = self.requests_inside
        return count is not None and count() <= 1

    def close(self) -> None:
        """The threads end once the queued jobs are done (a later job starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._active -= 1
                    return
                context, fn, args, loop, future = self._jobs.popleft()
            if future.cancelled():  # the caller gave up (timeout) before its turn
                continue
            try:
                result = context.run(fn, *args)
            except BaseException as exc:  # handed to the caller, raised there
                _deliver(loop, future, None, exc)
            else:
                _deliver(loop, future, result, None)


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result, exc) -> None:
    with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits for it
        loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future, result, exc) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
