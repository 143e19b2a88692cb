"""Where a benchmark run was made (machine, commit, served settings) and its results as strict
JSON: what every results file of bench/ states at its top."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip()

    # The bench's own outputs do not count: a section measured after another wrote its results
    # would otherwise report the run's commit as changed.
    ours = (":(exclude)bench/results", ":(exclude)docs/performance.md")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", *ours)
    dirty = " + uncommitted changes" if changed else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


def bnfold_settings(env: dict[str, str]) -> str:
    """The served settings that shape performance (threads, provider, batching when present)."""
    from service.config import Settings

    wanted = ("threads", "provider", "batch", "delay", "queue", "timeout")
    values = Settings(**{k.removeprefix("BNFOLD_").lower(): v for k, v in env.items()}).model_dump()
    return ", ".join(f"{k}={v}" for k, v in values.items() if any(w in k for w in wanted))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return int(line.split()[1]) / 2**20
    return 0.0


def finite(value):
    """A copy with NaN and infinities as None: results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
