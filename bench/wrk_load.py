"""Drive one HTTP target with wrk (one thread: the server keeps the other core) and parse it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent / "wrk" / "post.lua"
MARK = "BENCH_JSON "


def run_wrk(
    url: str,
    body: Path,
    content_type: str,
    connections: int,
    seconds: int,
    timeout_s: int = 30,
    headers: dict[str, str] | None = None,
) -> dict:
    """POST `body` for `seconds` over `connections` keep-alive connections; one result row.
    `headers`: more request headers (the V2 binary extension's Inference-Header-Content-Length)."""
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(SCRIPT),
        url,
    ]
    env = {
        **os.environ,
        "BENCH_BODY": str(body),
        "BENCH_CONTENT_TYPE": content_type,
        "BENCH_HEADERS": header_lines(headers or {}),
    }
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=seconds + timeout_s + 30
    )
    return parse_wrk(proc.stdout, proc.stderr, proc.returncode)


def header_lines(headers: dict[str, str]) -> str:
    """post.lua's BENCH_HEADERS: one "Name: value" line per header."""
    for name, value in headers.items():
        if ":" in name or "\n" in name + value:
            raise ValueError(f"not a header line: {name!r}: {value!r}")
    return "\n".join(f"{name}: {value}" for name, value in headers.items())


def parse_wrk(stdout: str, stderr: str = "", returncode: int = 0) -> dict:
    """The JSON line post.lua prints: successful requests/s, p50/p99 in ms, one error count.

    `rps` counts 2xx answers only: a server that refuses fast (503) must not look fast. wrk's
    latency histogram holds every answer, refusals included: a row with errors says so.
    """
    lines = [ln[len(MARK) :] for ln in stdout.splitlines() if ln.startswith(MARK)]
    if returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed (exit {returncode}): {stderr.strip() or stdout.strip()}")
    raw = json.loads(lines[-1])
    seconds = raw["duration_us"] / 1e6
    socket_errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors"))
    lat = raw["latency_us"]
    return {
        "requests": raw["requests"],
        "rps": (raw["requests"] - raw["non2xx"]) / seconds if seconds > 0 else 0.0,
        "p50_ms": lat["p50"] / 1e3,
        "p99_ms": lat["p99"] / 1e3,
        "errors": raw["non2xx"] + socket_errors + raw["timeouts"],
        "non2xx": raw["non2xx"],
        "last_bad_status": raw["last_bad_status"],
        "socket_errors": socket_errors,
        "timeouts": raw["timeouts"],
    }
