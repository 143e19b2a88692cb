"""`python -m tests.load.gated_serve [bnfold-serve flags]`: the real server, whose workers apply
another worker's registry change only once the file GATED_SERVE_GATE exists (a test-only
launcher): a test can change the models folder, or the files a change names, between the load
one worker verified and the moment the others apply it. Nothing else about the server changes.
"""

from __future__ import annotations

import asyncio
import os
import sys

from service.__main__ import main
from service.shared_registry import SharedRegistry

GATE = os.environ.get("GATED_SERVE_GATE", "")
_apply = SharedRegistry._apply


async def gated_apply(self, *args, **kwargs):
    while GATE and not os.path.exists(GATE):
        await asyncio.sleep(0.05)
    return await _apply(self, *args, **kwargs)


# At import, not under __main__: each spawned worker imports this module as its __mp_main__.
SharedRegistry._apply = gated_apply  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
