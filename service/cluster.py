"""What the worker processes of one server share: readiness, and the registry changes.

Each worker answers for itself on the shared port, yet its answers must hold for the whole
server: readiness is ready only when every worker is, and a reload (or a load or unload) sent
to one worker reaches them all. The supervisor creates a `Cluster` before it starts any
worker; each worker process gets it (shared memory, inherited at spawn) with its own slot
(`Member`), and its registry is a `SharedRegistry` (service/shared_registry.py):

- `ready[i]`: worker i has loaded every bundle and is not draining. A worker publishes its
  flag (`Member.sync`, every `POLL_S`); the supervisor clears the slot of a worker that died.
- an operation log: `seq` counts operations; operation n is the file `ops/<n>.json` in the
  state folder, written before `seq` reaches n. A load names a snapshot of the bundle (its
  files copied into `bundles/` of the state folder, then verified there) and the sha256 of the
  snapshot's bundle.json, which pins the sha256 of every file: the other workers load that
  snapshot, never the models folder again, so files changed on disk in between change
  nothing. Every worker applies the operations past its `applied[i]` in order (for each model
  the last one); one it cannot apply is not counted: `failed[i]` names it, the worker reads
  not ready and tries again, and the worker that received the request answers that instead
  of success. Otherwise that worker waits (bounded) until every other worker has applied it.
- a worker that starts (first start or restart) rebuilds the state the log describes: each
  model's last operation (a load: its snapshot; an unload: not served); a model the log has
  no operation for is served from its base snapshot, the copy the first worker to load it
  made (`bundles/<name>/base`), so a restarted worker serves what the others serve, not what
  the models folder holds now.
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
        (state_dir / "bundles").mkdir(parents=True, exist_ok=True)
        self.ready = ctx.Array("b", workers, lock=False)  # 1: worker i ready
        self.applied = ctx.Array("q", [DEAD] * workers, lock=False)  # last op applied by i
        self.seq = ctx.Value("q", 0)  # operations in the log; its lock orders appends
        self.pids = ctx.Array("q", workers, lock=False)  # pid serving slot i (0: none)
        self.failed = ctx.Array("q", workers, lock=False)  # op worker i failed to apply (0: none)

    @property
    def snapshots(self) -> Path:
        """Where verified copies of bundles live: bundles/<name>/<id>/<name>/."""
        return self.state_dir / "bundles"

    def worker_gone(self, index: int) -> None:
        """The supervisor saw worker `index` exit: not ready, nothing to wait for."""
        self.ready[index] = 0
        self.applied[index] = DEAD
        self.pids[index] = 0
        self.failed[index] = 0

    def append(self, op: str, name: str, slot: int, **fields: object) -> int:
        """Add an operation (done by worker `slot`) to the log; its sequence number. A load's
        `fields`: the snapshot's `path`, `version` and `sha256` (bundle.json's, and each
        verified file's by variant)."""
        with self.seq.get_lock():
            n = self.seq.value + 1
            path = self.state_dir / "ops" / f"{n:012d}.json"
            tmp = path.with_suffix(".tmp")
            entry = {"op": op, "model": name, "slot": slot, "pid": os.getpid(), **fields}
            tmp.write_text(json.dumps(entry))
            tmp.rename(path)  # complete before any worker can see n
            self.seq.value = n
        return n

    def read(self, n: int) -> dict:
        return json.loads((self.state_dir / "ops" / f"{n:012d}.json").read_text())

    def last_ops(self, first: int, last: int) -> dict[str, tuple[int, dict]]:
        """model -> (n, entry) of its last operation among operations first..last."""
        out: dict[str, tuple[int, dict]] = {}
        for n in range(first, last + 1):
            entry = self.read(n)
            out[entry["model"]] = (n, entry)
        return out

    def last_ops_of(self, name: str, last: int) -> list[tuple[int, dict]]:
        """(n, entry) of the loads of model `name` among operations 1..last."""
        found = [(n, self.read(n)) for n in range(1, last + 1)]
        return [(n, e) for n, e in found if e["model"] == name and e["op"] == "load"]


@dataclass
class Member:
    """One worker's view of the cluster: its slot index and the shared state."""

    cluster: Cluster
    index: int
    opening: str | None = None  # a listener this worker has still to open: not ready meanwhile

    def join(self) -> int:
        """At start, before loading: the operations already in the log (the state they
        describe is what this worker rebuilds)."""
        self.cluster.pids[self.index] = os.getpid()
        self.cluster.failed[self.index] = 0
        return self.cluster.seq.value

    def set_ready(self, ready: bool) -> None:
        self.cluster.ready[self.index] = 1 if ready and self.opening is None else 0

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

    def set_failed(self, n: int) -> None:
        """This worker could not apply operation n (0: it applies everything)."""
        self.cluster.failed[self.index] = n

    async def wait_applied(self, n: int, timeout_s: float) -> tuple[list[int], list[int]]:
        """Until every other live worker has applied operation n, or every one still behind
        failed to apply it (or an earlier one); (slots behind, slots failed among them) when
        that happened or `timeout_s` ran out (both empty: all applied)."""
        c = self.cluster
        deadline = time.monotonic() + timeout_s
        while True:
            behind = [i for i in range(c.workers) if i != self.index and c.applied[i] < n]
            failed = [i for i in behind if 0 < c.failed[i] <= n]
            if len(failed) == len(behind) or time.monotonic() >= deadline:
                return behind, failed
            await asyncio.sleep(POLL_S / 2)
