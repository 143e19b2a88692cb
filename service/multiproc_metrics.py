"""Prometheus metrics of a server with several worker processes: one /metrics for them all.

prometheus-client's multi-process mode: when `PROMETHEUS_MULTIPROC_DIR` is set before
prometheus_client is imported, every metric value lives in a memory-mapped file of its
process in that folder, and `MultiProcessCollector` merges the files of every process at each
scrape. So whichever worker answers GET /metrics reports the whole server:

- counters are summed over the workers, those that exited or were restarted included, so a
  counter never goes backwards when a worker is replaced;
- histograms are merged (bucket counts, sums and counts added);
- gauges say how they aggregate: `bnfold_requests_in_flight` and `bnfold_queue_depth` are
  `livesum`, the sum over the workers alive now (the supervisor removes the files of a worker
  that exited, `mark_process_dead`).

A single process (`BNFOLD_WORKERS=1`) keeps prometheus-client's ordinary in-memory values.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """The folder of the multi-process mode, or None in a single process."""
    path = os.environ.get(ENV)
    return Path(path) if path else None


def exposition_registry(own: CollectorRegistry) -> CollectorRegistry:
    """What GET /metrics renders: `own` in a single process, else every worker's merged."""
    folder = multiprocess_dir()
    if folder is None:
        return own
    from prometheus_client.multiprocess import MultiProcessCollector

    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(folder))
    return merged


def create_dir(parent: Path | None = None) -> Path:
    """A new empty folder for the workers' metric files, named in the environment so that the
    workers (spawned after this) record into it. Call before any worker starts."""
    folder = Path(tempfile.mkdtemp(prefix="bnfold-metrics-", dir=parent))
    os.environ[ENV] = str(folder)
    return folder


def process_gone(pid: int) -> None:
    """A worker exited: its live gauges no longer count (its counters still do)."""
    folder = multiprocess_dir()
    if folder is not None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, str(folder))


def forget_dir() -> None:
    """The server stopped: this process records no more multi-process metrics."""
    os.environ.pop(ENV, None)
