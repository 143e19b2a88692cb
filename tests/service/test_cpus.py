"""service/cpus.py: the cores a process may use (affinity, cgroup v1/v2 quota) and their split.

The cgroup files are written into a temporary folder laid out as /sys/fs/cgroup is, with the
process's /proc/self/cgroup beside it, so each case is exact and independent of this machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service import cpus
from service.__main__ import parse_args, split_cores
from service.config import Settings
from service.cpus import (
    cgroup_cpu_quota,
    idle_threads,
    resolve_workers,
    threads_per_worker,
    usable_cpus,
)


def layout(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    root.mkdir(parents=True, exist_ok=True)
    proc_file = tmp_path / "proc-cgroup"
    proc_file.write_text(proc)
    return root, proc_file


def test_v2_quota_is_limit_over_period_and_the_smallest_ancestor_wins(tmp_path):
    root, proc = layout(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "cpu.max": "max 100000\n",
        "kubepods/cpu.max": "400000 100000\n",       # 4 cores for all pods
        "kubepods/pod1/cpu.max": "150000 100000\n",  # 1.5 for this pod
        "kubepods/pod1/ctr/cpu.max": "max 100000\n",
    })  # fmt: skip
    assert cgroup_cpu_quota(root, proc) == 1.5


def test_v2_inside_a_container_reads_the_namespace_root(tmp_path):
    root, proc = layout(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"})
    assert cgroup_cpu_quota(root, proc) == 2.0


def test_no_quota_is_none(tmp_path):
    root, proc = layout(tmp_path, "0::/a\n", {"cpu.max": "max 100000\n", "a/cpu.max": "max 1\n"})
    assert cgroup_cpu_quota(root, proc) is None
    assert cgroup_cpu_quota(root, tmp_path / "missing") is None


def test_v1_cfs_quota_and_unlimited(tmp_path):
    root, proc = layout(tmp_path, "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })  # fmt: skip
    assert cgroup_cpu_quota(root, proc) == 3.0
    root, proc = layout(tmp_path / "u", "1:cpu:/\n", {
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
    })  # fmt: skip
    assert cgroup_cpu_quota(root, proc) is None


def test_usable_cpus_is_the_smaller_of_affinity_and_quota_rounded_down(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    root, proc = layout(tmp_path, "0::/\n", {"cpu.max": "50000 100000\n"})  # half a core
    assert usable_cpus(root, proc) == 1  # at least one
    root, proc = layout(tmp_path / "big", "0::/\n", {"cpu.max": "99900000 100000\n"})  # 999
    assert usable_cpus(root, proc) == affinity
    root, proc = layout(tmp_path / "none", "0::/\n", {})
    assert usable_cpus(root, proc) == affinity


@pytest.mark.parametrize(
    ("requested", "cores", "workers", "threads"),
    [(0, 2, 2, 1), (0, 8, 2, 4), (0, 3, 2, 1), (0, 1, 4, 1), (6, 2, 2, 6)],
)
def test_threads_split_between_workers(requested, cores, workers, threads):
    assert threads_per_worker(requested, cores, workers) == threads
    assert workers * threads_per_worker(0, cores, workers) <= max(cores, workers)


def test_workers_default_to_the_cores_and_an_explicit_count_is_kept():
    assert resolve_workers(0, 6) == 6
    assert resolve_workers(3, 6) == 3


def test_split_cores_resolves_workers_and_threads(monkeypatch):
    cores = usable_cpus()
    monkeypatch.setenv("BNFOLD_WORKERS", "0")
    resolved = split_cores(Settings())
    assert (resolved.workers, resolved.threads) == (cores, 1)
    flagged = split_cores(Settings(workers=parse_args(["--workers", "1"]).workers))
    assert (flagged.workers, flagged.threads) == (1, cores)


def test_idle_threads_default_to_every_usable_core():
    assert idle_threads(0, 6) == 6
    assert idle_threads(3, 6) == 3


def test_others_load_is_the_machines_busy_time_less_this_process(tmp_path, monkeypatch):
    """Over a window: /proc/stat's busy jiffies (user, nice, system, irq, softirq, steal; not
    idle or iowait) of every CPU, less this process's own CPU time, per second of wall time;
    sampled at most once per window, None until two samples."""
    stat = tmp_path / "stat"
    clock = {"now": 100.0, "own": 5.0}
    monkeypatch.setattr(cpus.time, "monotonic", lambda: clock["now"])
    usage = type("Usage", (), {})

    def getrusage(who):
        u = usage()
        u.ru_utime, u.ru_stime = clock["own"] * 0.75, clock["own"] * 0.25
        return u

    monkeypatch.setattr(cpus.resource, "getrusage", getrusage)
    load = cpus.OthersLoad(window_s=0.1, stat=stat)
    tick = load.tick

    def write(busy_ticks: int, idle_ticks: int) -> None:
        # user nice system idle iowait irq softirq steal guest guest_nice
        b = busy_ticks // 6
        fields = [b, b, b, idle_ticks, 7, b, b, busy_ticks - 5 * b, 0, 0]
        stat.write_text("cpu  " + " ".join(map(str, fields)) + "\ncpu0 1 2 3\n")

    write(1000, 5000)
    assert load.others() is None  # one sample: nothing to compare yet
    # 0.5 s later: 1.0 s more busy time on the machine, 0.3 s of it this process's own
    clock["now"] += 0.5
    clock["own"] += 0.3
    write(1000 + round(1.0 / tick), 5000 + round(0.5 / tick))
    assert load.others() == pytest.approx(0.7 / 0.5)
    # within the window: the same figure, the file not read again
    stat.write_text("garbage")
    clock["now"] += 0.05
    assert load.others() == pytest.approx(1.4)
    clock["now"] += 0.1  # past the window, an unreadable file: not known
    assert load.others() is None


def test_others_load_sees_a_busy_neighbour():
    """A child process computing for a while is load of others: at least half a core of it
    is seen over its run (this process sleeps meanwhile)."""
    import subprocess
    import sys
    import time

    load = cpus.OthersLoad(window_s=0.0)
    load.others()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass"])  # fmt: skip
    started = time.monotonic()
    child.wait(timeout=60)
    elapsed = time.monotonic() - started
    seen = load.others()
    assert seen is not None and seen * elapsed >= 0.5  # >= 0.5 s of its 0.6 s of CPU
