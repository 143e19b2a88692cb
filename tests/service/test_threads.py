"""service/threads.py: which decoding jobs run on the event loop and which in a CPU thread.

The loop is the thread asyncio.run() runs on (the main thread here); a job's thread is read
from inside the job itself.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.threads import INLINE_BYTES, LONE_BYTES, CpuThreads


def thread_of_job(nbytes: int | None, inside: int | None) -> threading.Thread:
    """The thread a job of `nbytes` ran on, with the server counting `inside` requests
    (None: no server)."""

    async def main():
        threads = CpuThreads(2)
        if inside is not None:
            threads.requests_inside = lambda: inside
        try:
            return await threads.offload(threading.current_thread, nbytes=nbytes)
        finally:
            threads.close()

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("nbytes", "inside", "on_loop"),
    [
        (INLINE_BYTES, None, True),  # small: on the loop, whatever the load
        (INLINE_BYTES, 5, True),
        (INLINE_BYTES + 1, None, False),  # no server count: a larger job goes to a thread
        (INLINE_BYTES + 1, 1, True),  # the worker holds this request only
        (LONE_BYTES, 1, True),
        (LONE_BYTES + 1, 1, False),  # too long to hold the loop even for a lone request
        (INLINE_BYTES + 1, 2, False),  # another request inside: it needs the loop
        (None, 1, False),  # size not given: always a thread
    ],
)
def test_a_job_runs_on_the_loop_when_small_or_alone_and_bounded(nbytes, inside, on_loop):
    ran_on = thread_of_job(nbytes, inside)
    assert (ran_on is threading.main_thread()) is on_loop
    if not on_loop:
        assert ran_on.name.startswith("bnfold-cpu")


def test_a_job_on_the_loop_raises_as_it_would_from_a_thread():
    def fail():
        raise ValueError("bad tensor")

    async def main(inside):
        threads = CpuThreads(1)
        threads.requests_inside = lambda: inside
        try:
            await threads.offload(fail, nbytes=INLINE_BYTES + 1)
        finally:
            threads.close()

    for inside in (1, 2):  # on the loop, then in a thread
        with pytest.raises(ValueError, match="bad tensor"):
            asyncio.run(main(inside))
