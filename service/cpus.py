"""How many cores this process may use, and how they are split between worker processes.

`os.cpu_count()` is the host's count: a container given `--cpus 2` on a 64-core host, or a
Kubernetes pod with a CPU limit of 2, would start 64 workers and 64 threads per session, all
throttled by the quota. The cores a process may really use are its CPU affinity
(`os.sched_getaffinity`, what `taskset` and cpusets restrict) and its cgroup's CPU quota
(cgroup v2 `cpu.max`, cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, what `docker run
--cpus` and Kubernetes CPU limits set), whichever is smaller.
"""

from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_STAT = Path("/proc/stat")


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Whole cores this process may use: min(affinity, cgroup quota rounded down), at least 1.

    A fractional quota (`--cpus 1.5`) rounds down: one worker per whole core the quota grants,
    so the workers are not throttled while they all run.
    """
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None:
        cores = min(cores, math.floor(quota))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota in cores of this process's cgroup and its ancestors (the smallest), or
    None when there is none (`max`, -1) or no cgroup file can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: "0::/path"
            quotas += _v2_quotas(root, path)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            quotas += _v1_quotas(root / controllers, path)
    return min(quotas) if quotas else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """base/path and each of its parents up to base itself (inside a container the path the
    kernel names may not exist under the mount: then only base counts)."""
    out, current = [], base / path.lstrip("/")
    while True:
        if current.is_dir():
            out.append(current)
        if current == base or base not in current.parents:
            break
        current = current.parent
    return out or [base]


def _v2_quotas(root: Path, path: str) -> list[float]:
    quotas = []
    for folder in _ancestors(root, path):
        try:
            limit, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if limit != "max" and int(period) > 0:
            quotas.append(int(limit) / int(period))
    return quotas


def _v1_quotas(mount: Path, path: str) -> list[float]:
    if not mount.is_dir():  # "cpu,cpuacct" is often mounted as, or linked from, "cpu"
        mount = mount.parent / "cpu"
    quotas = []
    for folder in _ancestors(mount, path):
        try:
            limit = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if limit > 0 and period > 0:
            quotas.append(limit / period)
    return quotas


def resolve_workers(requested: int, cores: int) -> int:
    """`BNFOLD_WORKERS`: 0 means one worker per usable core."""
    return requested if requested > 0 else cores


def threads_per_worker(requested: int, cores: int, workers: int) -> int:
    """`BNFOLD_THREADS`: 0 means this worker's share of the cores (cores // workers, at least
    1), so N workers never run N x cores intra-op threads on `cores` cores."""
    return requested if requested > 0 else max(1, cores // workers)


def idle_threads(requested: int, cores: int) -> int:
    """`BNFOLD_IDLE_THREADS`: 0 means every usable core."""
    return requested if requested > 0 else cores


class OthersLoad:
    """The cores the rest of the machine kept busy lately: /proc/stat's busy time of every
    CPU minus this process's own CPU time (getrusage), over the last `window_s` or more.

    A measure over a window, not an instant: a thread that is runnable for a moment (the
    client's, the network's softirq) does not count as load, a neighbour that computes does.
    /proc/stat is the host's: in a container the neighbours' work counts, so there a run goes
    wide only when the whole host is quiet."""

    def __init__(self, window_s: float = 0.1, stat: Path = PROC_STAT) -> None:
        self.window_s = window_s
        self.stat = stat
        self.tick = 1 / os.sysconf("SC_CLK_TCK")
        self._last: tuple[float, float, float] | None = None  # (monotonic, busy s, own s)
        self.cores: float | None = None  # the latest figure; None until two samples

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            fields = self.stat.read_text().split("\n", 1)[0].split()
            # cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait
            jiffies = [int(v) for v in fields[1:9]]
            busy = (sum(jiffies) - jiffies[3] - jiffies[4]) * self.tick
        except (OSError, ValueError, IndexError):
            return None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.monotonic(), busy, usage.ru_utime + usage.ru_stime

    def others(self) -> float | None:
        """Cores the other processes used over the last window (None: not known yet)."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.window_s:
            return self.cores
        sample = self._sample()
        if sample is None:
            return None
        if self._last is not None:
            elapsed = sample[0] - self._last[0]
            used = (sample[1] - self._last[1]) - (sample[2] - self._last[2])
            self.cores = max(0.0, used / elapsed)
        self._last = sample
        return self.cores
