"""service/cpus.py: the cores a process may use (affinity, cgroup v1/v2 quota) and their split.

The cgroup files are written into a temporary folder laid out as /sys/fs/cgroup is, with the
process's /proc/self/cgroup beside it, so each case is exact and independent of this machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.__main__ import parse_args, split_cores
from service.config import Settings
from service.cpus import cgroup_cpu_quota, resolve_workers, threads_per_worker, usable_cpus


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
