"""What the worker processes of one server share: readiness, and the registry changes.

Each worker answers for itself on the shared port, yet its answers must hold for the whole
server: readiness is ready only when every worker is, and a reload (or a load or unload) sent
to one worker reaches them all. The supervisor creates a `Cluster` before it starts any
worker; each worker process gets it (shared memory, inherited at spawn) with its own slot
(`Member`), and its registry is a `SharedRegistry` (service/shared_registry.py):

- `ready[i]`: worker i has loaded every bundle and is not draining. A worker publishes its
  flag (`Member.sync`, every `POLL_S`); the supervisor clears the slot of a worker that died.
- an operation log: `seq` counts operations; operation n is the file `ops/<n>.json` in the
  state folder, written before `seq` reaches n. Every worker applies the operations past its
  `applied[i]` in order; the worker that received the request waits (bounded) until every
  other worker has applied it before it answers. A worker that starts (first start or
  restart) loads every bundle from disk, then replays the log's unloads, so it serves the same
  models as the others.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.05  # how often a worker publishes its readiness and looks for new operations
DEAD = 2**62  # applied[i] of a slot with no live worker: nothing to wait for


class Cluster:
    """Shared state of `workers` worker processes; created by the supervisor (parent)."""

    def __init__(self, workers: int, state_dir: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.workers = workers
        self.state_dir = state_dir
        (state_dir / "ops").mkdir(parents=True, exist_ok=True)
        self.ready = ctx.Array("b", workers, lock=False)  # 1: worker i ready
        self.applied = ctx.Array("q", [DEAD] * workers, lock=False)  # last op applied by i
        self.seq = ctx.Value("q", 0)  # operations in the log; its lock orders appends
        self.pids = ctx.Array("q", workers, lock=False)  # pid serving slot i (0: none)

    def worker_gone(self, index: int) -> None:
        """The supervisor saw worker `index` exit: not ready, nothing to wait for."""
        self.ready[index] = 0
        self.applied[index] = DEAD
        self.pids[index] = 0

    def append(self, op: str, name: str, slot: int) -> int:
        """Add an operation (done by worker `slot`) to the log; its sequence number."""
        with self.seq.get_lock():
            n = self.seq.value + 1
            path = self.state_dir / "ops" / f"{n:012d}.json"
            tmp = path.with_suffix(".tmp")
            entry = {"op": op, "model": name, "slot": slot, "pid": os.getpid()}
            tmp.write_text(json.dumps(entry))
            tmp.rename(path)  # complete before any worker can see n
            self.seq.value = n
        return n

    def read(self, n: int) -> dict:
        return json.loads((self.state_dir / "ops" / f"{n:012d}.json").read_text())


@dataclass
class Member:
    """One worker's view of the cluster: its slot index and the shared state."""

    cluster: Cluster
    index: int

    def join(self) -> int:
        """At start, before loading: the operations already in the log (loading from disk
        covers their reloads; `replay` covers their unloads)."""
        self.cluster.pids[self.index] = os.getpid()
        return self.cluster.seq.value

    def set_ready(self, ready: bool) -> None:
        self.cluster.ready[self.index] = 1 if ready else 0

    def others_not_ready(self) -> str | None:
        """None when every other worker is ready; else which are not."""
        c = self.cluster
        waiting = [i for i in range(c.workers) if i != self.index and not c.ready[i]]
        if not waiting:
            return None
        names = ", ".join(str(i + 1) for i in waiting)
        return (
            f"worker(s) {names} of {c.workers} not ready yet (starting, restarting or "
            "loading bundles)"
        )

    async def wait_applied(self, n: int, timeout_s: float) -> list[int]:
        """Until every other live worker has applied operation n; the slots still behind
        when `timeout_s` ran out (empty: all applied)."""
        c = self.cluster
        deadline = time.monotonic() + timeout_s
        while True:
            behind = [i for i in range(c.workers) if i != self.index and c.applied[i] < n]
            if not behind or time.monotonic() >= deadline:
                return behind
            await asyncio.sleep(POLL_S / 2)
