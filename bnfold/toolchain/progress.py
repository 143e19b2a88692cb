"""One progress line per stage of a long command (load, fold, reference, measure and write).

The lines go to the `bnfold.progress` logger; the `bnfold` command prints them on stdout, so a
user importing a large model sees where the time goes, and a library caller sees nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("bnfold.progress")


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block and log `name: 1.2 s` when it ends without an exception."""
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", name, time.perf_counter() - start)
