"""`python -m service.healthcheck`: exit 0 when the local server answers ready, else 1.

The Docker HEALTHCHECK runs this (no curl in the slim image). It reads the same settings as the
server (BNFOLD_PORT), so the probe and the server cannot disagree on the port.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from service.config import Settings

READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"


def probe(port: int, path: str = READY_PATH, timeout: float = 3.0) -> bool:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    return 0 if probe(Settings().port) else 1


if __name__ == "__main__":
    sys.exit(main())
