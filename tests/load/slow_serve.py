"""`python -m tests.load.slow_serve [bnfold-serve flags]`: the real server, with every
onnxruntime run of a request made slower by SLOW_SERVE_RUN_S seconds (a test-only launcher).

A model of 8x8 digits answers in well under a millisecond, too fast for a test to catch
requests queued or in flight. The delay sits inside `LoadedModel.run`, in the batcher's thread,
exactly where a big model would spend its time; the warm-up runs at load time are not delayed,
and nothing else about the server changes. SLOW_SERVE_IMPORT_S delays each worker process
(BNFOLD_WORKERS > 1) by that long before it can answer the supervisor: a slow start-up.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from service import registry
from service.__main__ import main

DELAY_S = float(os.environ.get("SLOW_SERVE_RUN_S", "0"))
_run = registry.LoadedModel.run


def slow_run(self, variant, x, wide=False):
    if threading.current_thread().name.startswith("bnfold-"):  # a batching lane's thread
        time.sleep(DELAY_S)
    return _run(self, variant, x, wide)


# At import, not under __main__: worker processes (BNFOLD_WORKERS > 1) are spawned, and each
# imports this module again as its __mp_main__, so every worker runs slowed too.
registry.LoadedModel.run = slow_run  # type: ignore[method-assign]

if __name__ == "__mp_main__":  # a worker, before it can answer its first health check
    time.sleep(float(os.environ.get("SLOW_SERVE_IMPORT_S", "0")))  # heavy imports, busy host

if __name__ == "__main__":
    sys.exit(main())
