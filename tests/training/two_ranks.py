"""Run a function on 2 gloo ranks in fresh processes, on loopback only (tests' helper).

Each rank joins through training.distributed.init_distributed(), from the same environment
variables torchrun sets, with MASTER_ADDR 127.0.0.1, a free port and gloo bound to `lo`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

LOOPBACK_ENV = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(fn: Callable, *args, world_size: int = 2) -> None:
    """fn(ctx, *args) on every rank; raises if any rank fails. fn must be importable."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    from training.distributed import init_distributed, teardown

    os.environ.update(LOOPBACK_ENV)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # two ranks on two cores
    ctx = init_distributed("gloo")
    try:
        fn(ctx, *args)
    finally:
        teardown()
